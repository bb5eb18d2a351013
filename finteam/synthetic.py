"""The embedded synthetic financial world: a seeded simulation that every default run learns from.

One `World(seed)` holds fictional economies, companies and daily prices that obey fixed rules,
so that each role's corpus teaches one rule and each instruction task leans on one rule:

  macro  each central bank follows a band rule: inflation more than 0.5 points above its 2%
         target -> raise 25bp (50bp beyond 2 points above); below target by more than 0.5 or a
         contracting economy -> cut 25bp; otherwise hold.               task: headlines (yes/no)
  micro  a company's quarter is a beat, a miss or in line by its EPS against the consensus
         (+-2%); beats lift the stock on the report day and misses sink it.
                                                                        tasks: sentiment, ner
  quant  daily returns carry momentum: the next day tends to follow the sign of the last five
         days' sum (about 4 times in 5), on top of economy-wide moves (correlations) and the
         event jumps above.                                             tasks: numeric, movement

Everything is a pure function of the seed (one `random.Random`), so the corpora and the tasks
are reproducible byte for byte. The prose generators in `finteam/prose.py` turn the world into
documents and tasks.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from .config import WorldConfig

TARGET_INFLATION = 2.0
MOMENTUM_WINDOW = 5
EARNINGS_DAY = 4  # trading day of the quarter on which results are published
DECISION_DAY = 12  # trading day of the quarter on which central banks decide
BEAT_BAND = 0.02  # |surprise| within 2% of consensus is "in line"

ECONOMIES = [
    ("Norland", "Norlandic", "Bank of Norland", "krona", ["Halden", "Skarvik", "Osterby"]),
    ("Vestria", "Vestrian", "Vestrian Reserve", "vest", ["Montclair", "Arbeck", "Lisole"]),
    ("Caldora", "Caldoran", "Central Bank of Caldora", "peso", ["Santavel", "Rio Ostra", "Maricel"]),
    ("Ambria", "Ambrian", "Ambrian Monetary Authority", "dollar", ["Port Ellis", "Kingsbay", "Ashford"]),
    ("Teluria", "Telurian", "Bank of Teluria", "mark", ["Brunow", "Celle", "Hartmund"]),
    ("Oskara", "Oskaran", "Oskara National Bank", "lira", ["Varos", "Tamlin", "Edessa"]),
    ("Pelagia", "Pelagian", "Pelagian Central Bank", "drachma", ["Nerite", "Thalos", "Coralis"]),
    ("Sunmar", "Sunmari", "Sunmar Reserve Bank", "rupee", ["Kesh", "Amarin", "Delvi"]),
]
SECTORS = ["banking", "software", "retail", "energy", "pharmaceuticals", "logistics", "telecoms", "mining"]
PRODUCTS = {
    "banking": "a mobile lending platform", "software": "a cloud accounting suite",
    "retail": "a same-day delivery service", "energy": "an offshore wind farm",
    "pharmaceuticals": "a new diabetes treatment", "logistics": "an automated freight hub",
    "telecoms": "a fibre network upgrade", "mining": "a copper mine expansion",
}
NAME_HEADS = ["Cor", "Vel", "Tam", "Ark", "Bel", "Dun", "Fen", "Gal", "Hol", "Ist", "Jor", "Kel", "Lum", "Mer",
              "Nor", "Orv", "Pra", "Quin", "Ros", "Sil", "Tor", "Ulm", "Var", "Wex", "Yor", "Zan"]
NAME_TAILS = ["vane", "dix", "ora", "ion", "mont", "ridge", "stone", "well", "tex", "gate", "field", "wick"]
SUFFIXES = ["Industries", "Holdings", "Group", "Systems", "Partners", "Corp", "Technologies", "Resources"]
FIRST = ["Jane", "Amir", "Lena", "Tomas", "Priya", "Marcus", "Ingrid", "Kofi", "Sofia", "Daniel", "Mei",
         "Rafael", "Elena", "Hugo", "Aisha", "Viktor", "Nadia", "Oscar", "Ruth", "Felix"]
LAST = ["Okafor", "Lindqvist", "Moreau", "Castellano", "Hayashi", "Brennan", "Novak", "Adeyemi", "Petrov",
        "Sandoval", "Keller", "Nakamura", "Ferreira", "Haddad", "Kowalski", "Osei", "Larsen", "Duarte"]


@dataclass
class Economy:
    name: str
    adjective: str
    bank: str
    currency: str
    cities: list[str]
    trend: float  # trend growth, % a year
    growth: list[float] = field(default_factory=list)  # real GDP growth per quarter, % a year
    inflation: list[float] = field(default_factory=list)  # % a year
    unemployment: list[float] = field(default_factory=list)  # %
    rate: list[float] = field(default_factory=list)  # policy rate after the quarter's decision, %
    move_bp: list[int] = field(default_factory=list)  # the decision: +50, +25, 0, -25


@dataclass
class Company:
    name: str
    ticker: str
    sector: str
    economy: int
    city: str
    ceo: str
    revenue: list[float] = field(default_factory=list)  # millions, per quarter
    margin: list[float] = field(default_factory=list)  # net margin, fraction
    eps: list[float] = field(default_factory=list)
    consensus: list[float] = field(default_factory=list)
    close: list[float] = field(default_factory=list)  # daily closes, all quarters back to back
    returns: list[float] = field(default_factory=list)  # daily simple returns, fraction

    def outcome(self, q: int) -> str:
        """beat | miss | inline: the earnings rule."""
        surprise = (self.eps[q] - self.consensus[q]) / abs(self.consensus[q])
        return "beat" if surprise > BEAT_BAND else "miss" if surprise < -BEAT_BAND else "inline"


def policy_move(inflation: float, growth: float) -> int:
    """The central-bank band rule, in basis points."""
    gap = inflation - TARGET_INFLATION
    if gap > 2.0:
        return 50
    if gap > 0.5:
        return 25
    if gap < -0.5 or growth < 0.0:
        return -25
    return 0


class World:
    """A consistent world drawn from `seed`; see the module docstring for its rules."""

    def __init__(self, cfg: WorldConfig, seed: int = 0):
        if cfg.economies > len(ECONOMIES):
            raise ValueError(f"world: economies must be <= {len(ECONOMIES)}; got {cfg.economies}")
        self.cfg = cfg
        self.rng = random.Random(seed)
        self.economies = [self._simulate_economy(*spec) for spec in ECONOMIES[: cfg.economies]]
        self.companies = self._make_companies()
        self._simulate_prices()

    @property
    def days(self) -> int:
        return self.cfg.quarters * self.cfg.days_per_quarter

    def day(self, q: int, d: int) -> int:
        return q * self.cfg.days_per_quarter + d

    def _simulate_economy(self, name, adjective, bank, currency, cities) -> Economy:
        r = self.rng
        eco = Economy(name, adjective, bank, currency, cities, trend=round(r.uniform(1.0, 3.0), 1))
        g, p, rate = eco.trend, TARGET_INFLATION + r.uniform(-1.5, 2.5), r.uniform(1.0, 4.0)
        for _ in range(self.cfg.quarters):
            g = round(eco.trend + 0.6 * (g - eco.trend) + r.gauss(0, 1.2), 1)
            p = round(max(-1.0, 0.75 * p + 0.25 * TARGET_INFLATION + 0.2 * (g - eco.trend) + r.gauss(0, 0.8)), 1)
            move = policy_move(p, g)
            # No floor: the rule is the rule, and negative policy rates exist.
            rate = round(rate + move / 100, 2)
            eco.growth.append(g)
            eco.inflation.append(p)
            eco.unemployment.append(round(max(2.0, 6.0 - 0.5 * (g - eco.trend) + r.gauss(0, 0.3)), 1))
            eco.rate.append(rate)
            eco.move_bp.append(move)
        return eco

    def _make_companies(self) -> list[Company]:
        r, names, tickers, companies = self.rng, set(), set(), []
        while len(companies) < self.cfg.companies:
            stem = r.choice(NAME_HEADS) + r.choice(NAME_TAILS)
            name = f"{stem} {r.choice(SUFFIXES)}"
            ticker = (stem[:3] + stem[-1]).upper()
            if stem in names or ticker in tickers:
                continue
            names.add(stem)
            tickers.add(ticker)
            e = len(companies) % len(self.economies)
            c = Company(name, ticker, r.choice(SECTORS), e, r.choice(self.economies[e].cities),
                        f"{r.choice(FIRST)} {r.choice(LAST)}")
            revenue, margin = r.uniform(200, 5000), r.uniform(0.04, 0.2)
            shares = r.uniform(50, 400)
            for q in range(self.cfg.quarters):
                revenue *= 1 + (self.economies[e].growth[q] + r.gauss(0, 4)) / 400
                margin = min(0.35, max(0.01, margin + r.gauss(0, 0.01)))
                eps = revenue * margin / shares
                c.revenue.append(round(revenue, 1))
                c.margin.append(round(margin, 3))
                c.eps.append(round(eps, 2))
                # Consensus is unbiased but noisy, so beats, misses and in-line quarters all occur.
                c.consensus.append(round(max(0.01, eps * (1 + r.gauss(0, 0.06))), 2))
            companies.append(c)
        return companies

    def _simulate_prices(self) -> None:
        r, cfg = self.rng, self.cfg
        vols = [r.uniform(0.008, 0.02) for _ in self.companies]
        for c in self.companies:
            c.close.append(round(r.uniform(10, 200), 2))
        for q in range(cfg.quarters):
            for d in range(cfg.days_per_quarter):
                factor = [r.gauss(0, 0.006) for _ in self.economies]
                for c, vol in zip(self.companies, vols):
                    eco = self.economies[c.economy]
                    past = sum(c.returns[-MOMENTUM_WINDOW:])
                    drift = 0.85 * vol * ((past > 0) - (past < 0))
                    ret = drift + factor[c.economy] + r.gauss(0, vol)
                    if d == EARNINGS_DAY:
                        ret += {"beat": 0.04, "miss": -0.04, "inline": 0.0}[c.outcome(q)]
                    if d == DECISION_DAY:
                        ret -= 0.06 * eco.move_bp[q] / 100
                    c.returns.append(ret)
                    c.close.append(round(c.close[-1] * (1 + ret), 2))
        for c in self.companies:
            c.close = c.close[1:]

    def momentum_sign(self, c: Company, day: int) -> int:
        """+1 or -1: the sign of the last MOMENTUM_WINDOW returns' sum up to and including `day`."""
        past = sum(c.returns[day - MOMENTUM_WINDOW + 1 : day + 1])
        return 1 if past > 0 else -1
