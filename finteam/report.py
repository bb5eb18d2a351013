"""The results table: every model's headline metric per task over seeds, with 95% intervals,
the team's paired differences from every baseline, collapsed models flagged, two references for
each label task (the majority class; a bag-of-words model, bag_of_words.py), how specialised the
team's routing is, each model's held-out loss on each role's text (heldout.py), and the compute
behind each model.

Intervals and paired differences come from stats.py (a paired bootstrap over test items and
seeds). A model is flagged collapsed on a label task when one answer covers more than
`COLLAPSE` of the items: it has stopped reading the input, whatever its score.
"""
from __future__ import annotations

import statistics

import torch

from .metrics import HEADLINE, top_answer

COLLAPSE = 0.9


def aggregate(per_seed: list[dict]) -> dict:
    """{model: {task: {metric: {"mean", "std", "values"}}}} from one results dict per seed."""
    out: dict = {}
    for result in per_seed:
        for model, tasks in result["scores"].items():
            for task, metrics in tasks.items():
                for metric, value in metrics.items():
                    if metric != "n":
                        out.setdefault(model, {}).setdefault(task, {}).setdefault(metric, {"values": []})["values"].append(value)
    for tasks in out.values():
        for metrics in tasks.values():
            for cell in metrics.values():
                v = cell["values"]
                cell["mean"] = statistics.fmean(v)
                cell["std"] = statistics.stdev(v) if len(v) > 1 else 0.0
    return out


def cell(c: dict) -> str:
    return f"{c['mean']:.3f} ± {c['std']:.3f}" if len(c["values"]) > 1 else f"{c['mean']:.3f}"


def collapsed(predictions: dict, meta: dict) -> dict:
    """{model: {task: [(seed, answer, share)]}} for every label task and seed where one answer
    covers more than COLLAPSE of the items. `predictions`: {model: [{task: answers}] per seed}."""
    out: dict = {}
    for model, per_seed in predictions.items():
        for k, answers in enumerate(per_seed):
            for task, pred in answers.items():
                answer, share = top_answer(pred)
                if meta[task]["choices"] and share > COLLAPSE:
                    out.setdefault(model, {}).setdefault(task, []).append((k, answer, share))
    return out


def routing_specialisation(routing_LE: dict, meta: dict, expert_names: list[str]) -> dict:
    """Per task: `distance`, the total-variation distance of each layer's expert shares from
    uniform (0: uniform; 1 - K/E at most, with K distinct experts per token), averaged over
    layers; `role_share`, the share of the expert of the task's role (mean over layers); `top`,
    the expert with the largest mean share; `role_top`, whether that is the role's expert."""
    out = {}
    for task, rows in routing_LE.items():
        shares_LE = torch.tensor(rows, dtype=torch.float64)
        uniform = 1.0 / shares_LE.shape[1]
        mean_E = shares_LE.mean(0)
        role = meta.get(task, {}).get("role", "")
        top = expert_names[int(mean_E.argmax())]
        out[task] = {"distance": float(0.5 * (shares_LE - uniform).abs().sum(1).mean()),
                     "role": role, "top": top, "role_top": bool(role) and top == role,
                     "role_share": float(mean_E[expert_names.index(role)]) if role in expert_names else None}
    return out


def interval(c: dict, digits: int = 3) -> str:
    return f"{c['value']:.{digits}f} [{c['low']:.{digits}f}, {c['high']:.{digits}f}]"


def interval_table(summary: dict, meta: dict, flags: dict, references: dict[str, dict]) -> str:
    """Every model's headline score per task and its mean, each with its 95% interval; † marks
    a collapsed model; then one row per reference ({row name: {task: score}}: the majority
    class, the bag-of-words model), "-" where a reference has no score for a task."""
    tasks = list(meta)
    seeds = summary["seeds"]
    lines = ["| model | " + " | ".join(f"{t} ({HEADLINE[meta[t]['metric']]})" for t in tasks) + " | mean |"
             + " mean per seed |" * (seeds > 1),
             "|---|" + "---|" * (len(tasks) + 1 + (seeds > 1))]
    for model, cells in summary["scores"].items():
        row = [interval(cells[t]) + " †" * (t in flags.get(model, {})) for t in tasks]
        row.append(interval(cells["mean"]))
        if seeds > 1:
            row.append(", ".join(f"{v:.3f}" for v in cells["mean"]["seeds"]))
        lines.append(f"| {model} | " + " | ".join(row) + " |")
    for name, scores in references.items():
        if scores:
            lines.append(f"| {name} | " + " | ".join(f"{scores[t]:.3f}" if t in scores else "-" for t in tasks)
                         + " | - |" + " |" * (seeds > 1))
    return "\n".join(lines)


def references(results: dict) -> dict[str, dict]:
    """The reference rows of a run's results.json, for interval_table."""
    return {"majority class": results.get("majority", {}), "bag of words": results.get("bag_of_words", {})}


def mark(c: dict, lower_is_better: bool = False) -> str:
    """✓ when a paired difference's interval puts the reference ahead, ✗ behind, else nothing."""
    ahead, behind = (c["high"] < 0, c["low"] > 0) if lower_is_better else (c["low"] > 0, c["high"] < 0)
    return " ✓" if ahead else " ✗" if behind else ""


def paired_table(summary: dict, meta: dict, reference: str) -> str:
    tasks = list(meta)
    lines = [f"| {reference} minus | " + " | ".join(tasks) + " | mean |", "|---|" + "---|" * (len(tasks) + 1)]
    for model, cells in summary["paired"].items():
        lines.append(f"| {model} | " + " | ".join(interval(cells[t]) + mark(cells[t]) for t in [*tasks, "mean"]) + " |")
    return "\n".join(lines)


def specialisation_table(per_seed: list[dict]) -> str:
    """One row per task: the role, then per seed distance from uniform, the role expert's share
    and the top expert (* when it is the role's)."""
    tasks = list(per_seed[0])
    head = "| task | role | " + " | ".join(f"seed {k}: distance, role share, top" for k in range(len(per_seed))) + " |"
    lines = [head, "|---|---|" + "---|" * len(per_seed)]
    for t in tasks:
        cells = []
        for spec in per_seed:
            c = spec[t]
            share = "-" if c["role_share"] is None else f"{c['role_share']:.2f}"
            cells.append(f"{c['distance']:.3f}, {share}, {c['top']}{' *' * c['role_top']}")
        lines.append(f"| {t} | {per_seed[0][t]['role'] or '-'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def heldout_table(losses: dict) -> str:
    """Held-out loss per role's text with 95% intervals (stats.loss_intervals), then the
    reference model minus each other model, ✓ where the reference's loss is lower."""
    corpora = [c for c in next(iter(losses["scores"].values())) if c != "mean"]
    seeds = losses["seeds"] > 1
    lines = ["| model | " + " | ".join(f"{c} text" for c in corpora) + " | mean |" + " mean per seed |" * seeds,
             "|---|" + "---|" * (len(corpora) + 1 + seeds)]
    for model, cells in losses["scores"].items():
        row = [interval(cells[c]) for c in [*corpora, "mean"]]
        if seeds:
            row.append(", ".join(f"{v:.3f}" for v in cells["mean"]["seeds"]))
        lines.append(f"| {model} | " + " | ".join(row) + " |")
    reference = next(m for m in losses["scores"] if m not in losses["paired"])
    lines += ["", f"| {reference} minus | " + " | ".join(f"{c} text" for c in corpora) + " | mean |",
              "|---|" + "---|" * (len(corpora) + 1)]
    for model, cells in losses["paired"].items():
        lines.append(f"| {model} | " + " | ".join(interval(cells[c]) + mark(cells[c], lower_is_better=True)
                                                  for c in [*corpora, "mean"]) + " |")
    return "\n".join(lines)


def compute_table(compute: dict) -> str:
    lines = ["| model | training tokens | training FLOPs |", "|---|---|---|"]
    lines += [f"| {m} | {c['tokens'] / 1e6:.2f}M | {c['flops']:.3g} |" for m, c in compute.items()]
    return "\n".join(lines)


def spread_table(summary: dict, meta: dict) -> str:
    """Every model's headline score per task: mean ± sample spread over seeds, and the mean."""
    tasks = list(meta)
    lines = ["| model | " + " | ".join(f"{t} ({HEADLINE[meta[t]['metric']]})" for t in tasks) + " | mean |",
             "|---|" + "---|" * (len(tasks) + 1)]
    for model, scores in summary.items():
        cells, means = [], []
        for t in tasks:
            c = scores.get(t, {}).get(HEADLINE[meta[t]["metric"]])
            cells.append(cell(c) if c else "-")
            if c:
                means.append(c["mean"])
        lines.append(f"| {model} | " + " | ".join(cells) + f" | {statistics.fmean(means):.3f} |")
    return "\n".join(lines)


def markdown(summary: dict, meta: dict, throughput: dict, routing_mean: dict, expert_names: list[str], notes: list[str],
             *, intervals: dict | None = None, flags: dict | None = None, references: dict | None = None,
             specialisation: list[dict] | None = None, compute: dict | None = None, heldout: dict | None = None,
             reference: str = "team (MoE)") -> str:
    """The whole results section. Without `intervals` the main table shows mean ± sample spread
    over seeds; with them (stats.summarise), each score's 95% interval, the paired differences
    of `reference` from every other model, and the optional sections given."""
    tasks = list(meta)
    if intervals:
        lines = [interval_table(intervals, meta, flags or {}, references or {}), "", f"Paired differences, {reference} minus each model "
                 "(95% interval; ✓ the team is ahead, ✗ behind, interval excluding zero):", "",
                 paired_table(intervals, meta, reference)]
    else:
        lines = [spread_table(summary, meta)]
    if flags:
        lines += ["", "† collapsed (one answer to more than 90% of a label task's items): " + "; ".join(
            f"{m} {t} (" + ", ".join(f"seed {k} '{a}' {share:.0%}" for k, a, share in hits) + ")"
            for m, ts in flags.items() for t, hits in ts.items()) + "."]
    extra = []
    for model, scores in summary.items():
        for t in tasks:
            for metric, c in scores.get(t, {}).items():
                if metric != HEADLINE[meta[t]["metric"]]:
                    extra.append(f"{model} {t} {metric} {cell(c)}")
    text = "\n".join(lines)
    if extra:
        text += "\n\nOther metrics: " + "; ".join(extra) + "."
    if routing_mean:
        text += "\n\nRouting of the tuned team (share of top-k assignments, mean over layers):\n\n"
        text += "| task | " + " | ".join(expert_names) + " |\n|---|" + "---|" * len(expert_names) + "\n"
        text += "\n".join(f"| {t} | " + " | ".join(f"{v:.2f}" for v in row) + " |" for t, row in routing_mean.items())
    if specialisation:
        text += ("\n\nRouting specialisation of the tuned team per seed (distance: total variation from uniform, "
                 "mean over layers; role share: the task's role expert; * the top expert is the role's):\n\n")
        text += specialisation_table(specialisation)
    if heldout:
        text += ("\n\nHeld-out next-token loss on each role's text (nats a token, lower is better; fresh documents of the "
                 "world no corpus holds; every model before instruction tuning, after the MiX phase where it had one; "
                 "95% intervals from a paired bootstrap over documents and seeds; ✓ the team's loss is lower, ✗ higher):\n\n")
        text += heldout_table(heldout)
    if compute:
        text += "\n\nCompute behind each tuned model (every training stage of its lineage; 6 x active parameters x tokens):\n\n"
        text += compute_table(compute)
    if throughput:
        text += "\n\nThroughput (tokens/s, this machine):\n\n| model | train | prefill | decode |\n|---|---|---|---|\n"
        for name, row in throughput.items():
            if "skipped" in row:
                text += f"| {name} | skipped: {row['skipped']} | | |\n"
            else:
                text += f"| {name} | {row['train_tok_s']} | {row['prefill_tok_s']} | {row['decode_tok_s']} |\n"
    if notes:
        text += "\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    return text
