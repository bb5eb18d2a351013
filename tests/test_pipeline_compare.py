"""`finteam compare`: teams of finished runs, paired on the same items and seeds, against a case
worked out by hand; runs that were not scored alike are refused."""
import json

import pytest

from finteam import cli
from finteam.compare import compare

GOLD = ["Yes", "No", "Yes", "No", "Yes", "No", "Yes", "No"]
WRONG = ["No" if g == "Yes" else "Yes" for g in GOLD]


def write_run(folder, teams, gold=GOLD, team_loss=None):
    """A run folder's results.json: one label task, the team's answers per seed, a dense baseline
    that always says 'Yes'; with `team_loss`, held-out losses: four one-token macro documents,
    the team's each `team_loss` nats, the dense baseline's 2."""
    per_seed = [{"predictions": {"team (MoE)": {"headlines": team}, "dense baseline": {"headlines": ["Yes"] * len(gold)}},
                 "gold": {"headlines": gold}} for team in teams]
    if team_loss is not None:
        for seed in per_seed:
            seed["heldout"] = {m: {"macro": {"loss": [v] * 4, "tokens": [1] * 4}}
                               for m, v in (("team (MoE)", team_loss), ("dense baseline", 2.0))}
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({
        "per_seed": per_seed,
        "tasks": {"headlines": {"metric": "classification", "role": "macro", "choices": ["Yes", "No"]}},
        "recipe": {"evaluate": {"numeric_tolerance": 0.01}}}))
    return str(folder)


def row(text, model, paired=False):
    """The model's row in the scores table, or (paired) in the table of the reference minus each model."""
    scores, differences = text.split(" minus each model")
    return next(line for line in (differences if paired else scores).splitlines() if line.startswith(f"| {model} |"))


def test_a_perfect_team_minus_a_wrong_one_is_one_on_every_draw(tmp_path):
    right = write_run(tmp_path / "right", [GOLD, GOLD])
    wrong = write_run(tmp_path / "wrong", [WRONG, WRONG])
    text = compare([f"{right}:right", f"{wrong}:wrong"])
    # weighted F1: 1 for the right team, 0 for the wrong one, on every resampled item set
    assert row(text, "team wrong", paired=True) == "| team wrong | 1.000 [1.000, 1.000] ✓ | 1.000 [1.000, 1.000] ✓ |"
    assert row(text, "team right") == "| team right | 1.000 [1.000, 1.000] | 1.000 [1.000, 1.000] | 1.000, 1.000 |"
    # the wrong team answers 'No' to every 'Yes' and the other way round: no collapse
    assert "†" not in row(text, "team wrong")
    # the dense baseline says 'Yes' to all: F1 of the 'Yes' class 2/3 on half the items, weighted 1/3
    assert row(text, "dense baseline").startswith("| dense baseline | 0.333 [")
    assert "† |" in row(text, "dense baseline")  # one answer to every item: collapsed


def test_per_seed_means_are_each_seeds_own(tmp_path):
    mixed = write_run(tmp_path / "mixed", [GOLD, WRONG])
    text = compare([mixed])
    assert row(text, "team mixed").startswith("| team mixed | 0.500 [") and row(text, "team mixed").endswith("| 1.000, 0.000 |")


def test_runs_scored_on_other_items_or_seeds_are_refused(tmp_path):
    a = write_run(tmp_path / "a", [GOLD, GOLD])
    other_items = write_run(tmp_path / "b", [GOLD, GOLD], gold=WRONG)
    one_seed = write_run(tmp_path / "c", [GOLD])
    with pytest.raises(ValueError, match="other test items.*headlines"):
        compare([a, other_items])
    with pytest.raises(ValueError, match="1 seed"):
        compare([a, one_seed])
    with pytest.raises(ValueError, match="labelled 'a'"):
        compare([a, f"{one_seed}:a"])


def test_the_command_names_a_missing_run_and_exits_2(tmp_path, capsys):
    assert cli.main(["compare", str(tmp_path / "nowhere")]) == 2
    assert "results.json does not exist" in capsys.readouterr().err


def test_held_out_loss_of_every_team_beside_the_first_runs_baselines(tmp_path):
    a = write_run(tmp_path / "a", [GOLD, GOLD], team_loss=1.0)
    b = write_run(tmp_path / "b", [GOLD, GOLD], team_loss=1.5)
    held = compare([a, b]).split("Held-out next-token loss")[1]
    assert "| team a | 1.000 [1.000, 1.000] | 1.000 [1.000, 1.000] | 1.000, 1.000 |" in held
    assert "| team b | 1.500 [1.500, 1.500] |" in held and "| dense baseline | 2.000 [2.000, 2.000] |" in held
    assert "| team b | -0.500 [-0.500, -0.500] ✓ |" in held  # the first team's loss is lower
    without = write_run(tmp_path / "c", [GOLD, GOLD])
    assert "Held-out loss: not in every run" in compare([a, without])
