"""The stages wired together: where each writes, when it is skipped, and `run` for all.

Layout of a run (`<out_dir>`, default `runs/<recipe name>/`):

  data/  tokenizer/                        shared by all seeds
  seed<K>/base/model                       the shared base (named sizes)
  seed<K>/experts/<role>/model             continued-pretrained role experts
  seed<K>/dense/model                      dense baseline, same active size, same tokens
  seed<K>/moe/model                        the assembled team (Mixtral)
  seed<K>/merge/model                      uniform merge of the experts, no router
  seed<K>/mix/<team|dense|merge>/model     after the mix stage (same extra tokens for each)
  seed<K>/instruct/<team|dense|macro|micro|quant|merge>/model
  seed<K>/eval/results.json                per-model scores, routing
  results.json  results.md  routing.png    over all seeds

Each stage folder gets `finteam.json` (recipe, code version, summary, and the stage's
fingerprint). Like a build tool, a rerun skips a finished stage only when its fingerprint still
matches: a hash of the recipe fields the stage reads (`needs`, flattened by
`config.settings_of`; fields that only say how to run, such as `device` or `save_every`, are
left out) and of the fingerprints of the stage folders it reads (`inputs`). A changed setting
so reruns the stages it affects and every stage after them, and nothing else. A stage whose
inputs were made with other settings (`finteam evaluate` after changing `pretrain.*`) is
refused with the difference, rather than run on models that never saw the recipe's values.
`--force` reruns regardless. Interrupted training resumes from the stage's `checkpoints/`
when the fingerprint is unchanged, and starts over otherwise.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from . import assemble, bag_of_words, data, evaluate, heldout, instruct, metrics, mix, pretrain, report, stats
from . import model as models
from . import tokenizer as tokenizers
from .checkpoint import done, load_model, mark_done, stamp, write_json
from .config import ROLES, InstructConfig, Recipe, settings_of
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

    def mixed(self, k: int, name: str) -> Path:
        return self.seed(k) / "mix" / name


def device_of(recipe: Recipe) -> torch.device:
    if recipe.device == "cuda" or (recipe.device == "auto" and torch.cuda.is_available()):
        import os

        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def stage(label: str, out: Path, recipe: Recipe, force: bool, fn, needs: tuple[str, ...] | None = None,
          inputs: tuple[Path, ...] = ()) -> dict:
    """Run `fn` unless `out` finished with the fingerprint it would have now; mark it finished.
    `needs`: the recipe sections and fields the stage reads (None: all of them); `inputs`: the
    stage folders it reads, each checked to match the recipe first (by rank 0, which writes the
    markers: the other ranks could read one before it is written)."""
    for folder in inputs if rank_and_size()[0] == 0 else ():
        why = stale(recipe, folder)
        if why:
            raise ValueError(f"{label} needs {folder}, but {why}; run `finteam run` to rebuild what the change "
                             "affects (or set the value back)")
    run = Paths(recipe.run_dir).run
    record = {"needs": None if needs is None else list(needs), "settings": settings_of(recipe, needs),
              "inputs": [str(folder.relative_to(run)) for folder in inputs]}
    record["fingerprint"] = fingerprint(recipe, record)
    finished = done(out)
    if finished and not force:
        if finished.get("fingerprint") == record["fingerprint"]:
            log(f"{label}  done already: {out}  (--force reruns it)")
            return finished.get("summary", {})
        log(f"{label}  made with other settings ({difference(finished, record)}): running it again")
    started = read_marker(out)
    if out.exists() and rank_and_size()[0] == 0 and (force or started.get("fingerprint") != record["fingerprint"]):
        if started and not started.get("done") and not force:
            log(f"{label}  unfinished work in {out} was made with other settings ({difference(started, record)}): "
                "starting over")
        shutil.rmtree(out)
    if rank_and_size()[0] == 0:
        write_json(out / "finteam.json", {"stage": label, "done": False, **record})
    t0 = time.perf_counter()
    summary = fn()
    if rank_and_size()[0] == 0:
        mark_done(out, stamp(recipe, label, **record), time.perf_counter() - t0, summary)
    log(f"{label}  finished in {duration(time.perf_counter() - t0)}")
    return summary


def read_marker(folder: Path) -> dict:
    """The stage's finteam.json (finished or only started), or {} when there is none."""
    try:
        return json.loads((folder / "finteam.json").read_text())
    except (OSError, ValueError):
        return {}


def fingerprint(recipe: Recipe, record: dict) -> str:
    """sha256 of a stage's settings and of the fingerprints its input folders were stamped with."""
    run = Paths(recipe.run_dir).run
    inputs = {name: read_marker(run / name).get("fingerprint") for name in record["inputs"]}
    text = json.dumps({"settings": record["settings"], "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def difference(then: dict, now: dict) -> str:
    """The settings that differ between two stage records, for a person."""
    if "settings" not in then:
        return "made before stages had fingerprints"
    old, new = then["settings"], now["settings"]
    changed = [f"{key} {old.get(key, '(unset)')!r} then, {new.get(key, '(unset)')!r} now"
               for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]
    if not changed:
        return "a stage it reads has been made again since"
    return "; ".join(changed[:3]) + (f"; and {len(changed) - 3} more" if len(changed) > 3 else "")


def stale(recipe: Recipe, folder: Path) -> str | None:
    """Why the stage folder `folder` does not match `recipe` (its own settings, or those of a
    stage before it, differ; or it is unfinished), or None. A folder the pipeline did not make
    (no finteam.json, such as a checkpoint put there by hand) is taken as it is."""
    marker = read_marker(folder)
    if not marker:
        return None
    if not marker.get("done"):
        return f"{marker.get('stage', folder.name)} has not finished there"
    if "settings" not in marker:
        return f"{marker.get('stage', folder.name)} was made before stages had fingerprints"
    now = {"needs": marker["needs"], "settings": settings_of(recipe, marker["needs"]), "inputs": marker["inputs"]}
    if now["settings"] != marker["settings"]:
        return f"{marker['stage']} was made with other settings ({difference(marker, now)})"
    run = Paths(recipe.run_dir).run
    for name in marker["inputs"]:
        why = stale(recipe, run / name)
        if why:
            return why
    if fingerprint(recipe, now) != marker["fingerprint"]:
        return f"{marker['stage']} was made from earlier versions of {', '.join(marker['inputs'])}"
    return None


def run_data(recipe: Recipe, force: bool = False) -> None:
    p = Paths(recipe.run_dir)
    stage("data", p.data, recipe, force, lambda: data.run(recipe, p.data), needs=("seed", "data"))
    stage("tokenizer", p.tokenizer, recipe, force, lambda: tokenizers.run(recipe, p.data, p.tokenizer),
          needs=("tokenizer", "model.base") if recipe.tokenizer.kind == "base" else ("tokenizer",), inputs=(p.data,))


def made_tokenizer(recipe: Recipe):
    """The run's tokenizer, once the data stages have made it with the recipe's settings."""
    folder = Paths(recipe.run_dir).tokenizer
    why = stale(recipe, folder) or (None if done(folder) else "it has not been made yet")
    if why and rank_and_size()[0] == 0:
        raise ValueError(f"the tokenizer in {folder}: {why}; run `finteam data` (or `finteam run`) first")
    return tokenizers.load(folder)


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
    tok = made_tokenizer(recipe)
    named = recipe.model.base in models.SIZES
    todo = only or (["base"] * named + list(ROLES) + ["dense"] * ("dense" in recipe.evaluate.baselines))
    lm, corpora = ("seed", "model", "precision"), (p.data, p.tokenizer)
    for name in todo:
        out = p.model(k, name)
        if name == "base":
            stage("pretrain base", out, recipe, force, lambda: pretrain.train_base(recipe, p.data, tok, out, seed, dev),
                  needs=(*lm, "pretrain.base"), inputs=corpora)
        elif name == "dense":
            stage("pretrain dense", out, recipe, force, lambda: pretrain.train_dense(recipe, p.data, tok, out, seed, dev),
                  needs=(*lm, "pretrain.base", "pretrain.expert", "assemble.top_k"), inputs=corpora)
        else:
            stage(f"pretrain {name}", out, recipe, force,
                  lambda: pretrain.train_expert(recipe, name, p.data, base_dir(recipe, k), tok, out, seed, dev),
                  needs=(*lm, "pretrain.expert", "pretrain.expert_trains"), inputs=(*corpora, *[p.model(k, "base")] * named))


def base_dir(recipe: Recipe, k: int) -> Path:
    named = recipe.model.base in models.SIZES
    return Paths(recipe.run_dir).model(k, "base") / "model" if named else Path(recipe.model.base)


def run_assemble(recipe: Recipe, k: int, force: bool = False) -> None:
    p, seed = Paths(recipe.run_dir), recipe.seed + k
    tok = made_tokenizer(recipe)
    experts = [p.model(k, r) / "model" for r in ROLES]
    if rank_and_size()[0] != 0:
        return
    base = [p.model(k, "base")] * (recipe.model.base in models.SIZES)
    stage("assemble", p.model(k, "moe"), recipe, force,
          lambda: assemble.run(recipe, p.data, base_dir(recipe, k), experts, tok, p.model(k, "moe"), seed, device_of(recipe)),
          needs=("seed", "model", "assemble", "data.router_prompts"),
          inputs=(p.data, p.tokenizer, *[e.parent for e in experts], *base))
    if "merge" in recipe.evaluate.baselines:
        stage("merge", p.model(k, "merge"), recipe, force, lambda: assemble.merge(experts, recipe, tok, p.model(k, "merge"), seed),
              needs=("seed",), inputs=(p.tokenizer, *[e.parent for e in experts]))


def assembled(p: Paths, k: int, name: str) -> Path:
    """What the mix stage starts from (and instruct, with the mix stage off)."""
    return p.model(k, "moe" if name == "team" else name) / "model"


def mixed_names(recipe: Recipe) -> list[str]:
    return [n for n in model_names(recipe) if n in mix.MIXED] if recipe.mix.enabled else []


def run_mix(recipe: Recipe, k: int, force: bool = False, only: list[str] | None = None) -> None:
    p, dev, seed = Paths(recipe.run_dir), device_of(recipe), recipe.seed + k
    tok = made_tokenizer(recipe)
    for name in only or mixed_names(recipe):
        out = p.mixed(k, name)
        stage(f"mix {name}", out, recipe, force,
              lambda: mix.run(recipe, assembled(p, k, name), p.data, tok, out, seed, f"mix {name}", dev),
              needs=("seed", "model", "precision", "mix", "instruct.experts_implementation"),
              inputs=(p.data, p.tokenizer, assembled(p, k, name).parent))


def source_of(recipe: Recipe, p: Paths, k: int, name: str) -> Path:
    if name in mixed_names(recipe):
        return p.mixed(k, name) / "model"
    return assembled(p, k, name)


def run_instruct(recipe: Recipe, k: int, force: bool = False, only: list[str] | None = None) -> None:
    p, dev, seed = Paths(recipe.run_dir), device_of(recipe), recipe.seed + k
    tok = made_tokenizer(recipe)
    for name in only or model_names(recipe):
        out = p.tuned(k, name)
        stage(f"instruct {name}", out, recipe, force,
              lambda: instruct.run(recipe, source_of(recipe, p, k, name), p.data, tok, out, seed, f"instruct {name}", dev),
              needs=("seed", "precision", *InstructConfig.needs(team=name == "team")), inputs=(p.data, p.tokenizer, source_of(recipe, p, k, name).parent))


def examples_by_task(data_dir: Path, split: str) -> dict[str, list]:
    """{task: its examples of `split`, in file order}."""
    out: dict = {}
    for ex in data.load_tasks(data_dir, split):
        out.setdefault(ex.task, []).append(ex)
    return out


def test_sets(recipe: Recipe, data_dir: Path) -> tuple[dict, dict]:
    """Per task, up to `evaluate.max_examples` test examples spread evenly over the file (real
    test files are often grouped: FiQA lists each post under ten wordings in a row)."""
    meta = data.load_task_meta(data_dir)
    tests = examples_by_task(data_dir, "test")
    n = recipe.evaluate.max_examples
    return {t: tests[t][:: max(1, len(tests[t]) // n)][:n] for t in meta if t in tests}, meta


def run_evaluate(recipe: Recipe, k: int, force: bool = False) -> None:
    p = Paths(recipe.run_dir)
    if rank_and_size()[0] != 0:
        return
    tok = made_tokenizer(recipe)
    tests, meta = test_sets(recipe, p.data)

    def scores() -> dict:
        results, table, answers = {}, {}, {}
        for name in model_names(recipe):
            model = load_model(p.tuned(k, name) / "model").to(device_of(recipe))
            if instruct.is_moe(model):
                models.use_experts(model, recipe.instruct.experts_implementation)
                table = evaluate.routing(model, tok, tests, recipe.instruct.max_len, recipe.evaluate.batch_size)
            t0 = time.perf_counter()
            answers[label(name)] = evaluate.predict(model, tok, tests, meta, recipe.evaluate, recipe.instruct.max_len)
            results[label(name)] = evaluate.scores(answers[label(name)], tests, meta, recipe.evaluate)
            log(f"evaluate {label(name)}  " + "  ".join(f"{t} {next(iter(m.values())):.3f}" for t, m in results[label(name)].items())
                + f"  ({duration(time.perf_counter() - t0)})")
        speed = {}
        if recipe.evaluate.throughput and k == 0:
            dense = p.tuned(k, "dense") / "model" if "dense" in recipe.evaluate.baselines else None
            speed = evaluate.throughput_table(p.tuned(k, "team") / "model", dense, recipe.evaluate)
        gold = {t: [e.answer for e in examples] for t, examples in tests.items()}
        write_json(p.seed(k) / "eval" / "results.json", {"scores": results, "routing": table, "throughput": speed,
                                                          "predictions": answers, "gold": gold, "compute": compute(recipe, k),
                                                          "heldout": heldout_losses(recipe, k, tok)})
        return {"models": list(results)}

    stage("evaluate", p.seed(k) / "eval", recipe, force, scores,
          needs=("evaluate", "instruct.max_len", "instruct.experts_implementation", "model.seq_len", "data.text_field"),
          inputs=(p.data, p.tokenizer, *[p.tuned(k, name) for name in model_names(recipe)],
                  *[d.parent for d in untuned(recipe, k).values()]))


def untuned(recipe: Recipe, k: int) -> dict[str, Path]:
    """{label: model folder} of every scored model before instruction tuning (after the MiX
    phase where it had one), and the base when the run trained it."""
    p = Paths(recipe.run_dir)
    out = {label(name): source_of(recipe, p, k, name) for name in model_names(recipe)}
    if recipe.model.base in models.SIZES:
        out["base"] = p.model(k, "base") / "model"
    return out


def heldout_losses(recipe: Recipe, k: int, tok) -> dict:
    """{model label: {role: {"loss": [D], "tokens": [D]}}} on fresh role text (heldout.py);
    empty when the corpora are real files."""
    texts = heldout.texts(recipe, Paths(recipe.run_dir).data)
    if texts is None:
        log("evaluate  held-out loss: skipped (real corpora need evaluate.heldout_files; the synthetic world draws its own)")
        return {}
    out = {}
    for name, folder in untuned(recipe, k).items():
        model = load_model(folder).to(device_of(recipe))
        if instruct.is_moe(model):
            models.use_experts(model, recipe.instruct.experts_implementation)
        out[name] = {}
        for role, docs in texts.items():
            loss, tokens = heldout.doc_losses(model, tok, docs, recipe.model.seq_len, recipe.evaluate.batch_size)
            out[name][role] = {"loss": loss, "tokens": tokens}
        log(f"evaluate {name}  held-out loss " + "  ".join(
            f"{role} {sum(c['loss']) / sum(c['tokens']):.3f}" for role, c in out[name].items()))
    return out


def compute(recipe: Recipe, k: int) -> dict:
    """{model label: {"tokens", "flops"}}: every finished training stage behind each tuned model."""
    from transformers import AutoConfig

    p = Paths(recipe.run_dir)
    folders = {"pretrain": p.model, "mix": p.mixed, "instruct": p.tuned}
    out = {}
    for name in model_names(recipe):
        stages = {}
        for step in mix.lineage(name, recipe):
            kind, what = step.split(" ", 1)
            folder = folders[kind](k, what)
            finished = done(folder)
            if finished and (folder / "model" / "config.json").is_file():
                stages[step] = (finished.get("summary", {}), AutoConfig.from_pretrained(folder / "model"))
        out[label(name)] = mix.account(stages)
    return out


def label(name: str) -> str:
    return {"team": "team (MoE)", "dense": "dense baseline", "merge": "uniform merge"}.get(name, f"{name} expert")


def expert_names(recipe: Recipe) -> list[str]:
    return list(ROLES) + ["base"] * recipe.assemble.base_expert


def run_report(recipe: Recipe, seeds: list[int]) -> str:
    """results.json, results.md and routing.png over the seeds; returns the Markdown."""
    p = Paths(recipe.run_dir)
    for k in seeds:  # the table is stamped with the recipe: every model in it must have been made with it
        why = stale(recipe, p.seed(k) / "eval") or (None if done(p.seed(k) / "eval") else f"seed {k} has no evaluation yet")
        if why:
            raise ValueError(f"results table: {why}; run `finteam run` to rebuild what the change affects")
    per_seed = [json.loads((p.seed(k) / "eval" / "results.json").read_text()) for k in seeds]
    tests, meta = test_sets(recipe, p.data)
    summary = report.aggregate(per_seed)
    routing = per_seed[0]["routing"]
    routing_mean = {t: torch.tensor(v).mean(0).tolist() for t, v in routing.items()}
    if routing:
        evaluate.heat_map(routing, expert_names(recipe), p.run / "routing.png")
    speed = per_seed[0].get("throughput", {})
    predictions = {m: [r["predictions"][m] for r in per_seed] for m in per_seed[0]["scores"]}
    gold = {t: [e.answer for e in v] for t, v in tests.items()}
    tasks = {t: {**meta[t], "gold": gold[t]} for t in tests}
    intervals = stats.summarise(stats.Bootstrap(tasks, predictions, recipe.evaluate.numeric_tolerance), list(predictions),
                                label("team"))
    flags = report.collapsed(predictions, meta)

    def reference(answers: dict[str, list[str]]) -> dict[str, float]:  # {task: headline score} of a reference's answers
        return {t: evaluate.scores({t: a}, tests, meta, recipe.evaluate)[t][metrics.HEADLINE[meta[t]["metric"]]]
                for t, a in answers.items()}

    labelled = [t for t in tests if meta[t]["choices"]]
    majority = reference({t: metrics.majority_answers(gold[t]) for t in labelled})
    bow = reference(bag_of_words_answers(p.data, tests, labelled))
    stored = {"majority": majority, "bag_of_words": bow}  # results.json's keys; report.references names the rows
    specialisation = [report.routing_specialisation(r["routing"], meta, expert_names(recipe)) for r in per_seed if r["routing"]]
    notes = [f"{len(seeds)} seed(s); each score with its 95% interval from a paired bootstrap over test items and seeds "
             f"({intervals['reps']} replicates, finteam/stats.py); test examples per task: "
             + ", ".join(f"{t} {len(v)}" for t, v in tests.items()) + "."]
    notes.append("Held out: no test item (prompt, or the post after `Text:` for real files) occurs in train or valid.")
    losses = [r.get("heldout") or {} for r in per_seed]
    heldout_loss = stats.loss_intervals(losses, label("team")) if all(losses) else None
    text = report.markdown(summary, meta, speed, routing_mean, expert_names(recipe), notes, intervals=intervals, flags=flags,
                           references=report.references(stored), specialisation=specialisation,
                           compute=per_seed[0].get("compute"), heldout=heldout_loss)
    write_json(p.run / "results.json", {"summary": summary, "intervals": intervals, "collapsed": flags, **stored,
                                        "specialisation": specialisation, "heldout_loss": heldout_loss,
                                        "per_seed": per_seed, "throughput": speed,
                                        "routing_mean": routing_mean, "tasks": meta, **stamp(recipe, "report")})
    (p.run / "results.md").write_text(text + "\n")
    return text


def bag_of_words_answers(data_dir: Path, tests: dict, tasks: list[str]) -> dict[str, list[str]]:
    """{task: answers} of the bag-of-words reference (bag_of_words.py) on each task's test items,
    trained on the task's training examples, its strength picked on the valid ones."""
    train, valid = examples_by_task(data_dir, "train"), examples_by_task(data_dir, "valid")

    def pairs(examples) -> list[tuple[str, str]]:
        return [(e.prompt, e.answer) for e in examples]

    return {t: bag_of_words.answers(pairs(train[t]), pairs(valid.get(t, [])), [e.prompt for e in tests[t]])
            for t in tasks if t in train}


def run_all(recipe: Recipe, seeds: int = 1, force: bool = False) -> str:
    t0 = time.perf_counter()
    run_data(recipe, force)
    ks = list(range(seeds))
    for k in ks:
        run_pretrain(recipe, k, force)
        run_assemble(recipe, k, force)
        run_mix(recipe, k, force)
        run_instruct(recipe, k, force)
        run_evaluate(recipe, k, force)
    if rank_and_size()[0] != 0:
        return ""
    text = run_report(recipe, ks)
    log(f"\n{text}\nResults in {recipe.run_dir}/results.md (and .json, routing.png); "
        f"whole run {duration(time.perf_counter() - t0)}")
    return text
