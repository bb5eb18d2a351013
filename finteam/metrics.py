"""The metrics the financial benchmarks report, as plain functions of predictions and labels.

  classification  accuracy and weighted F1 (per-class F1 weighted by support, as FinBen and
                  scikit-learn's f1_score(average="weighted") compute it)
  entities        entity-level F1 over (name, type) pairs, micro-averaged over examples
  numeric         exact match with a relative tolerance (FinQA-style: 1.5 matches 1.50)
  movement        accuracy and Matthews correlation (MCC) of Rise/Fall
"""
from __future__ import annotations

import math
import re
from collections import Counter

import torch

NUMBER = re.compile(r"-?\d[\d,]*\.?\d*|-?\.\d+")


def accuracy(pred: list[str], gold: list[str]) -> float:
    return sum(p == g for p, g in zip(pred, gold)) / len(gold) if gold else 0.0


def weighted_f1(pred: list[str], gold: list[str]) -> float:
    support = Counter(gold)
    total = 0.0
    for label, n in support.items():
        tp = sum(p == g == label for p, g in zip(pred, gold))
        predicted = sum(p == label for p in pred)
        precision = tp / predicted if predicted else 0.0
        recall = tp / n
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        total += f1 * n
    return total / len(gold) if gold else 0.0


def mcc(pred: list[str], gold: list[str], positive: str) -> float:
    tp = sum(p == positive and g == positive for p, g in zip(pred, gold))
    tn = sum(p != positive and g != positive for p, g in zip(pred, gold))
    fp = sum(p == positive and g != positive for p, g in zip(pred, gold))
    fn = sum(p != positive and g == positive for p, g in zip(pred, gold))
    denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / denom if denom else 0.0


def parse_entities(text: str) -> set[tuple[str, str]]:
    """'name, TYPE' lines -> {(name, TYPE)}; 'None' and malformed lines give nothing."""
    found = set()
    for line in text.strip().splitlines():
        name, sep, kind = line.rpartition(",")
        if sep and name.strip() and kind.strip().upper() in ("PER", "ORG", "LOC"):
            found.add((name.strip().lower(), kind.strip().upper()))
    return found


def entity_f1(pred: list[str], gold: list[str]) -> float:
    tp = fp = fn = 0
    for p, g in zip(pred, gold):
        ps, gs = parse_entities(p), parse_entities(g)
        tp += len(ps & gs)
        fp += len(ps - gs)
        fn += len(gs - ps)
    if tp == 0:
        return 1.0 if fp == fn == 0 and gold else 0.0
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return 2 * precision * recall / (precision + recall)


def first_number(text: str) -> float | None:
    m = NUMBER.search(text.replace("%", ""))
    if not m:
        return None
    try:
        return float(m.group().replace(",", ""))
    except ValueError:
        return None


def numeric_match(pred: list[str], gold: list[str], tolerance: float) -> float:
    """Share of predictions whose first number is within `tolerance` (relative) of the gold one."""
    hits = 0
    for p, g in zip(pred, gold):
        a, b = first_number(p), first_number(g)
        if a is not None and b is not None and abs(a - b) <= tolerance * max(abs(b), 1e-9) + 1e-9:
            hits += 1
    return hits / len(gold) if gold else 0.0


def score(metric: str, pred: list[str], gold: list[str], choices: list[str], tolerance: float) -> dict[str, float]:
    """The metrics of one task, by its kind."""
    if metric == "classification":
        return {"acc": accuracy(pred, gold), "f1": weighted_f1(pred, gold)}
    if metric == "movement":
        return {"acc": accuracy(pred, gold), "mcc": mcc(pred, gold, positive=choices[0])}
    if metric == "entities":
        return {"f1": entity_f1(pred, gold)}
    return {"em": numeric_match(pred, gold, tolerance)}


HEADLINE = {"classification": "f1", "movement": "mcc", "entities": "f1", "numeric": "em"}


# --- the same metrics from per-item statistics, for resampling -----------------------------------
#
# Every metric above is a function of a sum over items: the confusion counts (label tasks), the
# entity tp/fp/fn counts, the numeric hits. `item_stats` gives each item's share of that sum as
# one row, so a bootstrap replicate is a weighted sum of rows (weights: how often the replicate
# drew each item) and `from_stats` turns any such sum, or a batch of them, into the metrics.


def label_space(choices: list[str], pred: list[str], gold: list[str]) -> list[str]:
    """The choices, then any other label seen (a gold label outside the choices, say), in order."""
    return list(dict.fromkeys([*choices, *gold, *pred]))


def item_stats(metric: str, pred: list[str], gold: list[str], labels: list[str], tolerance: float) -> torch.Tensor:
    """[N, K] float64: each item's statistics. Label tasks: a one-hot confusion cell (gold row,
    predicted column) over `labels` (K = len(labels)**2); entities: (tp, fp, fn); numeric: hit."""
    if len(pred) != len(gold):
        raise ValueError(f"item_stats: pred and gold must have one entry per item; got {len(pred)} and {len(gold)}")
    if metric in ("classification", "movement"):
        index = {label: i for i, label in enumerate(labels)}
        missing = sorted({x for x in pred + gold if x not in index})
        if missing:
            raise ValueError(f"item_stats: labels must hold every gold and predicted label; missing {missing}")
        cells = torch.tensor([index[g] * len(labels) + index[p] for p, g in zip(pred, gold)], dtype=torch.long)
        return torch.nn.functional.one_hot(cells, len(labels) ** 2).double()
    if metric == "entities":
        rows = []
        for p, g in zip(pred, gold):
            ps, gs = parse_entities(p), parse_entities(g)
            rows.append([len(ps & gs), len(ps - gs), len(gs - ps)])
        return torch.tensor(rows, dtype=torch.float64).view(-1, 3)
    if metric == "numeric":
        return torch.tensor([numeric_match([p], [g], tolerance) for p, g in zip(pred, gold)], dtype=torch.float64).view(-1, 1)
    raise ValueError(f"item_stats: metric must be one of classification, movement, entities, numeric; got {metric!r}")


def from_stats(metric: str, totals_RK: torch.Tensor, items_R: torch.Tensor) -> dict[str, torch.Tensor]:
    """The metrics of `score` from summed statistics: `totals_RK` [R, K] sums of `item_stats`
    rows, `items_R` [R] how many items each sum holds. Returns {metric: [R] float64}."""
    totals_RK, items_R = totals_RK.double(), items_R.double()
    safe = lambda num, den: torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num))  # noqa: E731
    if metric in ("classification", "movement"):
        C = int(round(totals_RK.shape[-1] ** 0.5))
        conf_RGP = totals_RK.view(-1, C, C)
        tp_RC = conf_RGP.diagonal(dim1=1, dim2=2)
        support_RC, predicted_RC = conf_RGP.sum(2), conf_RGP.sum(1)
        acc = safe(tp_RC.sum(1), items_R)
        if metric == "movement":
            tp, fn, fp = conf_RGP[:, 0, 0], conf_RGP[:, 0, 1:].sum(1), conf_RGP[:, 1:, 0].sum(1)
            tn = conf_RGP[:, 1:, 1:].sum((1, 2))
            denom = ((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)).sqrt()
            return {"acc": acc, "mcc": safe(tp * tn - fp * fn, denom)}
        precision, recall = safe(tp_RC, predicted_RC), safe(tp_RC, support_RC)
        f1_RC = safe(2 * precision * recall, precision + recall)
        return {"acc": acc, "f1": safe((f1_RC * support_RC).sum(1), items_R)}
    if metric == "entities":
        tp, fp, fn = totals_RK.unbind(-1)
        precision, recall = safe(tp, tp + fp), safe(tp, tp + fn)
        f1 = safe(2 * precision * recall, precision + recall)
        perfect = (tp == 0) & (fp == 0) & (fn == 0) & (items_R > 0)
        return {"f1": torch.where(perfect, torch.ones_like(f1), f1)}
    return {"em": safe(totals_RK[:, 0], items_R)}


def top_answer(pred: list[str]) -> tuple[str, float]:
    """The most frequent answer and the share of items that got it."""
    if not pred:
        return "", 0.0
    answer, n = Counter(pred).most_common(1)[0]
    return answer, n / len(pred)


def majority_answers(gold: list[str]) -> list[str]:
    """The most frequent gold label, for every item: the label prior's score."""
    return [top_answer(gold)[0]] * len(gold)
