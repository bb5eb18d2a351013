"""What keeps a run honest when something goes wrong: training that diverges stops (named stage
and step, last good checkpoint kept, stage never marked done); saved files carry checksums that
are checked before anything reads them; a changed setting reruns what it affects (or is refused
with the difference); one run at a time per run folder. Smallest settings throughout."""
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finteam import model as models
from finteam import pipeline
from finteam.checkpoint import (
    SUMS,
    CheckpointError,
    RunLock,
    load_model,
    load_train_state,
    save_model,
    verify_sums,
)
from finteam.cli import main
from finteam.config import TrainConfig, load_recipe, settings_of
from finteam.tokenizer import load as load_tokenizer
from finteam.train import Diverged, fit
from runs import new_run, prepared  # noqa: F401 (prepared is a fixture)

TINY = {"pretrain.base.steps": 4, "pretrain.base.save_every": 2, "pretrain.base.batch_size": 4,
        "pretrain.expert.steps": 2, "pretrain.expert.save_every": 1, "pretrain.expert.batch_size": 4}


def args(command: list[str], run: Path, **fields) -> list[str]:
    out = [*command, "--recipe", "smoke"]
    for key, value in {"out_dir": run, **TINY, **fields}.items():
        out += ["--set", f"{key}={value}"]
    return out


def one_line_error(capsys, argv: list[str], code: int = 1) -> str:
    assert main(argv) == code
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


# ---------------------------------------------------------------------------------------------
# Divergence


def test_a_diverging_stage_stops_keeps_its_last_checkpoint_and_is_not_done(prepared, tmp_path, capsys):
    run = new_run(prepared, tmp_path / "run")
    err = one_line_error(capsys, args(["pretrain", "--only", "base"], run, **{
        "pretrain.base.lr": 1000, "pretrain.base.steps": 12, "pretrain.base.save_every": 3, "pretrain.base.batch_size": 8}))
    assert "finteam pretrain: pretrain base: non-finite loss or gradient at step " in err
    step = int(err.split("at step ")[1].split("/")[0])
    assert 2 <= step <= 12  # lr=1000 ruins the weights within a few steps
    stage = run / "seed0" / "base"
    assert not json.loads((stage / "finteam.json").read_text())["done"]
    assert not (stage / "model").exists()
    latest = stage / "checkpoints" / "latest"
    if step > 3:
        assert f"The last good checkpoint, {latest.resolve().name}, is kept" in err
        weights, _ = load_train_state(stage / "checkpoints")
        assert all(torch.isfinite(w).all() for w in weights.values())
    # later stages do not build on it
    err = one_line_error(capsys, args(["pretrain", "--only", "macro"], run, **{
        "pretrain.base.lr": 1000, "pretrain.base.steps": 12, "pretrain.base.save_every": 3, "pretrain.base.batch_size": 8}))
    assert "pretrain base has not finished there" in err


class Stream:
    """Random token blocks, the shape PackedTokens gives."""

    def get(self, first: int, size: int) -> dict:
        g = torch.Generator().manual_seed(first)
        x = torch.randint(0, 64, (size, 16), generator=g)
        return {"input_ids": x, "labels": x}


def smoke_llama():
    return models.build(models.llama_config("smoke", 64, 0, 1), seed=0)


@pytest.mark.parametrize("grad_clip", [1.0, 0.0])  # 0: clipping off, the norm is still checked
def test_a_non_finite_gradient_with_a_finite_loss_stops_before_the_optimizer_step(tmp_path, grad_clip):
    model = smoke_llama()
    calls = {"n": 0}
    weight = model.model.layers[0].mlp.up_proj.weight

    def poison(grad):  # the third step's gradient (one micro-batch a step) overflows
        calls["n"] += 1
        return grad * math.inf if calls["n"] == 3 else grad

    weight.register_hook(poison)
    cfg = TrainConfig(steps=5, batch_size=2, warmup=0, save_every=2, log_every=1, grad_clip=grad_clip)
    with pytest.raises(Diverged, match=r"^run: non-finite loss or gradient at step 3/5 \(here: loss [0-9.]+, gradient norm "):
        fit(model, Stream(), cfg, tmp_path, {"stage": "test"}, "run", torch.device("cpu"))
    saved, trainer = load_train_state(tmp_path / "checkpoints")
    assert trainer["step"] == 2
    for name, p in model.named_parameters():  # the weights are step 2's: the bad step changed nothing
        if name in saved:
            assert torch.equal(p.detach(), saved[name]), name


# ---------------------------------------------------------------------------------------------
# Checksums


def flip_a_byte(path: Path, offset_from_end: int = 100) -> None:
    """Corrupt a tensor byte, header intact: the file still parses, the values do not match."""
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_corrupted_checkpoint_is_named_on_resume(prepared, tmp_path, capsys):
    run = new_run(prepared, tmp_path / "run")
    diverging = args(["pretrain", "--only", "base"], run, **{
        "pretrain.base.lr": 1000, "pretrain.base.steps": 12, "pretrain.base.save_every": 1, "pretrain.base.batch_size": 8})
    assert "non-finite loss or gradient" in one_line_error(capsys, diverging)  # leaves checkpoints, unfinished
    ckpt = (run / "seed0" / "base" / "checkpoints" / "latest").resolve()
    flip_a_byte(ckpt / "model.safetensors")
    err = one_line_error(capsys, diverging)
    assert f"checkpoint file {ckpt / 'model.safetensors'} is truncated or corrupted" in err
    assert f"delete {run / 'seed0' / 'base' / 'checkpoints'} to start the stage over" in err


def pretrain_model(recipe, tok):
    from finteam.pretrain import base_model

    return base_model(recipe, tok, seed=0)


def test_checkpoints_carry_checksums_and_a_later_stage_checks_them(prepared, tmp_path, capsys):
    run = new_run(prepared, tmp_path / "run")
    assert main(args(["pretrain", "--only", "base"], run)) == 0
    model = run / "seed0" / "base" / "model"
    listed = (model / SUMS).read_text()
    assert "  model.safetensors\n" in listed and "  config.json\n" in listed and "  finteam.json\n" in listed
    verify_sums(model, "")
    flip_a_byte(model / "model.safetensors")
    err = one_line_error(capsys, args(["pretrain", "--only", "macro"], run))
    assert f"checkpoint file {model / 'model.safetensors'} is truncated or corrupted" in err
    assert f"rerun the stage that wrote {model} with --force" in err
    # truncated
    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors is truncated or corrupted"):
        load_model(model)
    # a folder made elsewhere has no SHA256SUMS: a broken file still gets one line, not a SafetensorError
    (model / SUMS).unlink()
    with pytest.raises(CheckpointError, match=f"cannot load the checkpoint {model}: "):
        load_model(model)
    with pytest.raises(CheckpointError, match="no checkpoint at .*nothing \\(no config.json there\\)"):
        load_model(tmp_path / "nothing")


# ---------------------------------------------------------------------------------------------
# Reruns with changed settings


def stage_log(capsys) -> str:
    return capsys.readouterr().out


def test_a_changed_setting_reruns_what_it_affects_and_nothing_else(prepared, tmp_path, capsys):
    run = new_run(prepared, tmp_path / "run")
    first = ["pretrain", "--only", "base", "macro"]
    assert main(args(first, run)) == 0
    base_weights = load_file(run / "seed0" / "base" / "model" / "model.safetensors")
    stage_log(capsys)

    # how to run, not what: nothing reruns
    assert main(args(first, run, **{"pretrain.base.save_every": 1, "pretrain.expert.log_every": 5, "device": "cpu"})) == 0
    out = stage_log(capsys)
    assert out.count("done already") == 2, out

    # the experts' learning rate: the expert reruns, the base does not
    assert main(args(first, run, **{"pretrain.expert.lr": 0.001})) == 0
    out = stage_log(capsys)
    assert "pretrain base  done already" in out
    assert "pretrain macro  made with other settings (pretrain.expert.lr 0.002 then, 0.001 now): running it again" in out
    meta = json.loads((run / "seed0" / "experts" / "macro" / "finteam.json").read_text())
    assert meta["done"] and meta["settings"]["pretrain.expert.lr"] == 0.001

    # the base's: one stage alone is refused, naming the difference; the whole chain reruns in order
    err = one_line_error(capsys, args(["pretrain", "--only", "macro"], run, **{"pretrain.expert.lr": 0.001, "pretrain.base.lr": 0.001}))
    assert ("pretrain macro needs " in err and "but pretrain base was made with other settings "
            "(pretrain.base.lr 0.003 then, 0.001 now)") in err
    assert main(args(first, run, **{"pretrain.expert.lr": 0.001, "pretrain.base.lr": 0.001})) == 0
    out = stage_log(capsys)
    assert "pretrain base  made with other settings" in out
    assert "pretrain macro  made with other settings (a stage it reads has been made again since)" in out
    assert not torch.equal(load_file(run / "seed0" / "base" / "model" / "model.safetensors")["model.norm.weight"],
                           base_weights["model.norm.weight"])


def test_unfinished_work_with_other_settings_starts_over(prepared, tmp_path, capsys):
    run = new_run(prepared, tmp_path / "run")
    stage = run / "seed0" / "base"
    (stage / "checkpoints").mkdir(parents=True)
    recipe = load_recipe("smoke", args([], run)[3::2])
    settings = {**settings_of(recipe, ("seed", "model", "precision", "pretrain.base")), "pretrain.base.lr": 0.5}
    (stage / "finteam.json").write_text(json.dumps({"stage": "pretrain base", "done": False, "fingerprint": "0" * 64,
                                                    "settings": settings}))
    assert main(args(["pretrain", "--only", "base"], run)) == 0
    out = stage_log(capsys)
    assert "unfinished work in" in out and "pretrain.base.lr 0.5 then, 0.003 now" in out and "starting over" in out


def test_the_results_table_is_not_stamped_with_settings_the_models_never_saw(prepared, tmp_path):
    run = new_run(prepared, tmp_path / "run")
    recipe = load_recipe("smoke", [f"out_dir={run}"])
    p = pipeline.Paths(run)

    def fake_evaluation() -> dict:
        (p.seed(0) / "eval").mkdir(parents=True, exist_ok=True)
        return {}

    pipeline.stage("evaluate", p.seed(0) / "eval", recipe, False, fake_evaluation,
                   needs=("evaluate",), inputs=(p.data, p.tokenizer))
    changed = load_recipe("smoke", [f"out_dir={run}", "data.world.docs_per_role=100"])
    with pytest.raises(ValueError, match=r"results table: data was made with other settings "
                                         r"\(data.world.docs_per_role 250 then, 100 now\)"):
        pipeline.run_report(changed, [0])
    assert not (run / "results.json").exists()


# ---------------------------------------------------------------------------------------------
# One run per folder


def test_a_second_run_into_a_locked_folder_is_told_who_holds_it(prepared, tmp_path, capsys):
    run = new_run(prepared, tmp_path / "run")
    with RunLock(run, "finteam run --recipe smoke"):
        err = one_line_error(capsys, args(["pretrain", "--only", "base"], run), code=2)
        assert f"{run} is in use by pid " in err and "(finteam run --recipe smoke)" in err and " since " in err
        assert not (run / "seed0").exists()
    assert main(args(["pretrain", "--only", "base"], run)) == 0  # released with its holder


# ---------------------------------------------------------------------------------------------
# generate


@pytest.fixture(scope="module")
def checkpoint(prepared, tmp_path_factory) -> Path:
    recipe = load_recipe("smoke")
    tok = load_tokenizer(prepared / "tokenizer")
    folder = tmp_path_factory.mktemp("generate") / "model"
    save_model(pretrain_model(recipe, tok), folder, {"stage": "test"}, tok)
    return folder


@pytest.mark.parametrize("extra, message", [
    (["--prompt", ""], "--prompt number 1 is empty"),
    (["--prompt", "ok", "--prompt", "  "], "--prompt number 2 is empty"),
    (["--file", "/no/such/prompts.txt"], "--file '/no/such/prompts.txt' does not exist"),
    (["--file", "/tmp"], "--file '/tmp' is a folder, not a text file"),
    (["--prompt", "x", "--max-new-tokens", "512"], "--max-new-tokens must be below the model's 512 positions; got 512"),
])
def test_generate_inputs(checkpoint, capsys, extra, message):
    code = 1 if "--max-new-tokens" in extra else 2  # 1: found once the model is read
    assert message in one_line_error(capsys, ["generate", "--recipe", "smoke", "--model", str(checkpoint), *extra], code)


def test_generate_file_of_blank_lines(checkpoint, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("\n  \n")
    err = one_line_error(capsys, ["generate", "--recipe", "smoke", "--model", str(checkpoint), "--file", str(tmp_path / "p.txt")], 2)
    assert "holds no prompt" in err


def test_a_prompt_longer_than_the_positions_is_cut_from_the_left_and_said_so(checkpoint, capsys):
    prompt = " ".join(["inflation"] * 700) + " Answer:"
    assert main(["generate", "--recipe", "smoke", "--model", str(checkpoint), "--prompt", prompt, "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "generate  prompt 1 has " in out and "tokens and the model 512 positions: its first " in out
    assert "the last 508 kept (room for 4 new)" in out and ">>> " in out
