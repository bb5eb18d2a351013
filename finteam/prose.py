"""Words for the synthetic world: the three role corpora and the five instruction tasks.

Corpora (each document drawn from several templates, with varied wording and clause order):
  macro  rate-decision statements, growth/jobs reports, inflation releases, rule explainers
  micro  earnings reports, earnings previews, company news (CEO, city, product), reactions
  quant  market commentary with computed statistics: returns, volatility, moving averages,
         momentum streaks and what followed, correlations between tickers, price tables

Tasks, in the forms of the public financial benchmarks (FinBen/PIXIU conversation form):
  sentiment  (micro)  news sentence -> positive/negative/neutral    (like Financial PhraseBank)
  headlines  (macro)  macro headline -> will the bank raise? Yes/No  (like the gold-news task)
  ner        (micro)  sentence -> "name, PER|ORG|LOC" lines          (like FinBen NER)
  numeric    (quant)  price table + question -> number              (like FinQA/ConvFinQA)
  movement   (quant)  last five returns + news -> Rise/Fall          (like BigData22/ACL18)
"""
from __future__ import annotations

import random

from .progress import log
from .synthetic import DECISION_DAY, EARNINGS_DAY, MOMENTUM_WINDOW, PRODUCTS, TARGET_INFLATION, Company, World, policy_move

TASKS = {
    # name: (metric, role the world's rules make it lean on, label choices for scoring)
    "sentiment": ("classification", "micro", ["positive", "negative", "neutral"]),
    "headlines": ("classification", "macro", ["Yes", "No"]),
    "ner": ("entities", "micro", []),
    "numeric": ("numeric", "quant", []),
    "movement": ("movement", "quant", ["Rise", "Fall"]),
}


def pct(x: float) -> str:
    return f"{x:.1f}%"


def signed(x: float) -> str:
    return f"{x * 100:+.1f}%"


def pick(r: random.Random, *options: str) -> str:
    return r.choice(options)


# --- macro --------------------------------------------------------------------------------------


def decision_statement(w: World, r: random.Random, e: int, q: int) -> str:
    eco = w.economies[e]
    move, infl, g = eco.move_bp[q], eco.inflation[q], eco.growth[q]
    verb = {50: "raised", 25: "raised", 0: "held", -25: "cut"}[move]
    if move > 0:
        why = f"inflation of {pct(infl)} {pick(r, 'is well above', 'runs above', 'exceeds')} the {pct(TARGET_INFLATION)} target"
    elif move < 0:
        why = (f"inflation of {pct(infl)} sits below the target" if infl < TARGET_INFLATION - 0.5
               else f"the economy contracted at {pct(g)}")
    else:
        why = f"inflation of {pct(infl)} is close to the {pct(TARGET_INFLATION)} target"
    size = f" by {abs(move)} basis points" if move else ""
    opening = pick(
        r,
        f"The {eco.bank} {verb} its policy rate{size} to {eco.rate[q]:.2f}% in quarter {q + 1}.",
        f"In quarter {q + 1} the {eco.bank} {verb} the policy rate{size}, leaving it at {eco.rate[q]:.2f}%.",
        f"Policy rate {verb}{size}: the {eco.bank} now sets {eco.rate[q]:.2f}% (quarter {q + 1}).",
    )
    body = pick(
        r,
        f"The decision reflects that {why}.",
        f"Members noted that {why}, and acted under the bank's usual rule.",
        f"Because {why}, the council saw the move as required.",
    )
    tail = pick(
        r,
        f"Growth was {pct(g)} and unemployment {pct(eco.unemployment[q])}.",
        f"The {eco.adjective} economy grew {pct(g)} with unemployment at {pct(eco.unemployment[q])}.",
        f"The {eco.currency} {pick(r, 'firmed', 'steadied')} after the announcement." if move > 0
        else f"The {eco.currency} {pick(r, 'slipped', 'eased')} after the announcement." if move < 0
        else f"Markets in {eco.cities[0]} took the decision calmly.",
    )
    return " ".join([opening, body, tail])


def economic_report(w: World, r: random.Random, e: int, q: int) -> str:
    eco = w.economies[e]
    trend = "above" if eco.growth[q] > eco.trend else "below"
    return pick(
        r,
        f"{eco.name} economic report, quarter {q + 1}: output grew {pct(eco.growth[q])} at an annual pace, "
        f"{trend} its trend of {pct(eco.trend)}. Unemployment stood at {pct(eco.unemployment[q])} and "
        f"consumer prices rose {pct(eco.inflation[q])}.",
        f"The {eco.adjective} statistics office said inflation was {pct(eco.inflation[q])} in quarter {q + 1}, "
        f"against the {eco.bank}'s {pct(TARGET_INFLATION)} target, while the jobless rate was "
        f"{pct(eco.unemployment[q])}. Growth came in at {pct(eco.growth[q])}.",
        f"Quarter {q + 1} in {eco.name}: GDP {pct(eco.growth[q])}, CPI {pct(eco.inflation[q])}, unemployment "
        f"{pct(eco.unemployment[q])}. Economists in {r.choice(eco.cities)} said growth was {trend} trend.",
    )


def rule_explainer(w: World, r: random.Random, e: int, q: int) -> str:
    eco = w.economies[e]
    return pick(
        r,
        f"How the {eco.bank} sets rates: when inflation runs more than half a point above the "
        f"{pct(TARGET_INFLATION)} target it raises by 25 basis points, and by 50 when inflation is more than "
        f"two points above. When inflation is more than half a point below target, or output shrinks, it cuts "
        f"by 25. Otherwise it holds.",
        f"Analysts in {r.choice(eco.cities)} expect the {eco.bank} to follow its rule: with inflation at "
        f"{pct(eco.inflation[q])} the rule points to "
        f"{ {50: 'a 50 basis point hike', 25: 'a 25 basis point hike', 0: 'no change', -25: 'a 25 basis point cut'}[eco.move_bp[q]] }.",
        f"Inflation of {pct(eco.inflation[q])} against a {pct(TARGET_INFLATION)} target means the {eco.bank} "
        f"{ {50: 'will hike sharply', 25: 'will raise rates', 0: 'will stay on hold', -25: 'will lower rates'}[eco.move_bp[q]] }, "
        f"strategists wrote, citing the bank's band rule.",
    )


# --- micro --------------------------------------------------------------------------------------


def earnings_report(w: World, r: random.Random, c: Company, q: int) -> str:
    outcome = c.outcome(q)
    verdict = {"beat": pick(r, "beating", "topping", "ahead of"),
               "miss": pick(r, "missing", "short of", "below"),
               "inline": pick(r, "in line with", "matching", "close to")}[outcome]
    return pick(
        r,
        f"{c.name} ({c.ticker}) reported quarter {q + 1} earnings of {c.eps[q]:.2f} per share, {verdict} the "
        f"consensus of {c.consensus[q]:.2f}. Revenue was {c.revenue[q]:.1f} million with a net margin of "
        f"{c.margin[q] * 100:.1f}%.",
        f"Quarter {q + 1} results: {c.ticker} earned {c.eps[q]:.2f} a share against expectations of "
        f"{c.consensus[q]:.2f}, {verdict} forecasts. Sales reached {c.revenue[q]:.1f} million.",
        f"The {c.sector} group {c.name} posted revenue of {c.revenue[q]:.1f} million and EPS of {c.eps[q]:.2f} "
        f"for quarter {q + 1}, {verdict} the {c.consensus[q]:.2f} analysts had pencilled in.",
    )


def earnings_reaction(w: World, r: random.Random, c: Company, q: int) -> str:
    day = w.day(q, EARNINGS_DAY)
    ret = c.returns[day]
    outcome = c.outcome(q)
    cause = {"beat": "results that beat expectations", "miss": "results that missed expectations",
             "inline": "results in line with expectations"}[outcome]
    move = "rose" if ret > 0 else "fell"
    return pick(
        r,
        f"Shares of {c.name} {move} {abs(ret) * 100:.1f}% to {c.close[day]:.2f} after {cause}.",
        f"{c.ticker} {move} {abs(ret) * 100:.1f}% on results day: investors reacted to {cause}.",
        f"After {cause}, {c.ticker} closed at {c.close[day]:.2f}, {signed(ret)} on the day.",
    )


def company_news(w: World, r: random.Random, c: Company, q: int) -> str:
    eco = w.economies[c.economy]
    return pick(
        r,
        f"{c.ceo}, chief executive of {c.name}, said in {c.city} that the company will invest in "
        f"{PRODUCTS[c.sector]}.",
        f"{c.name}, the {eco.adjective} {c.sector} company based in {c.city}, named {c.ceo} as chief executive.",
        f"In {c.city}, {c.name} chief executive {c.ceo} told investors that {PRODUCTS[c.sector]} would "
        f"support growth.",
        f"Analysts expect {c.name} to earn {c.consensus[q]:.2f} per share in quarter {q + 1}, "
        f"{c.ceo} said demand in {eco.name} remained steady.",
    )


def company_visit(w: World, r: random.Random, c: Company) -> str:
    """A place and a partner that the world does not tie to the company, each named twice: the
    second mention can only be predicted by copying the first from the context (the ner task
    asks for exactly that: names as the sentence gives them, not as the world has them)."""
    eco = w.economies[c.economy]
    city = r.choice([x for x in eco.cities if x != c.city] or eco.cities)
    o = r.choice([x for x in w.companies if x is not c])
    return pick(
        r,
        f"{c.ceo} of {c.name} visited {city} this week. In {city}, {c.ceo} met {o.ceo} of {o.name}, and "
        f"{o.name} agreed to buy {PRODUCTS[c.sector]} from {c.name}.",
        f"{c.name} will supply {o.name} from a new plant in {city}. The {city} plant is the first that "
        f"{c.name} runs for {o.name}, {c.ceo} said.",
        f"In {city}, {o.ceo}, chief executive of {o.name}, joined the board of {c.name}. {o.ceo} stays at "
        f"{o.name} and will advise {c.name} from {city}.",
    )


# --- quant --------------------------------------------------------------------------------------


def market_commentary(w: World, r: random.Random, c: Company, day: int) -> str:
    closes = c.close[day - 4 : day + 1]
    mean = sum(closes) / len(closes)
    rets = c.returns[day - 4 : day + 1]
    vol = (sum((x - sum(rets) / 5) ** 2 for x in rets) / 4) ** 0.5
    return pick(
        r,
        f"{c.ticker} closed at {closes[-1]:.2f}, against a 5-day average of {mean:.2f}; daily volatility over "
        f"the week was {vol * 100:.2f}% and the 5-day return {sum(rets) * 100:+.1f}%.",
        f"Over five sessions {c.ticker} moved from {closes[0]:.2f} to {closes[-1]:.2f}, a range of "
        f"{min(closes):.2f} to {max(closes):.2f} with a mean close of {mean:.2f}.",
        f"Quant desk: {c.ticker} 5-day mean {mean:.2f}, last {closes[-1]:.2f}, standard deviation of returns "
        f"{vol * 100:.2f}%.",
    )


def momentum_note(w: World, r: random.Random, c: Company, day: int) -> str:
    rets = c.returns[day - MOMENTUM_WINDOW + 1 : day + 1]
    ups = sum(x > 0 for x in rets)
    nxt = c.returns[day + 1]
    went = "gained" if nxt > 0 else "lost"
    trend = "up" if w.momentum_sign(c, day) > 0 else "down"
    return pick(
        r,
        f"{c.ticker} rose in {ups} of the last {MOMENTUM_WINDOW} sessions for a 5-day return of "
        f"{sum(rets) * 100:+.1f}%; the next session it {went} {abs(nxt) * 100:.1f}%.",
        f"Momentum check on {c.ticker}: returns {', '.join(signed(x) for x in rets)}. The trend was {trend}, "
        f"and the following day the stock {went} {abs(nxt) * 100:.1f}%.",
        f"With a 5-day return of {sum(rets) * 100:+.1f}%, {c.ticker} {'extended' if (nxt > 0) == (trend == 'up') else 'broke'} "
        f"its {trend} trend the next day ({signed(nxt)}). Trends here persist about four days in five.",
    )


def correlation_note(w: World, r: random.Random, c: Company, day: int) -> str:
    peers = [o for o in w.companies if o is not c]
    o = r.choice(peers)
    a, b = c.returns[max(0, day - 19) : day + 1], o.returns[max(0, day - 19) : day + 1]
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    corr = cov / ((sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b)) ** 0.5 + 1e-12)
    same = "share an economy" if o.economy == c.economy else "trade in different economies"
    return (f"The 20-day correlation of daily returns between {c.ticker} and {o.ticker} was {corr:.2f}; "
            f"the two {same}.")


# --- corpora ------------------------------------------------------------------------------------


def role_document(w: World, r: random.Random, role: str) -> str:
    cfg = w.cfg
    q = r.randrange(cfg.quarters)
    if role == "macro":
        e = r.randrange(len(w.economies))
        return r.choice([decision_statement, decision_statement, economic_report, rule_explainer])(w, r, e, q)
    c = r.choice(w.companies)
    if role == "micro":
        # r.random() only where copy documents are asked for, so that the corpora stay as they were otherwise
        if cfg.copy_docs > 0 and r.random() < cfg.copy_docs:
            return company_visit(w, r, c)
        return r.choice([earnings_report, earnings_report, earnings_reaction, company_news])(w, r, c, q)
    day = r.randrange(MOMENTUM_WINDOW + 20, w.days - 1)
    return r.choice([market_commentary, momentum_note, momentum_note, correlation_note])(w, r, c, day)


def corpus(w: World, role: str, seed: int) -> list[str]:
    """`docs_per_role` documents for one role; a few documents are joined per entry so that
    packed sequences read like reports rather than one-liners."""
    r = random.Random(f"{seed}-{role}")
    return [" ".join(role_document(w, r, role) for _ in range(r.randint(1, 3))) for _ in range(w.cfg.docs_per_role)]


# --- tasks --------------------------------------------------------------------------------------


def sentiment_example(w: World, r: random.Random) -> tuple[str, str]:
    c, q = r.choice(w.companies), r.randrange(w.cfg.quarters)
    if r.random() < 0.2:
        # News without results carries no sentiment, as in PhraseBank's many neutral sentences.
        text, label = company_news(w, r, c, q), "neutral"
    else:
        label = {"beat": "positive", "miss": "negative", "inline": "neutral"}[c.outcome(q)]
        text = pick(
            r,
            f"{c.name} reported earnings of {c.eps[q]:.2f} per share against a consensus of {c.consensus[q]:.2f}.",
            f"{c.ticker} posted quarterly EPS of {c.eps[q]:.2f}; analysts had expected {c.consensus[q]:.2f}.",
            earnings_report(w, r, c, q),
        )
    prompt = ("Analyze the sentiment of this statement extracted from a financial news article. "
              f"Provide your answer as either negative, positive or neutral.\nText: {text}\nAnswer:")
    return prompt, label


def headline_example(w: World, r: random.Random) -> tuple[str, str]:
    """The world's own quarters give too few distinct items (economies x quarters, about 240 in
    the tiny world) for a test set that can tell models apart, so half the headlines quote
    numbers drawn for the occasion; the label is the same band rule applied to them."""
    e, q = r.randrange(len(w.economies)), r.randrange(w.cfg.quarters)
    eco = w.economies[e]
    infl, growth = eco.inflation[q], eco.growth[q]
    if r.random() < 0.5:
        infl, growth = round(r.uniform(-0.5, 5.5), 1), round(r.uniform(-2.0, 4.5), 1)
    headline = pick(
        r,
        f"{eco.name} inflation at {pct(infl)} in quarter {q + 1}; growth {pct(growth)}",
        f"{eco.adjective} consumer prices {'up' if infl >= 0 else 'down'} {pct(abs(infl))} "
        f"on the year in quarter {q + 1} as output changes {pct(growth)}",
        f"{eco.name} CPI {pct(infl)}, GDP {pct(growth)}: {eco.bank} decision due",
    )
    prompt = (f"Headline: \"{headline}\"\nNow answer this question: Does the news headline imply that the "
              f"{eco.bank} will raise its policy rate? Answer Yes or No.\nAnswer:")
    return prompt, "Yes" if policy_move(infl, growth) > 0 else "No"


def ner_example(w: World, r: random.Random) -> tuple[str, str]:
    c, o = r.sample(w.companies, 2)
    eco = w.economies[c.economy]
    city = r.choice(eco.cities)
    forms = [
        (f"{c.ceo}, chief executive of {c.name}, said in {city} that "
         f"{pick(r, 'orders improved', 'margins held up', 'demand slowed', 'costs rose', 'hiring would continue')}.",
         [(c.ceo, "PER"), (c.name, "ORG"), (city, "LOC")]),
        (f"{c.name} agreed a credit facility with the {eco.bank} in {eco.name}.",
         [(c.name, "ORG"), (eco.bank, "ORG"), (eco.name, "LOC")]),
        (f"The borrower, {c.name}, appointed {c.ceo} as its representative.",
         [(c.name, "ORG"), (c.ceo, "PER")]),
        (f"{c.name} will {pick(r, 'supply', 'partner with', 'acquire a stake in', 'license software to')} {o.name} "
         f"from its {pick(r, 'plant', 'office', 'headquarters')} in {city}.",
         [(c.name, "ORG"), (o.name, "ORG"), (city, "LOC")]),
        (f"Under the agreement, {o.ceo} of {o.name} joins the board of {c.name}.",
         [(o.ceo, "PER"), (o.name, "ORG"), (c.name, "ORG")]),
        (f"The lenders, led by {c.name}, may assign their rights to {o.name}.",
         [(c.name, "ORG"), (o.name, "ORG")]),
        (f"Notices to the guarantor shall be sent to {c.ceo} in {city}, {eco.name}.",
         [(c.ceo, "PER"), (city, "LOC"), (eco.name, "LOC")]),
        ("The parties agree that interest accrues daily on the outstanding amount.", []),
    ]
    text, ents = r.choice(forms)
    if ents and r.random() < 0.5:
        lead = pick(r, "According to the filing, ", "In a statement, ", "On Monday, ")
        first, rest = text.split(" ", 1)
        text = lead + (first.lower() if first in ("The", "Notices", "Under") else first) + " " + rest
    prompt = ("Identify the named entities in the sentence below that are a person (PER), an organization "
              "(ORG) or a location (LOC). Answer with one 'entity name, entity type' per line, or 'None'.\n"
              f"Text: {text}\nAnswer:")
    return prompt, "\n".join(f"{name}, {kind}" for name, kind in ents) or "None"


def numeric_example(w: World, r: random.Random) -> tuple[str, str]:
    c = r.choice(w.companies)
    day = r.randrange(5, w.days)
    closes = c.close[day - 5 : day]
    table = "\n".join(f"| day {i + 1} | {x:.2f} |" for i, x in enumerate(closes))
    kind = r.randrange(3)
    if kind == 0:
        n = r.randrange(5)
        question, answer = f"What was the closing price on day {n + 1}?", closes[n]
    elif kind == 1:
        question, answer = "What was the highest closing price?", max(closes)
    else:
        question, answer = "By how much did the closing price change from day 1 to day 5?", closes[4] - closes[0]
    prompt = f"Closing prices of {c.ticker}:\n| day | close |\n{table}\nQuestion: {question}\nAnswer:"
    return prompt, f"{answer:.2f}"


def movement_example(w: World, r: random.Random) -> tuple[str, str]:
    c = r.choice(w.companies)
    # Skip event days: the label should follow the world's momentum rule plus noise, not a jump.
    q = r.randrange(w.cfg.quarters)
    d = r.choice([x for x in range(MOMENTUM_WINDOW, w.cfg.days_per_quarter - 1) if x + 1 not in (EARNINGS_DAY, DECISION_DAY)])
    day = w.day(q, d)
    rets = ", ".join(signed(x) for x in c.returns[day - MOMENTUM_WINDOW + 1 : day + 1])
    prompt = (f"Daily returns of {c.ticker} over the last five sessions: {rets}. Based on this price history, "
              "will the stock rise or fall on the next trading day? Answer Rise or Fall.\nAnswer:")
    return prompt, "Rise" if c.returns[day + 1] > 0 else "Fall"


MAKERS = {"sentiment": sentiment_example, "headlines": headline_example, "ner": ner_example,
          "numeric": numeric_example, "movement": movement_example}


def split_sizes(n: int) -> dict[str, int]:
    """Distinct prompts per split for `n` examples per task: 80/10/10 train/valid/test."""
    return {"train": n - 2 * (n // 10), "valid": n // 10, "test": n // 10}


def tasks(w: World, seed: int) -> dict[str, list[dict]]:
    """train/valid/test example lists (80/10/10 per task) in the FinBen conversation form. The
    test split is drawn first, then valid, then train, each until it holds its full count of
    prompts no other split holds, so test prompts are never seen in training and a test set of
    500 holds 500 distinct items. A split whose task runs out of new instances keeps what it
    found, and says so."""
    splits: dict[str, list[dict]] = {"train": [], "valid": [], "test": []}
    for name, make in MAKERS.items():
        r = random.Random(f"{seed}-task-{name}")
        seen: set[str] = set()
        i = 0
        for split, want in reversed(split_sizes(w.cfg.examples_per_task).items()):
            got, tries = 0, 0
            while got < want and tries < 50 * want:
                prompt, answer = make(w, r)
                tries += 1
                if prompt in seen:
                    continue
                seen.add(prompt)
                splits[split].append({
                    "id": f"{name}{i}", "task": name, "label": answer,
                    "conversations": [{"from": "human", "value": prompt}, {"from": "agent", "value": answer}],
                })
                got, i = got + 1, i + 1
            if got < want:
                log(f"data  {name}: only {got} distinct {split} prompts of {want} (the world is too small for more)")
    return splits
