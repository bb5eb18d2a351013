"""The performance targets, judged on the rows of one run: fractions of the measured ceilings
for the ops, and forward+backward against every installed peer."""
from __future__ import annotations

import dataclasses
import math

from tables import fmt


@dataclasses.dataclass(frozen=True)
class Target:
    label: str
    op: str
    mode: str
    fraction: str  # "bandwidth_fraction" or "matmul_fraction"
    goal: float
    shape: str | None = None  # None: every shape, judged by the worst
    tokens: tuple[int, int] | None = None  # inclusive range; None: the largest count measured


TARGETS = (
    Target("experts, Mixtral TP-2 shard, 1 token: >= 80% of bandwidth", "moe_experts", "forward",
           "bandwidth_fraction", 0.80, "mixtral-8x7b-tp2", (1, 1)),
    Target("experts, Mixtral TP-2 shard, 1k-1.5k tokens: >= 60% of matmul", "moe_experts", "forward",
           "matmul_fraction", 0.60, "mixtral-8x7b-tp2", (1024, 1536)),
    Target("permute: >= 80% of bandwidth", "permute", "forward", "bandwidth_fraction", 0.80),
    Target("unpermute: >= 80% of bandwidth", "unpermute", "forward", "bandwidth_fraction", 0.80),
    Target("gating: >= 85% of bandwidth", "gating", "forward", "bandwidth_fraction", 0.85),
)


def _target_rows(t: Target, rows: list[dict]) -> list[dict]:
    cells = [r for r in rows if r["op"] == t.op and r["mode"] == t.mode and r["routing"] == "uniform"]
    if t.shape is not None:
        cells = [r for r in cells if r["shape"] == t.shape]
    if t.tokens is not None:
        return [r for r in cells if t.tokens[0] <= r["tokens"] <= t.tokens[1]]
    largest = {}
    for r in cells:
        largest[r["shape"]] = max(largest.get(r["shape"], 0), r["tokens"])
    return [r for r in cells if r["tokens"] == largest[r["shape"]]]


def judge_targets(rows: list[dict], on_gpu: bool) -> list[dict]:
    """For each target, the best of our backends on each cell, the worst cell over shapes, and
    (on a GPU only) whether it meets the goal; plus forward+backward against every peer."""
    results = []
    for t in TARGETS:
        cells = _target_rows(t, rows)
        by_cell: dict[tuple, dict] = {}
        for r in cells:
            key = (r["shape"], r["tokens"])
            entry = by_cell.setdefault(key, {"shape": r["shape"], "tokens": r["tokens"], "ours": None, "reference": None})
            if r["kind"] == "ours" and (entry["ours"] is None or r[t.fraction] > entry["ours"][t.fraction]):
                entry["ours"] = r
            if r["kind"] == "reference":
                entry["reference"] = r
        measured = [e for e in by_cell.values() if e["ours"] is not None]
        worst = min(measured, key=lambda e: e["ours"][t.fraction]) if measured else None
        ref_cells = [e for e in by_cell.values() if e["reference"] is not None]
        results.append({
            "target": t.label,
            "goal": t.goal,
            "ours": None if worst is None else {
                "fraction": worst["ours"][t.fraction], "provider": worst["ours"]["provider"],
                "shape": worst["shape"], "tokens": worst["tokens"], "vs_reference": worst["ours"]["vs_reference"],
            },
            "reference_fraction": min((e["reference"][t.fraction] for e in ref_cells), default=None),
            "met": (worst["ours"][t.fraction] >= t.goal) if (worst and on_gpu) else None,
        })
    results.append(_versus_peers(rows, on_gpu))
    results.append(_over_gemms(rows))
    return results


def _versus_peers(rows: list[dict], on_gpu: bool) -> dict:
    """forward+backward of the expert computation and the layer: our best against the best peer."""
    cells: dict[tuple, dict] = {}
    for r in rows:
        if r["mode"] == "forward+backward" and r["op"] in ("moe_experts", "layer") and r["kind"] in ("ours", "peer"):
            key = (r["op"], r["shape"], r["routing"], r["tokens"])
            best = cells.setdefault(key, {})
            if r["median_ms"] < best.get(r["kind"], (math.inf,))[0]:
                best[r["kind"]] = (r["median_ms"], r["provider"])
    pairs = [(k, v) for k, v in cells.items() if "ours" in v and "peer" in v]
    speedups = [v["peer"][0] / v["ours"][0] for _, v in pairs]
    return {
        "target": "forward+backward faster than every installed peer (experts and layer)",
        "goal": 1.0,
        "cells": len(pairs),
        "wins": sum(s > 1.0 for s in speedups),
        "worst_speedup": min(speedups, default=None),
        "met": (bool(pairs) and min(speedups) > 1.0) if on_gpu else None,
    }


def _over_gemms(rows: list[dict]) -> dict:
    """forward+backward of the experts: our best and the best peer, each as its time over that
    of the same GEMMs alone through ATen (the aten-gemms yardstick). Where a peer is itself close
    to its GEMMs, a lead over it has to come from GEMMs faster than ATen's or memory it does not
    allocate, not from the work around them."""
    cells: dict[tuple, dict] = {}
    for r in rows:
        if r["op"] == "moe_experts" and r["mode"] == "forward+backward" and r["routing"] == "uniform":
            best = cells.setdefault((r["shape"], r["tokens"]), {})
            if r["median_ms"] < best.get(r["kind"], math.inf):
                best[r["kind"]] = r["median_ms"]
    over = [{"shape": shape, "tokens": T, "ours": best["ours"] / best["yardstick"],
             "peer": best["peer"] / best["yardstick"] if "peer" in best else None}
            for (shape, T), best in cells.items() if "ours" in best and "yardstick" in best]
    return {"target": "experts forward+backward, time over the same GEMMs alone (aten-gemms): ours, best peer",
            "over_gemms": over}


def targets_text(results: list[dict], on_gpu: bool) -> str:
    lines = ["", "== targets " + ("(GPU: judged)" if on_gpu else "(CPU: ratios only, goals are for a GPU)") + " =="]
    for t in results:
        if "over_gemms" in t:
            cells = "; ".join(f"{c['shape']} T={c['tokens']} x{c['ours']:.2f}, x{fmt(c['peer'], '.2f')}"
                              for c in t["over_gemms"])
            lines.append(f"{t['target']}: {cells or 'not measured'}")
            continue
        if "cells" in t:
            verdict = {True: "MET", False: "MISSED", None: ""}[t["met"]]
            lines.append(f"{t['target']}: {t['wins']}/{t['cells']} cells faster, worst x{fmt(t['worst_speedup'], '.2f')} {verdict}")
            continue
        ours = t["ours"]
        ref = fmt(t["reference_fraction"] and 100 * t["reference_fraction"], ".0f")
        if ours is None:
            lines.append(f"{t['target']}: no kernel backend measured here (reference {ref}%)")
            continue
        verdict = {True: "MET", False: "MISSED", None: ""}[t["met"]]
        lines.append(
            f"{t['target']}: {100 * ours['fraction']:.0f}% ({ours['provider']}, {ours['shape']}, T={ours['tokens']}, "
            f"x{fmt(ours['vs_reference'], '.2f')} vs reference at {ref}%) {verdict}"
        )
    return "\n".join(lines)
