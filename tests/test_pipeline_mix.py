"""The mix stage (Branch-Train-MiX's MiX phase): killed and resumed it ends with the weights of
an uninterrupted run; team, dense and merge read the same tokens; the compute accounting
counts parameters as the models do and sums each tuned model's lineage."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig

from finteam import assemble, mix, pipeline, pretrain
from finteam import model as models
from finteam.checkpoint import load_model, mark_done, save_model
from finteam.config import ROLES, load_recipe
from finteam.tokenizer import load as load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
STEPS = 12


def overrides(out: Path) -> list[str]:
    # transformers' eager experts: this is about the stage, and the kernels have their own tests
    fields = {"out_dir": out, "mix.train.steps": STEPS, "mix.train.save_every": 2, "mix.train.log_every": 1,
              "mix.train.batch_size": 8, "instruct.experts_implementation": "eager"}
    return [f"{k}={v}" for k, v in fields.items()]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A smoke run up to assemble: data, tokenizer, and a base, experts and team made without
    training (the experts are the base with its FFNs nudged apart), so this test is about mix."""
    out = tmp_path_factory.mktemp("prepared")
    recipe = load_recipe("smoke", overrides(out))
    p = pipeline.Paths(recipe.run_dir)
    pipeline.run_data(recipe)
    tok = load_tokenizer(p.tokenizer)
    base = pretrain.base_model(recipe, tok, seed=0)
    save_model(base, p.model(0, "base") / "model", {"stage": "test"}, tok)
    experts = []
    for i, role in enumerate(ROLES):
        expert = load_model(p.model(0, "base") / "model")
        with torch.no_grad():
            for name, w in expert.named_parameters():
                if ".mlp." in name:
                    w.add_(0.02 * torch.randn(w.shape, generator=torch.Generator().manual_seed(i)))
        save_model(expert, p.model(0, role) / "model", {"stage": "test"}, tok)
        experts.append(p.model(0, role) / "model")
    pipeline.run_assemble(recipe, 0)
    return out


def new_run(prepared: Path, path: Path) -> Path:
    shutil.copytree(prepared, path)
    return path


def env() -> dict:
    # One thread per process: the same arithmetic in every run, so resumed weights match bitwise.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def finteam(run: Path) -> subprocess.Popen:
    args = ["mix", "--recipe", "smoke", "--only", "team"]
    for item in overrides(run):
        args += ["--set", item]
    return subprocess.Popen([sys.executable, "-m", "finteam.cli", *args], cwd=ROOT, env=env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def latest_step(run: Path) -> int:
    latest = run / "seed0" / "mix" / "team" / "checkpoints" / "latest"
    return int(os.readlink(latest).split("_")[1]) if latest.is_symlink() else 0


def test_mix_killed_and_resumed_matches_an_uninterrupted_run(prepared, tmp_path):
    whole, broken = new_run(prepared, tmp_path / "whole"), new_run(prepared, tmp_path / "broken")
    reference = finteam(whole)
    first = finteam(broken)
    deadline = time.monotonic() + 600
    while latest_step(broken) < 4:
        assert first.poll() is None, f"mix ended before step 4:\n{first.stdout.read()}"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)  # a real kill: no chance to save
    first.communicate()
    killed_at = latest_step(broken)
    assert 4 <= killed_at < STEPS and not (broken / "seed0" / "mix" / "team" / "model").exists()
    second = finteam(broken)
    out = second.communicate()[0]
    assert second.returncode == 0, out
    assert f"resuming at step {killed_at}/{STEPS}" in out
    assert reference.communicate()[0] and reference.returncode == 0
    a = load_file(whole / "seed0" / "mix" / "team" / "model" / "model.safetensors")
    b = load_file(broken / "seed0" / "mix" / "team" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after resume"
    team = load_model(broken / "seed0" / "mix" / "team" / "model")
    assert type(team).__name__ == "MixtralForCausalLM" and not team.config.output_router_logits
    before = load_file(broken / "seed0" / "moe" / "model" / "model.safetensors")
    assert any(not torch.equal(before[n], b[n]) for n in b if n.endswith(".gate.weight")), "the router should learn in mix"


def test_team_dense_and_merge_get_the_same_tokens_and_instruct_starts_from_mix(prepared, tmp_path):
    run = new_run(prepared, tmp_path / "run")
    recipe = load_recipe("smoke", overrides(run) + ["mix.train.steps=2"])
    p = pipeline.Paths(recipe.run_dir)
    tok = load_tokenizer(p.tokenizer)
    dense = pretrain.base_model(recipe, tok, 0, intermediate=recipe.assemble.top_k * models.SIZES["smoke"]["intermediate_size"])
    save_model(dense, p.model(0, "dense") / "model", {"stage": "test"}, tok)
    pipeline.run_mix(recipe, 0)
    summaries = {n: json.loads((p.mixed(0, n) / "finteam.json").read_text())["summary"] for n in mix.MIXED}
    tokens = {n: s["tokens"] for n, s in summaries.items()}
    assert tokens == {n: 2 * 8 * recipe.model.seq_len for n in mix.MIXED}, tokens
    # instruct reads the mixed checkpoints; with the stage off, the assembled ones
    assert pipeline.source_of(recipe, p, 0, "team") == p.mixed(0, "team") / "model"
    assert pipeline.source_of(recipe, p, 0, "macro") == p.model(0, "macro") / "model"
    off = load_recipe("smoke", overrides(run) + ["mix.enabled=false"])
    assert pipeline.source_of(off, p, 0, "team") == p.model(0, "moe") / "model"
    assert pipeline.source_of(off, p, 0, "dense") == p.model(0, "dense") / "model"


@pytest.mark.parametrize("kind", ["llama", "llama untied", "mixtral top-1", "mixtral top-2", "mixtral 4 experts"])
def test_active_params_from_config_equals_the_models_count(kind):
    llama = models.llama_config("smoke", 300, 0, 1)
    llama.tie_word_embeddings = "untied" not in kind  # a separate head counts twice
    if kind.startswith("llama"):
        model, k = models.build(llama, 0), None
    else:
        k = 1 if "top-1" in kind else 2
        model = assemble.build_moe([models.build(llama, s) for s in range(3)], models.build(llama, 9),
                                   base_expert="4 experts" in kind, top_k=k)
    assert mix.active_params(model.config) == models.num_params(model, k)


def test_lineage_and_compute_accounting(prepared, tmp_path):
    recipe = load_recipe("smoke", overrides(tmp_path))
    assert mix.lineage("team", recipe) == ["pretrain base", "pretrain macro", "pretrain micro", "pretrain quant",
                                           "mix team", "instruct team"]
    assert mix.lineage("dense", recipe) == ["pretrain dense", "mix dense", "instruct dense"]
    assert mix.lineage("quant", recipe) == ["pretrain base", "pretrain quant", "instruct quant"]
    off = load_recipe("smoke", overrides(tmp_path) + ["mix.enabled=false"])
    assert mix.lineage("merge", off) == ["pretrain base", "pretrain macro", "pretrain micro", "pretrain quant", "instruct merge"]
    # by hand: 6 x active parameters x tokens per stage, summed
    team = AutoConfig.from_pretrained(prepared / "seed0" / "moe" / "model")
    base = AutoConfig.from_pretrained(prepared / "seed0" / "base" / "model")
    got = mix.account({"pretrain base": ({"tokens": 1000}, base), "mix team": ({"tokens": 300}, team), "x": ({}, team)})
    assert got["tokens"] == 1300
    assert got["flops"] == pytest.approx(6 * (1000 * mix.active_params(base) + 300 * mix.active_params(team)))
    # the pipeline reads the finished stages' summaries: here the mix team stage alone has tokens
    run = new_run(prepared, tmp_path / "run")
    recipe = load_recipe("smoke", overrides(run))
    p = pipeline.Paths(recipe.run_dir)
    mark_done(p.mixed(0, "team"), {"stage": "test"}, 1.0, {"tokens": 512})
    shutil.copytree(p.model(0, "moe") / "model", p.mixed(0, "team") / "model")
    for name in ["base", *ROLES]:
        mark_done(p.model(0, name), {"stage": "test"}, 1.0, {"tokens": 100})
    table = pipeline.compute(recipe, 0)
    assert table["team (MoE)"]["tokens"] == 4 * 100 + 512
    assert table["team (MoE)"]["flops"] == pytest.approx(6 * (400 * mix.active_params(base) + 512 * mix.active_params(team)))
    assert table["macro expert"]["tokens"] == 200
