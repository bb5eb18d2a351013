"""The smoke recipe end to end through the CLI: every stage, every baseline, the results table,
the routing heat map, throughput eager vs finteam experts; then what a user does next (load the
team with transformers, generate, rerun and be skipped)."""
import json

import pytest
from transformers import AutoModelForCausalLM

from finteam import pipeline
from finteam.cli import main
from finteam.config import load_recipe


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    assert main(["run", "--recipe", "smoke", "--set", f"out_dir={out}"]) == 0
    return out


def test_run_writes_the_results_table_and_heat_map(smoke_run, capsys):
    table = (smoke_run / "results.md").read_text()
    for row in ("team (MoE)", "dense baseline", "macro expert", "micro expert", "quant expert", "uniform merge"):
        assert f"| {row} |" in table
    assert "sentiment (f1)" in table and "movement (mcc)" in table and "numeric (em)" in table
    assert (smoke_run / "routing.png").stat().st_size > 1000
    results = json.loads((smoke_run / "results.json").read_text())
    assert results["version"] and "recipe" in results
    speed = results["throughput"]
    assert speed["team, eager experts"]["train_tok_s"] > 0
    assert speed["team, finteam experts"].get("prefill_tok_s", 0) > 0, speed
    routing = results["routing_mean"]
    assert set(routing) == {"sentiment", "headlines", "ner", "numeric", "movement"}
    for shares in routing.values():
        assert sum(shares) == pytest.approx(1.0)
    bow = results["bag_of_words"]
    assert set(bow) == {"sentiment", "headlines", "movement"}  # the label tasks
    assert "| majority class |" in table
    assert f"| bag of words | {bow['sentiment']:.3f} | {bow['headlines']:.3f} | - | - | {bow['movement']:.3f} |" in table
    assert "Held-out next-token loss on each role's text" in table
    losses = results["heldout_loss"]["scores"]
    assert set(losses) == {"team (MoE)", "dense baseline", "macro expert", "micro expert", "quant expert", "uniform merge", "base"}
    for model, cells in losses.items():
        assert set(cells) == {"macro", "micro", "quant", "mean"} and all(0 < c["value"] < 20 for c in cells.values()), model


def test_every_checkpoint_carries_recipe_and_version(smoke_run):
    folders = [p.parent for p in smoke_run.glob("seed0/**/model/config.json")]
    assert len(folders) == 1 + 3 + 1 + 1 + 1 + 3 + 6  # base, experts, dense, team, merge, three mixed, six tuned
    for folder in folders:
        meta = json.loads((folder / "finteam.json").read_text())
        assert meta["recipe"]["name"] == "smoke" and meta["version"], folder
        assert (folder / "model.safetensors").is_file()
        assert not list(folder.parent.glob("checkpoints")), "training state is removed once the model is saved"


def test_the_team_is_a_plain_transformers_checkpoint_and_generates(smoke_run, capsys):
    team = smoke_run / "seed0" / "instruct" / "team" / "model"
    model = AutoModelForCausalLM.from_pretrained(team, experts_implementation="finteam")
    assert type(model).__name__ == "MixtralForCausalLM" and model.config.num_local_experts == 3
    capsys.readouterr()
    assert main(["generate", "--recipe", "smoke", "--set", f"out_dir={smoke_run}", "--model", "team",
                 "--prompt", "Daily returns of ABCD over the last five sessions: +1.0%, +0.5%, -0.2%, +0.7%, +1.1%. "
                 "Will the stock rise or fall on the next trading day? Answer Rise or Fall.\nAnswer:",
                 "--max-new-tokens", "4"]) == 0
    assert ">>> " in capsys.readouterr().out


def test_finished_stages_are_skipped_unless_forced(smoke_run, capsys):
    recipe = load_recipe("smoke", [f"out_dir={smoke_run}"])
    capsys.readouterr()
    pipeline.run_pretrain(recipe, 0)
    pipeline.run_instruct(recipe, 0)
    out = capsys.readouterr().out
    assert out.count("done already") == 1 + 3 + 1 + 6
