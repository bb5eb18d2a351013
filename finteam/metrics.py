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
