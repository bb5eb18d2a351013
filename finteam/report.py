"""The results table: every model's headline metric per task, mean and spread over seeds."""
from __future__ import annotations

import statistics

from .metrics import HEADLINE


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


def markdown(summary: dict, meta: dict, throughput: dict, routing_mean: dict, expert_names: list[str], notes: list[str]) -> str:
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
