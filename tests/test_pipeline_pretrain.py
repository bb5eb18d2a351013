"""Pretraining as a user runs it: killed and resumed, interrupted with Ctrl-C, and data-parallel
under torchrun (FSDP2 over gloo, two CPU processes). Each run is a real `finteam` process."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from finteam import model as models
from finteam import pipeline
from finteam.config import load_recipe
from finteam.tokenizer import load
from runs import new_run, prepared  # noqa: F401 (prepared is a fixture)

ROOT = Path(__file__).resolve().parent.parent
STEPS = 24


def overrides(out: Path, **extra) -> list[str]:
    fields = {"out_dir": out, "pretrain.base.steps": STEPS, "pretrain.base.save_every": 3, "pretrain.base.batch_size": 16,
              "pretrain.base.log_every": 1, **extra}
    return [f"{k}={v}" for k, v in fields.items()]


def command(out: Path, **extra) -> list[str]:
    args = ["pretrain", "--recipe", "smoke", "--only", "base"]
    for item in overrides(out, **extra):
        args += ["--set", item]
    return args


def env() -> dict:
    # One thread per process: the same arithmetic in every run, so resumed weights match bitwise.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def finteam(args: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "finteam.cli", *args], cwd=ROOT, env=env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)


def latest_step(run: Path) -> int:
    latest = run / "seed0" / "base" / "checkpoints" / "latest"
    return int(os.readlink(latest).split("_")[1]) if latest.is_symlink() else 0


def stop_at(proc: subprocess.Popen, run: Path, step: int, sig: int) -> None:
    deadline = time.monotonic() + 120
    while latest_step(run) < step:
        assert proc.poll() is None, f"training ended before step {step}:\n{proc.stdout.read()}"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    proc.send_signal(sig)


def weights(run: Path) -> dict:
    return load_file(run / "seed0" / "base" / "model" / "model.safetensors")


def test_kill_and_ctrl_c_then_resume_match_an_uninterrupted_run(prepared, tmp_path):
    whole, broken = new_run(prepared, tmp_path / "whole"), new_run(prepared, tmp_path / "broken")
    reference = finteam(command(whole))

    first = finteam(command(broken))
    stop_at(first, broken, 6, signal.SIGINT)  # Ctrl-C: finish the step, save, exit 130
    out = first.communicate()[0]
    assert first.returncode == 130, out
    assert "Run the same command again to resume" in out
    interrupted_at = latest_step(broken)
    assert 6 <= interrupted_at < STEPS

    second = finteam(command(broken))
    stop_at(second, broken, interrupted_at + 3, signal.SIGKILL)  # a real kill: no chance to save
    second.communicate()
    killed_at = latest_step(broken)
    assert killed_at < STEPS and not (broken / "seed0" / "base" / "model").exists()

    third = finteam(command(broken))
    out = third.communicate()[0]
    assert third.returncode == 0, out
    assert f"resuming at step {killed_at}/{STEPS}" in out
    assert reference.communicate()[0] and reference.returncode == 0
    a, b = weights(whole), weights(broken)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after resume"
    # the checkpoint folder carries the recipe and the code version
    meta = (broken / "seed0" / "base" / "model" / "finteam.json").read_text()
    assert '"version"' in meta and '"recipe"' in meta and '"commit"' in meta


def test_fsdp2_two_processes_match_one_process_with_accumulation(prepared, tmp_path):
    """torchrun with 2 ranks x batch 4 sees the same samples per step as 1 process with 2
    micro-batches of 4 (train.py's data order), so FSDP2's averaged gradients must give the
    same weights up to reduction order."""
    dp, single = new_run(prepared, tmp_path / "dp"), new_run(prepared, tmp_path / "single")
    small = {"pretrain.base.steps": 4, "pretrain.base.batch_size": 4, "pretrain.base.save_every": 2}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
                "-m", "finteam.cli"]
    proc = subprocess.run(torchrun + command(dp, **small), cwd=ROOT, env=env(), text=True, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    pipeline.run_pretrain(load_recipe("smoke", overrides(single, **small, **{"pretrain.base.grad_accum": 2})), 0, only=["base"])
    a, b = weights(dp), weights(single)
    assert a.keys() == b.keys()
    moved = 0
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)
    initial = load_recipe("smoke")  # the weights moved away from init, so the match means something
    tok = load(dp / "tokenizer")
    fresh = models.build(models.llama_config(initial.model.base, len(tok), tok.pad_token_id, tok.eos_token_id), initial.seed)
    for name, t in fresh.state_dict().items():
        if name in a:
            moved += not torch.allclose(t, a[name], atol=1e-4)
    assert moved > len(a) // 2


def test_ffn_only_experts_keep_every_other_weight_of_the_base(prepared, tmp_path):
    """`pretrain.expert_trains: ffn`: attention, norms and embeddings stay the base's bit for bit
    (so the team with `assemble.shared: base` is exactly each expert where its router picks it),
    and every FFN weight moves."""
    run = new_run(prepared, tmp_path / "run")
    recipe = load_recipe("smoke", [f"out_dir={run}", "pretrain.expert_trains=ffn"])
    pipeline.run_pretrain(recipe, 0, only=["base", "macro"])
    base = load_file(run / "seed0" / "base" / "model" / "model.safetensors")
    expert = load_file(run / "seed0" / "experts" / "macro" / "model" / "model.safetensors")
    assert base.keys() == expert.keys()
    ffn = [name for name in base if ".mlp." in name]
    assert len(ffn) == 3 * models.SIZES["smoke"]["num_hidden_layers"]  # gate, up and down of each layer
    for name in base:
        if name in ffn:
            assert not torch.equal(base[name], expert[name]), f"{name} did not train"
        else:
            assert torch.equal(base[name], expert[name]), f"{name} moved"
