"""The stages wired together: where each writes, when it is skipped, and `run` for all.

Layout of a run (`<out_dir>`, default `runs/<recipe name>/`):

  data/  tokenizer/                        shared by all seeds
  seed<K>/base/model                       the shared base (named sizes)
  seed<K>/experts/<role>/model             continued-pretrained role experts
  seed<K>/dense/model                      dense baseline, same active size, same tokens
  seed<K>/moe/model                        the assembled team (Mixtral)
  seed<K>/merge/model                      uniform merge of the experts, no router
  seed<K>/instruct/<team|dense|macro|micro|quant|merge>/model
  seed<K>/eval/results.json                per-model scores, routing
  results.json  results.md  routing.png    over all seeds

Each stage folder gets `finteam.json` when it finishes (recipe, code version, summary); a rerun
skips it unless `--force`. Interrupted training resumes from the stage's `checkpoints/`.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from . import assemble, data, evaluate, instruct, pretrain, report
from . import model as models
from . import tokenizer as tokenizers
from .checkpoint import done, load_model, mark_done, stamp, write_json
from .config import ROLES, Recipe
from .progress import duration, log
from .train import rank_and_size


hf_logging.disable_progress_bar()  # our log lines say what is loading; a bar per file is noise


@dataclass
class Paths:
    run: Path

    @property
    def data(self) -> Path:
        return self.run / "data"

    @property
    def tokenizer(self) -> Path:
        return self.run / "tokenizer"

    def seed(self, k: int) -> Path:
        return self.run / f"seed{k}"

    def model(self, k: int, name: str) -> Path:
        """Pretraining-side models: base, dense, moe, merge, or a role's expert."""
        return self.seed(k) / ("experts/" + name if name in ROLES else name)

    def tuned(self, k: int, name: str) -> Path:
        return self.seed(k) / "instruct" / name


def device_of(recipe: Recipe) -> torch.device:
    if recipe.device == "cuda" or (recipe.device == "auto" and torch.cuda.is_available()):
        import os

        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def stage(label: str, out: Path, recipe: Recipe, force: bool, fn) -> dict:
    """Run `fn` unless `out` already finished; mark it finished."""
    finished = done(out)
    if finished and not force:
        note = "" if finished["recipe"] == recipe.to_dict() else " (made by a different recipe)"
        log(f"{label}  done already{note}: {out}  (--force reruns it)")
        return finished.get("summary", {})
    if force and out.exists() and rank_and_size()[0] == 0:
        shutil.rmtree(out)
    t0 = time.perf_counter()
    summary = fn()
    if rank_and_size()[0] == 0:
        mark_done(out, stamp(recipe, label), time.perf_counter() - t0, summary)
    log(f"{label}  finished in {duration(time.perf_counter() - t0)}")
    return summary


def run_data(recipe: Recipe, force: bool = False) -> None:
    p = Paths(recipe.run_dir)
    stage("data", p.data, recipe, force, lambda: data.run(recipe, p.data))
    stage("tokenizer", p.tokenizer, recipe, force, lambda: tokenizers.run(recipe, p.data, p.tokenizer))


def model_names(recipe: Recipe) -> list[str]:
    """What gets instruction-tuned and scored: the team, then the baselines the recipe asks for."""
    names = ["team"]
    if "dense" in recipe.evaluate.baselines:
        names.append("dense")
    if "experts" in recipe.evaluate.baselines:
        names += list(ROLES)
    if "merge" in recipe.evaluate.baselines:
        names.append("merge")
    return names


def run_pretrain(recipe: Recipe, k: int, force: bool = False, only: list[str] | None = None) -> None:
    p, dev, seed = Paths(recipe.run_dir), device_of(recipe), recipe.seed + k
    tok = tokenizers.load(p.tokenizer)
    named = recipe.model.base in models.SIZES
    todo = only or (["base"] * named + list(ROLES) + ["dense"] * ("dense" in recipe.evaluate.baselines))
    for name in todo:
        out = p.model(k, name)
        if name == "base":
            stage("pretrain base", out, recipe, force, lambda: pretrain.train_base(recipe, p.data, tok, out, seed, dev))
        elif name == "dense":
            stage("pretrain dense", out, recipe, force, lambda: pretrain.train_dense(recipe, p.data, tok, out, seed, dev))
        else:
            stage(f"pretrain {name}", out, recipe, force,
                  lambda: pretrain.train_expert(recipe, name, p.data, base_dir(recipe, k), tok, out, seed, dev))


def base_dir(recipe: Recipe, k: int) -> Path:
    named = recipe.model.base in models.SIZES
    return Paths(recipe.run_dir).model(k, "base") / "model" if named else Path(recipe.model.base)


def run_assemble(recipe: Recipe, k: int, force: bool = False) -> None:
    p, seed = Paths(recipe.run_dir), recipe.seed + k
    tok = tokenizers.load(p.tokenizer)
    experts = [p.model(k, r) / "model" for r in ROLES]
    if rank_and_size()[0] != 0:
        return
    stage("assemble", p.model(k, "moe"), recipe, force,
          lambda: assemble.run(recipe, p.data, base_dir(recipe, k), experts, tok, p.model(k, "moe"), seed, device_of(recipe)))
    if "merge" in recipe.evaluate.baselines:
        stage("merge", p.model(k, "merge"), recipe, force, lambda: assemble.merge(experts, recipe, tok, p.model(k, "merge"), seed))


def source_of(p: Paths, k: int, name: str) -> Path:
    return p.model(k, "moe" if name == "team" else name) / "model"


def run_instruct(recipe: Recipe, k: int, force: bool = False, only: list[str] | None = None) -> None:
    p, dev, seed = Paths(recipe.run_dir), device_of(recipe), recipe.seed + k
    tok = tokenizers.load(p.tokenizer)
    for name in only or model_names(recipe):
        out = p.tuned(k, name)
        stage(f"instruct {name}", out, recipe, force,
              lambda: instruct.run(recipe, source_of(p, k, name), p.data, tok, out, seed, f"instruct {name}", dev))


def test_sets(recipe: Recipe, data_dir: Path) -> tuple[dict, dict]:
    """Per task, up to `evaluate.max_examples` test examples spread evenly over the file (real
    test files are often grouped: FiQA lists each post under ten wordings in a row)."""
    meta = data.load_task_meta(data_dir)
    tests: dict = {}
    for ex in data.load_tasks(data_dir, "test"):
        tests.setdefault(ex.task, []).append(ex)
    n = recipe.evaluate.max_examples
    return {t: tests[t][:: max(1, len(tests[t]) // n)][:n] for t in meta if t in tests}, meta


def run_evaluate(recipe: Recipe, k: int, force: bool = False) -> None:
    p = Paths(recipe.run_dir)
    if rank_and_size()[0] != 0:
        return
    tok = tokenizers.load(p.tokenizer)
    tests, meta = test_sets(recipe, p.data)

    def scores() -> dict:
        results, table = {}, {}
        for name in model_names(recipe):
            model = load_model(p.tuned(k, name) / "model").to(device_of(recipe))
            if instruct.is_moe(model):
                models.use_experts(model, recipe.instruct.experts_implementation)
                table = evaluate.routing(model, tok, tests, recipe.instruct.max_len, recipe.evaluate.batch_size)
            t0 = time.perf_counter()
            results[label(name)] = evaluate.evaluate_model(model, tok, tests, meta, recipe.evaluate, recipe.instruct.max_len)
            log(f"evaluate {label(name)}  " + "  ".join(f"{t} {next(iter(m.values())):.3f}" for t, m in results[label(name)].items())
                + f"  ({duration(time.perf_counter() - t0)})")
        speed = {}
        if recipe.evaluate.throughput and k == 0:
            dense = p.tuned(k, "dense") / "model" if "dense" in recipe.evaluate.baselines else None
            speed = evaluate.throughput_table(p.tuned(k, "team") / "model", dense, recipe.evaluate)
        write_json(p.seed(k) / "eval" / "results.json", {"scores": results, "routing": table, "throughput": speed})
        return {"models": list(results)}

    stage("evaluate", p.seed(k) / "eval", recipe, force, scores)


def label(name: str) -> str:
    return {"team": "team (MoE)", "dense": "dense baseline", "merge": "uniform merge"}.get(name, f"{name} expert")


def expert_names(recipe: Recipe) -> list[str]:
    return list(ROLES) + ["base"] * recipe.assemble.base_expert


def run_report(recipe: Recipe, seeds: list[int]) -> str:
    """results.json, results.md and routing.png over the seeds; returns the Markdown."""
    import json

    p = Paths(recipe.run_dir)
    per_seed = [json.loads((p.seed(k) / "eval" / "results.json").read_text()) for k in seeds]
    tests, meta = test_sets(recipe, p.data)
    summary = report.aggregate(per_seed)
    routing = per_seed[0]["routing"]
    routing_mean = {t: torch.tensor(v).mean(0).tolist() for t, v in routing.items()}
    if routing:
        evaluate.heat_map(routing, expert_names(recipe), p.run / "routing.png")
    speed = per_seed[0].get("throughput", {})
    notes = [f"{len(seeds)} seed(s) (mean ± sample standard deviation when more than one); test examples per task: "
             + ", ".join(f"{t} {len(v)}" for t, v in tests.items()) + "."]
    notes.append("Held out: no test item (prompt, or the post after `Text:` for real files) occurs in train or valid.")
    text = report.markdown(summary, meta, speed, routing_mean, expert_names(recipe), notes)
    write_json(p.run / "results.json", {"summary": summary, "per_seed": per_seed, "throughput": speed,
                                        "routing_mean": routing_mean, "tasks": meta, **stamp(recipe, "report")})
    (p.run / "results.md").write_text(text + "\n")
    return text


def run_all(recipe: Recipe, seeds: int = 1, force: bool = False) -> str:
    t0 = time.perf_counter()
    run_data(recipe, force)
    ks = list(range(seeds))
    for k in ks:
        run_pretrain(recipe, k, force)
        run_assemble(recipe, k, force)
        run_instruct(recipe, k, force)
        run_evaluate(recipe, k, force)
    if rank_and_size()[0] != 0:
        return ""
    text = run_report(recipe, ks)
    log(f"\n{text}\nResults in {recipe.run_dir}/results.md (and .json, routing.png); "
        f"whole run {duration(time.perf_counter() - t0)}")
    return text
