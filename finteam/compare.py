"""`finteam compare`: the teams of several finished runs, paired on the same test items and seeds.

    finteam compare runs/tiny runs/tiny-spread0:spread0 runs/tiny-top1:top1

Each argument is a run folder (`out_dir`) holding the results.json that `finteam run` or
`finteam evaluate` wrote, with an optional `:label`. The first run's team is the reference;
the tables are the results table's (finteam/report.py): its baselines (dense, experts, merge)
and every run's team, each score with its 95% interval and collapses marked, then the reference
team minus each of them per task and on the mean, from the same paired bootstrap (finteam/stats.py),
and the same for the held-out loss on each role's text when every run measured it. A
comparison of two team settings is a result only when they were scored on the same items with
the same seeds, so runs whose test items or seed counts differ are refused.
"""
from __future__ import annotations

import json
from pathlib import Path

from . import report, stats

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
    seeds = first["per_seed"]
    meta = {t: info for t, info in first["tasks"].items() if t in seeds[0]["gold"]}
    tasks = {t: {**info, "gold": seeds[0]["gold"][t]} for t, info in meta.items()}
    predictions = {m: [s["predictions"][m] for s in seeds] for m in seeds[0]["predictions"] if m != TEAM}
    teams = [f"team {label}" for label in runs]
    for name, run in zip(teams, runs.values()):
        predictions[name] = [s["predictions"][TEAM] for s in run["per_seed"]]
    tolerance = first["recipe"]["evaluate"]["numeric_tolerance"]
    out = stats.summarise(stats.Bootstrap(tasks, predictions, tolerance), list(predictions), teams[0])
    return "\n".join([
        f"{out['seeds']} seed(s); 95% intervals from a paired bootstrap over test items and seeds ({out['reps']} "
        "replicates); the baselines are the first run's; † collapsed (one answer to more than 90% of a label task's "
        "items in some seed).", "",
        report.interval_table(out, meta, report.collapsed(predictions, meta), report.references(first)), "",
        f"{teams[0]} minus each model (95% interval; ✓ ahead, ✗ behind, interval excluding zero):", "",
        report.paired_table(out, meta, teams[0]), "", heldout_section(runs, teams)])


def heldout_section(runs: dict[str, dict], teams: list[str]) -> str:
    """The held-out loss table (report.heldout_table) of the first run's baselines and every
    run's team, when every run measured it on the same documents; else a line saying why not."""
    per_run = [[s.get("heldout") or {} for s in run["per_seed"]] for run in runs.values()]
    if not all(all(seeds) for seeds in per_run):
        return "Held-out loss: not in every run (runs of real corpora, or evaluated before it existed)."
    tokens = [[{c: v["tokens"] for c, v in s[TEAM].items()} for s in seeds] for seeds in per_run]
    if any(t != tokens[0] for t in tokens[1:]):
        return "Held-out loss: the runs scored other documents (evaluate.heldout_docs or the tokenizer differ)."
    merged = [{**{m: v for m, v in seed.items() if m != TEAM},
               **{team: seeds[k][TEAM] for team, seeds in zip(teams, per_run)}} for k, seed in enumerate(per_run[0])]
    return ("Held-out next-token loss on each role's text (nats a token; each model before tuning; ✓ the first team's "
            "loss is lower, ✗ higher):\n\n" + report.heldout_table(stats.loss_intervals(merged, teams[0])))
