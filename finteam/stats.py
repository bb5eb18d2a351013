"""Confidence intervals for the results table: a paired, two-level percentile bootstrap.

Every model of a run is scored on the same test items, and every seed of a run on the same
items too (the data stage is shared). One bootstrap replicate draws, per task, N items with
replacement from the task's N, and draws S seeds with replacement from the run's S; a model's
score in that replicate is its metric on the drawn items, averaged over the drawn seeds, and
its mean is the average over tasks. All models share each replicate's draws, so a difference
of two models is computed on the same items and seeds (a paired bootstrap): what both got right
or wrong cancels, and the interval is that of the difference, not of two separate scores.

The 95% interval is the 2.5th and 97.5th percentile of the replicates (Efron & Tibshirani
1993, ch. 13). Drawing seeds as well as items makes the interval cover how much a score moves
between training runs, not only between test sets; with one seed it is the item bootstrap.
With few seeds the seed draw is coarse (3 seeds give 10 distinct multisets), so the table also
shows each seed's own score.
"""
from __future__ import annotations

import torch

from .metrics import HEADLINE, from_stats, item_stats, label_space


def percentile_interval(values_R: torch.Tensor, level: float = 0.95) -> tuple[float, float]:
    """(low, high): the (1-level)/2 and (1+level)/2 quantiles of `values_R`, linearly
    interpolated between order statistics (numpy's default)."""
    if not 0 < level < 1:
        raise ValueError(f"percentile_interval: level must be in (0, 1); got {level}")
    if values_R.numel() == 0:
        raise ValueError("percentile_interval: values_R is empty")
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    low, high = torch.quantile(values_R.double(), q).tolist()
    return low, high


def resample_counts(n: int, reps: int, generator: torch.Generator) -> torch.Tensor:
    """[reps, n] float64: how often each of n items is drawn in each replicate (n draws with replacement)."""
    if n < 1 or reps < 1:
        raise ValueError(f"resample_counts: n and reps must be >= 1; got n={n}, reps={reps}")
    drawn = torch.randint(n, (reps, n), generator=generator)
    return torch.zeros(reps, n, dtype=torch.float64).scatter_add_(1, drawn, torch.ones(reps, n, dtype=torch.float64))


class Bootstrap:
    """Replicates of every model's headline metric per task, on shared item and seed draws.

    tasks: {task: {"metric", "choices", "gold": [N]}}; predictions: {model: [{task: [N preds]}
    per seed]}. `replicates(model)` gives {task: [R]} and "mean": [R]; `point(model)` the
    scores on all items, averaged over seeds, in the same form."""

    def __init__(self, tasks: dict, predictions: dict, tolerance: float, reps: int = 2000, seed: int = 0):
        self.tasks, self.reps = tasks, reps
        g = torch.Generator().manual_seed(seed)
        seeds = {len(per_seed) for per_seed in predictions.values()}
        if len(seeds) != 1:
            raise ValueError(f"Bootstrap: every model needs the same number of seeds; got {sorted(seeds)}")
        self.num_seeds = seeds.pop()
        self.seed_draws_RS = torch.randint(self.num_seeds, (reps, self.num_seeds), generator=g)
        self.counts = {t: resample_counts(len(info["gold"]), reps, g) for t, info in tasks.items()}
        self.stats = {}  # {model: {task: [S] x [N, K]}}
        for model, per_seed in predictions.items():
            self.stats[model] = {}
            for task, info in tasks.items():
                labels = label_space(info["choices"], [p for s in per_seed for p in s[task]], info["gold"])
                self.stats[model][task] = [item_stats(info["metric"], s[task], info["gold"], labels, tolerance)
                                           for s in per_seed]

    def _headline(self, task: str, totals_RK: torch.Tensor, items_R: torch.Tensor) -> torch.Tensor:
        metric = self.tasks[task]["metric"]
        return from_stats(metric, totals_RK, items_R)[HEADLINE[metric]]

    def point(self, model: str) -> dict[str, float]:
        out = {}
        for task, per_seed in self.stats[model].items():
            values = [self._headline(task, s.sum(0, keepdim=True), torch.tensor([float(len(s))]))[0] for s in per_seed]
            out[task] = float(torch.stack(values).mean())
        out["mean"] = sum(out.values()) / len(out)
        return out

    def per_seed(self, model: str) -> list[dict[str, float]]:
        rows = []
        for k in range(self.num_seeds):
            row = {t: float(self._headline(t, s[k].sum(0, keepdim=True), torch.tensor([float(len(s[k]))]))[0])
                   for t, s in self.stats[model].items()}
            row["mean"] = sum(row.values()) / len(row)
            rows.append(row)
        return rows

    def replicates(self, model: str) -> dict[str, torch.Tensor]:
        out = {}
        for task, per_seed in self.stats[model].items():
            counts_RN = self.counts[task]
            items_R = counts_RN.sum(1)
            by_seed_SR = torch.stack([self._headline(task, counts_RN @ s, items_R) for s in per_seed])
            out[task] = by_seed_SR.gather(0, self.seed_draws_RS.T).mean(0)  # each replicate's drawn seeds
        out["mean"] = torch.stack(list(out.values())).mean(0)
        return out


def summarise(boot: Bootstrap, models: list[str], reference: str, level: float = 0.95) -> dict:
    """{"scores": {model: {task: {"value", "low", "high", "seeds"}}}, "paired": {model: {task:
    {"value", "low", "high"}}}} where paired holds `reference` minus each other model."""
    reps = {m: boot.replicates(m) for m in models}
    scores, paired = {}, {}
    for m in models:
        point, seeds = boot.point(m), boot.per_seed(m)
        scores[m] = {t: {"value": point[t], **dict(zip(("low", "high"), percentile_interval(reps[m][t], level))),
                         "seeds": [row[t] for row in seeds]} for t in point}
    ref_point = boot.point(reference)
    for m in models:
        if m == reference:
            continue
        point = boot.point(m)
        paired[m] = {t: {"value": ref_point[t] - point[t],
                         **dict(zip(("low", "high"), percentile_interval(reps[reference][t] - reps[m][t], level)))}
                     for t in point}
    return {"scores": scores, "paired": paired, "reps": boot.reps, "seeds": boot.num_seeds, "level": level}


def loss_intervals(per_seed: list[dict], reference: str, reps: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Held-out loss (heldout.py) with the same two-level paired bootstrap: documents drawn per
    corpus, seeds drawn per replicate. per_seed: [{model: {corpus: {"loss": [D] summed nats,
    "tokens": [D]}}}]; a corpus's loss is its token-weighted mean, a model's "mean" the mean
    over corpora. Returns summarise's form: "scores" (each with its per-seed values) and
    "paired" (`reference` minus each other model)."""
    g = torch.Generator().manual_seed(seed)
    models, corpora = list(per_seed[0]), list(per_seed[0][reference])
    S = len(per_seed)
    seed_draws_RS = torch.randint(S, (reps, S), generator=g)
    counts = {c: resample_counts(len(per_seed[0][reference][c]["loss"]), reps, g) for c in corpora}
    # Column 0 weighs every document once (the point estimate), the rest are the replicates' draws.
    weights = {c: torch.cat([torch.ones(1, w.shape[1], dtype=torch.float64), w]) for c, w in counts.items()}

    def table(model: str) -> dict[str, torch.Tensor]:
        """{corpus: [S, 1 + R]} token-weighted losses, on all documents (column 0) and on each
        replicate's draw, and their "mean" over corpora."""
        out = {}
        for c in corpora:
            loss_SD, tokens_SD = (torch.tensor([s[model][c][k] for s in per_seed], dtype=torch.float64)
                                  for k in ("loss", "tokens"))
            out[c] = (loss_SD @ weights[c].T) / (tokens_SD @ weights[c].T)
        out["mean"] = torch.stack(list(out.values())).mean(0)
        return out

    scores, reps_by_model = {}, {}
    for m in models:
        both = table(m)
        point = {c: v[:, :1] for c, v in both.items()}  # {corpus: [S, 1]}
        reps_by_model[m] = {c: v[:, 1:].gather(0, seed_draws_RS.T).mean(0) for c, v in both.items()}
        scores[m] = {c: {"value": float(v.mean()), "seeds": v[:, 0].tolist(),
                         **dict(zip(("low", "high"), percentile_interval(reps_by_model[m][c], level)))}
                     for c, v in point.items()}
    paired = {m: {c: {"value": scores[reference][c]["value"] - scores[m][c]["value"],
                      **dict(zip(("low", "high"), percentile_interval(reps_by_model[reference][c] - reps_by_model[m][c], level)))}
                  for c in scores[m]}
              for m in models if m != reference}
    return {"scores": scores, "paired": paired, "reps": reps, "seeds": S, "level": level}
