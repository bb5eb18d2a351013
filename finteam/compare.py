"""`finteam compare`: the teams of several finished runs, paired on the same test items and seeds.

    finteam compare runs/tiny runs/tiny-spread0:spread0 runs/tiny-top1:top1

Each argument is a run folder (`out_dir`) holding the results.json that `finteam run` or
`finteam evaluate` wrote, with an optional `:label`. The first run's team is the reference;
the table holds its baselines (dense, experts, merge) and every run's team, each with its mean
over tasks, 95% interval and per-seed means, and the reference team minus each of them per task
and on the mean, from the same paired bootstrap as the results table (finteam/stats.py). A
comparison of two team settings is a result only when they were scored on the same items with
the same seeds, so runs whose test items or seed counts differ are refused.
"""
from __future__ import annotations

import json
from pathlib import Path

from . import stats

TEAM = "team (MoE)"


def load_run(folder: str | Path) -> dict:
    path = Path(folder) / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"compare: {path} does not exist; run `finteam run` (or `finteam evaluate`) there first")
    run = json.loads(path.read_text())
    if not run.get("per_seed") or TEAM not in run["per_seed"][0].get("predictions", {}):
        raise ValueError(f"compare: {path} holds no team predictions")
    return run


def parse(arg: str) -> tuple[str, str]:
    """'folder:label' -> (folder, label); the label defaults to the folder's name."""
    folder, _, label = arg.rpartition(":") if ":" in arg else (arg, "", "")
    return folder, label or Path(folder).name


def check_same_items(runs: dict[str, dict]) -> None:
    (first_label, first), *rest = runs.items()
    for label, run in rest:
        if len(run["per_seed"]) != len(first["per_seed"]):
            raise ValueError(f"compare: {label} has {len(run['per_seed'])} seed(s), {first_label} "
                             f"{len(first['per_seed'])}; compare runs made with the same --seeds")
        for k, (mine, theirs) in enumerate(zip(run["per_seed"], first["per_seed"])):
            for task, gold in theirs["gold"].items():
                if mine["gold"].get(task) != gold:
                    raise ValueError(f"compare: {label} was scored on other test items than {first_label} "
                                     f"(task {task!r}, seed {k}); compare runs of the same data")


def compare(args: list[str]) -> str:
    """The Markdown table of the runs named in `args` ('folder[:label]' each)."""
    if not args:
        raise ValueError("compare: name at least one run folder")
    runs = {}
    for arg in args:
        folder, label = parse(arg)
        if label in runs:
            raise ValueError(f"compare: two runs are labelled {label!r}; label them apart with folder:label")
        runs[label] = load_run(folder)
    check_same_items(runs)
    first = next(iter(runs.values()))
    meta, seeds = first["tasks"], first["per_seed"]
    tasks = {t: {**meta[t], "gold": seeds[0]["gold"][t]} for t in meta if t in seeds[0]["gold"]}
    predictions = {m: [s["predictions"][m] for s in seeds] for m in seeds[0]["predictions"] if m != TEAM}
    teams = [f"team {label}" for label in runs]
    for name, run in zip(teams, runs.values()):
        predictions[name] = [s["predictions"][TEAM] for s in run["per_seed"]]
    tolerance = first["recipe"]["evaluate"]["numeric_tolerance"]
    out = stats.summarise(stats.Bootstrap(tasks, predictions, tolerance), list(predictions), teams[0])
    return table(out, list(tasks), teams[0])


def _cell(d: dict) -> str:
    return f"{d['value']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"


def table(out: dict, tasks: list[str], reference: str) -> str:
    lines = [f"{out['seeds']} seed(s); 95% intervals from a paired bootstrap over test items and seeds "
             f"({out['reps']} replicates). The baselines are the first run's.", "",
             "| model | mean | per seed |", "|---|---|---|"]
    for model, scores in out["scores"].items():
        mean = scores["mean"]
        per_seed = ", ".join(f"{v:.3f}" for v in mean["seeds"])
        lines.append(f"| {model} | {mean['value']:.3f} [{mean['low']:.3f}, {mean['high']:.3f}] | {per_seed} |")
    lines += ["", f"{reference} minus each model (✓ ahead, ✗ behind, interval excluding zero):", "",
              "| minus | " + " | ".join(tasks) + " | mean |", "|---|" + "---|" * (len(tasks) + 1)]
    for model, paired in out["paired"].items():
        cells = []
        for task in [*tasks, "mean"]:
            d = paired[task]
            mark = " ✓" if d["low"] > 0 else " ✗" if d["high"] < 0 else ""
            cells.append(_cell(d) + mark)
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
