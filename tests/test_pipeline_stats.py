"""The results table's statistics: per-item statistics give back every metric, the percentile
interval and the paired bootstrap against cases worked out by hand, seeds drawn as well as
items, the collapse flag, the majority-class row and the routing-specialisation numbers."""
import math
import random

import pytest
import torch

from finteam import metrics, report, stats


def random_case(metric: str, n: int, rng: random.Random):
    if metric in ("classification", "movement"):
        choices = ["Rise", "Fall"] if metric == "movement" else ["positive", "negative", "neutral"]
        return [rng.choice(choices) for _ in range(n)], [rng.choice(choices) for _ in range(n)], choices
    if metric == "entities":
        names = ["a, ORG", "b, PER", "c, LOC", "d, ORG"]
        pick = lambda: "\n".join(rng.sample(names, rng.randrange(3))) or "None"  # noqa: E731
        return [pick() for _ in range(n)], [pick() for _ in range(n)], []
    return [f"{rng.choice([1.0, 1.5, 2.25, 3.0]):.2f}" for _ in range(n)], [f"{rng.choice([1.0, 1.5]):.2f}" for _ in range(n)], []


@pytest.mark.parametrize("metric", ["classification", "movement", "entities", "numeric"])
@pytest.mark.parametrize("n", [1, 7, 200])  # one item (degenerate confusion), a few, many
def test_metrics_from_summed_item_stats_equal_the_plain_metrics(metric, n):
    rng = random.Random(n)
    for _ in range(5):
        pred, gold, choices = random_case(metric, n, rng)
        S = metrics.item_stats(metric, pred, gold, metrics.label_space(choices, pred, gold), 0.01)
        got = metrics.from_stats(metric, S.sum(0, keepdim=True), torch.tensor([float(n)]))
        want = metrics.score(metric, pred, gold, choices, 0.01)
        assert set(got) == set(want)
        for k in want:
            assert got[k].item() == pytest.approx(want[k], abs=1e-12), (k, pred, gold)


def test_weighted_stats_equal_the_metric_on_the_repeated_items():
    # A replicate that draws item 0 twice, item 1 once and item 2 never is the metric on items [0, 0, 1].
    pred, gold = ["Rise", "Fall", "Rise"], ["Rise", "Rise", "Fall"]
    S = metrics.item_stats("movement", pred, gold, ["Rise", "Fall"], 0.01)
    got = metrics.from_stats("movement", torch.tensor([[2.0, 1.0, 0.0]], dtype=torch.float64) @ S, torch.tensor([3.0]))
    want = metrics.score("movement", ["Rise", "Rise", "Fall"], ["Rise", "Rise", "Rise"], ["Rise", "Fall"], 0.01)
    assert got["acc"].item() == pytest.approx(want["acc"]) and got["mcc"].item() == pytest.approx(want["mcc"])


def test_percentile_interval_by_hand():
    # 0..99: the 2.5% quantile sits at rank 0.025 * 99 = 2.475, between 2 and 3; the 97.5% one
    # at 96.525, between 96 and 97 (linear interpolation, as numpy's default).
    low, high = stats.percentile_interval(torch.arange(100.0))
    assert low == pytest.approx(2.475) and high == pytest.approx(96.525)
    assert stats.percentile_interval(torch.tensor([5.0, 1.0, 3.0]), 0.5) == pytest.approx((2.0, 4.0))
    with pytest.raises(ValueError, match="level must be in"):
        stats.percentile_interval(torch.arange(3.0), 1.0)


def test_resample_counts_draw_n_items_with_replacement():
    counts = stats.resample_counts(5, 1000, torch.Generator().manual_seed(0))
    assert counts.shape == (1000, 5) and (counts.sum(1) == 5).all()
    assert counts.mean().item() == pytest.approx(1.0, abs=0.05)  # each item drawn once on average
    # two items: the replicate holds both (counts 1, 1) half the time, by hand
    two = stats.resample_counts(2, 20000, torch.Generator().manual_seed(1))
    assert (two[:, 0] == 1).double().mean().item() == pytest.approx(0.5, abs=0.015)


def accuracy_case(n: int, p_team: float, p_base: float, seed: int = 0):
    rng = random.Random(seed)
    gold = [rng.choice(["Yes", "No"]) for _ in range(n)]
    flip = lambda g: "No" if g == "Yes" else "Yes"  # noqa: E731
    team = [g if rng.random() < p_team else flip(g) for g in gold]
    base = [g if rng.random() < p_base else flip(g) for g in gold]
    return gold, team, base


def test_interval_of_an_accuracy_matches_the_normal_approximation():
    # n = 2000 items, accuracy a: the bootstrap interval approaches a +- 1.96 sqrt(a (1 - a) / n).
    gold, team, base = accuracy_case(2000, 0.7, 0.6)
    tasks = {"h": {"metric": "classification", "choices": ["Yes", "No"], "gold": gold}}
    boot = stats.Bootstrap(tasks, {"team": [{"h": team}], "base": [{"h": base}]}, 0.01, reps=4000, seed=0)
    summary = stats.summarise(boot, ["team", "base"], "team")
    a = metrics.accuracy(team, gold)
    half = 1.96 * math.sqrt(a * (1 - a) / len(gold))
    # the headline metric of a 2-label classification task is weighted F1; accuracy is reported
    # through from_stats, so check the interval of the accuracy replicates directly
    S = boot.stats["team"]["h"][0]
    acc_R = metrics.from_stats("classification", boot.counts["h"] @ S, boot.counts["h"].sum(1))["acc"]
    low, high = stats.percentile_interval(acc_R)
    assert low == pytest.approx(a - half, abs=0.004) and high == pytest.approx(a + half, abs=0.004)
    assert summary["scores"]["team"]["h"]["low"] < summary["scores"]["team"]["h"]["value"] < summary["scores"]["team"]["h"]["high"]


def test_paired_difference_matches_the_hand_formula_and_is_narrower_than_unpaired():
    # Numeric task: per-item hits, so the score is a mean and the paired difference of two
    # models is the mean of d_i = team_i - base_i: interval d +- 1.96 sd(d) / sqrt(n).
    rng = random.Random(3)
    n = 1500
    gold = [f"{rng.randrange(100)}.00" for _ in range(n)]
    base_hit = [rng.random() < 0.5 for _ in range(n)]
    team_hit = [b or rng.random() < 0.2 for b in base_hit]  # the team gets what base gets, and more
    team = [g if h else "-1" for g, h in zip(gold, team_hit)]
    base = [g if h else "-1" for g, h in zip(gold, base_hit)]
    tasks = {"q": {"metric": "numeric", "choices": [], "gold": gold}}
    boot = stats.Bootstrap(tasks, {"team": [{"q": team}], "base": [{"q": base}]}, 0.01, reps=4000, seed=1)
    summary = stats.summarise(boot, ["team", "base"], "team")
    d = torch.tensor([float(t) - float(b) for t, b in zip(team_hit, base_hit)], dtype=torch.float64)
    half = 1.96 * d.std().item() / math.sqrt(n)
    cell = summary["paired"]["base"]["q"]
    assert cell["value"] == pytest.approx(d.mean().item())
    assert cell["low"] == pytest.approx(d.mean().item() - half, abs=0.004)
    assert cell["high"] == pytest.approx(d.mean().item() + half, abs=0.004)
    unpaired = [summary["scores"][m]["q"]["high"] - summary["scores"][m]["q"]["low"] for m in ("team", "base")]
    assert cell["high"] - cell["low"] < math.sqrt(sum(w**2 for w in unpaired))  # pairing removes the shared noise
    assert summary["paired"]["base"]["mean"]["value"] == pytest.approx(cell["value"])  # one task: mean = that task


def test_seeds_are_drawn_too():
    # Two seeds that disagree completely: one gets everything right, the other nothing. The
    # point is 0.5; the interval spans what drawing seeds gives: both seeds the same (0 or 1) a
    # quarter of the time each, so the 2.5% and 97.5% quantiles are 0 and 1.
    gold = ["1.00"] * 50
    tasks = {"q": {"metric": "numeric", "choices": [], "gold": gold}}
    boot = stats.Bootstrap(tasks, {"m": [{"q": gold}, {"q": ["0"] * 50}]}, 0.01, reps=2000, seed=0)
    cell = stats.summarise(boot, ["m"], "m")["scores"]["m"]["q"]
    assert cell["value"] == pytest.approx(0.5) and cell["seeds"] == [1.0, 0.0]
    assert cell["low"] == 0.0 and cell["high"] == 1.0


def test_collapse_flag_and_majority_answers():
    meta = {"movement": {"choices": ["Rise", "Fall"]}, "numeric": {"choices": []}}
    predictions = {
        "team": [{"movement": ["Rise"] * 91 + ["Fall"] * 9, "numeric": ["1"] * 100},  # 91%: collapsed
                 {"movement": ["Rise"] * 90 + ["Fall"] * 10, "numeric": ["1"] * 100}],  # exactly 90%: not
        "dense": [{"movement": ["Rise", "Fall"] * 50, "numeric": ["1"] * 100}] * 2,
    }
    flags = report.collapsed(predictions, meta)
    assert flags == {"team": {"movement": [(0, "Rise", 0.91)]}}  # a number task answering "1" is not flagged
    assert metrics.majority_answers(["No", "Yes", "No"]) == ["No"] * 3
    assert metrics.score("movement", metrics.majority_answers(["Fall", "Rise", "Fall"]), ["Fall", "Rise", "Fall"],
                         ["Rise", "Fall"], 0.01)["mcc"] == 0.0


def test_routing_specialisation_numbers():
    meta = {"headlines": {"role": "macro"}, "numeric": {"role": "quant"}}
    table = {"headlines": [[0.5, 0.25, 0.25], [0.5, 0.5, 0.0]],  # TV from 1/3: 1/6, then 1/3
             "numeric": [[1 / 3, 1 / 3, 1 / 3], [1 / 3, 1 / 3, 1 / 3]]}
    spec = report.routing_specialisation(table, meta, ["macro", "micro", "quant"])
    assert spec["headlines"]["distance"] == pytest.approx((1 / 6 + 1 / 3) / 2)
    assert spec["headlines"]["role_share"] == pytest.approx(0.5) and spec["headlines"]["role_top"]
    assert spec["numeric"]["distance"] == pytest.approx(0.0) and not spec["numeric"]["role_top"]  # a tie goes to macro
    assert "| headlines | macro | 0.250, 0.50, macro * |" in report.specialisation_table([spec])
