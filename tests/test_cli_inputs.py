"""Bad recipes and bad command lines get one clear message (naming the file, field or argument,
what was expected and what came) and a non-zero exit, before any work; never a traceback."""
import dataclasses
import json
import os
import typing
from pathlib import Path

import pytest

from finteam import config
from finteam.cli import main
from finteam.config import RecipeError, load_recipe


def fails(capsys, argv: list[str], code: int = 2) -> str:
    """Run the CLI, expect exit `code` and one message on stderr; return it."""
    assert main(argv) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip(), err
    return err


@pytest.mark.parametrize("item, message", [
    ("pretrain.base.lr=.inf", "pretrain.base.lr must be > 0 and finite; got inf"),
    ("pretrain.base.lr=.nan", "pretrain.base.lr must be > 0 and finite; got nan"),
    ("pretrain.expert.warmup=-3", "pretrain.expert.warmup must be >= 0; got -3"),
    ("instruct.train.grad_clip=-1", "instruct.train.grad_clip must be >= 0 and finite; got -1.0"),
    ("pretrain.base.min_lr_ratio=5", "pretrain.base.min_lr_ratio must be >= 0 and <= 1 and finite; got 5.0"),
    ("tokenizer.vocab_size=0", "tokenizer.vocab_size must be >= 258; got 0"),
    ("data.world.economies=0", "data.world.economies must be >= 1 and <= 8; got 0"),
    ("evaluate.batch_size=0", "evaluate.batch_size must be >= 1; got 0"),
    ("instruct.max_len=0", "instruct.max_len must be >= 16; got 0"),
    ("instruct.experts_implementation=nonsense", "instruct.experts_implementation must be one of finteam, eager"),
    ("evaluate.baselines=[dense, solo]", r"evaluate.baselines[1] must be one of dense, experts, merge; got 'solo'"),
    ("model.base=tnyi", "model.base names 'tnyi', which is neither a named size (smoke, tiny, llama3-8b) nor a checkpoint folder"),
    ("model.base=./no/such/folder", "model.base names './no/such/folder', which is neither a named size"),
    ("tokenizer.kind=base", "tokenizer.kind 'base' takes the tokenizer of a checkpoint folder"),
])
def test_check_rejects_values_out_of_range(capsys, item, message):
    err = fails(capsys, ["check", "--recipe", "smoke", "--set", item])
    assert message in err and "smoke.yaml" in err


def test_model_base_may_be_a_checkpoint_folder_but_not_a_file(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    (tmp_path / "file").write_text("")
    assert load_recipe("smoke", [f"model.base={tmp_path / 'ckpt'}"]).model.base == str(tmp_path / "ckpt")
    with pytest.raises(RecipeError, match="nor a checkpoint folder .*it is a file"):
        load_recipe("smoke", [f"model.base={tmp_path / 'file'}"])
    with pytest.raises(RecipeError, match="nor a checkpoint folder .*it has no config.json"):
        load_recipe("smoke", [f"model.base={tmp_path}"])


def test_every_number_in_a_recipe_declares_its_range():
    """The range is part of each field's declaration (config.setting); a new field that forgets
    it fails here, not in a user's run."""
    missing = []

    def walk(cls, prefix):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            if dataclasses.is_dataclass(hint):
                walk(hint, f"{prefix}{f.name}.")
            elif hint in (int, float) and not {"ge", "gt", "le"} & set(f.metadata):
                missing.append(prefix + f.name)

    walk(config.Recipe, "")
    assert not missing, f"fields without a declared range: {missing}"


def test_the_named_recipes_and_defaults_pass_their_own_checks():
    for name in ("tiny", "smoke"):
        load_recipe(name)
    load_recipe("llama3-8b", check_inputs=False)
    config.check_fields(config.Recipe(), "defaults")
    from finteam.synthetic import ECONOMIES

    economies = {f.name: f for f in dataclasses.fields(config.WorldConfig)}["economies"]
    assert economies.metadata["le"] == len(ECONOMIES)


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return str(path)


def test_yaml_syntax_errors_name_the_file_and_line(tmp_path, capsys):
    path = write(tmp_path, "name: smoke\nmodel:\n  base: smoke\n  seq_len: [64\n")
    err = fails(capsys, ["check", "--recipe", path])
    assert f"recipe {path}, line 5, column 1: expected ',' or ']'" in err and "<unicode string>" not in err
    assert "(while parsing a flow sequence that began on line 4)" in err


def test_a_key_given_twice_is_an_error(tmp_path, capsys):
    path = write(tmp_path, "name: smoke\nmodel:\n  base: smoke\n  seq_len: 64\n  seq_len: 32\n")
    err = fails(capsys, ["check", "--recipe", path])
    assert f"recipe {path}, line 5" in err and "duplicate key 'seq_len' (first given on line 4)" in err


def test_an_empty_recipe_file_is_an_error(tmp_path, capsys):
    for text in ("", "# only a comment\n"):
        err = fails(capsys, ["check", "--recipe", write(tmp_path, text)])
        assert "is empty" in err


def test_a_folder_given_as_the_recipe(tmp_path, capsys):
    (tmp_path / "r.yaml").mkdir()
    assert "is a folder; expected a YAML file" in fails(capsys, ["check", "--recipe", str(tmp_path / "r.yaml")])


def test_bad_set_values(capsys):
    err = fails(capsys, ["check", "--recipe", "smoke", "--set", "model.seq_len=[64"])
    assert "--set 'model.seq_len=[64', line 1, column 4: expected ',' or ']'" in err
    assert "expected section.field=value" in fails(capsys, ["check", "--recipe", "smoke", "--set", "=3"])


@pytest.mark.parametrize("argv, message", [
    (["run", "--seeds", "0"], "argument --seeds: expected an integer >= 1; got '0'"),
    (["pretrain", "--seeds", "-2"], "argument --seeds: expected an integer >= 1; got '-2'"),
    (["generate", "--model", "team", "--prompt", "x", "--max-new-tokens", "0"],
     "argument --max-new-tokens: expected an integer >= 1; got '0'"),
    (["generate", "--model", "team", "--prompt", "x", "--temperature", "-1"],
     "argument --temperature: expected a number >= 0 (0: greedy); got '-1'"),
    (["generate", "--model", "team", "--prompt", "x", "--temperature", "nan"],
     "argument --temperature: expected a number >= 0 (0: greedy); got 'nan'"),
])
def test_bad_numbers_on_the_command_line(capsys, argv, message):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    assert message in capsys.readouterr().err


def test_out_dir_that_is_a_file_stops_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "taken"
    blocker.write_text("")
    err = fails(capsys, ["data", "--recipe", "smoke", "--set", f"out_dir={blocker}/run"])
    assert f"{blocker} is a file, not a folder" in err
    err = fails(capsys, ["data", "--recipe", "smoke", "--set", f"out_dir={blocker}"])
    assert "is a file, not a folder" in err


def test_out_dir_that_cannot_be_written_stops_before_any_work(tmp_path, capsys):
    if os.geteuid() == 0:  # root writes anywhere a mode allows nothing: take a folder no one may write
        target = Path("/sys/finteam-run")
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        target = locked / "run"
    err = fails(capsys, ["data", "--recipe", "smoke", "--set", f"out_dir={target}"])
    assert f"out_dir '{target}' cannot be written" in err
    assert not list(tmp_path.glob("**/data"))


def test_out_dir_probe_leaves_another_process_probe_alone(tmp_path):
    """torchrun's ranks probe the same out_dir at once: one rank's check must not remove the
    other's probe file (with one shared name, a rank failed with 'cannot be written (No such
    file or directory)' on resuming a distributed run)."""
    from finteam.cli import run_folder

    others = [tmp_path / ".finteam-write-test", tmp_path / ".finteam-write-test-other"]
    for other in others:  # another rank's probe, made and not yet removed
        other.write_text("")
    assert run_folder(tmp_path) == tmp_path
    assert all(other.exists() for other in others)
    assert sorted(tmp_path.iterdir()) == sorted(others)  # and its own probe is gone


def conversations(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


GOOD = {"conversations": [{"from": "human", "value": "Q?\nAnswer:"}, {"from": "agent", "value": "Yes"}]}


def task_overrides(tmp_path: Path, train: str, test: str) -> list[str]:
    return [f"out_dir={tmp_path / 'run'}", f"data.instructions=[{{name: t, train: {train}, test: {test}}}]",
            "data.keep_synthetic_tasks=true"]


@pytest.mark.parametrize("rows, message", [
    ([GOOD, [1, 2]], "train.jsonl:2: expected a JSON object with a 'conversations' or 'messages' list; got [1, 2]"),
    ([GOOD, {"conversations": ["hi", "there"]}],
     "train.jsonl:2: 'conversations' must be a list of objects with 'from' and 'value'; got [\"hi\", \"there\"]"),
    ([GOOD, {"messages": "hi"}], "train.jsonl:2: 'messages' must be a list of objects with 'role' and 'content'"),
])
def test_bad_instruction_rows(tmp_path, capsys, rows, message):
    train = conversations(tmp_path / "train.jsonl", rows)
    test = conversations(tmp_path / "test.jsonl", [GOOD])
    args = ["data", "--recipe", "smoke"]
    for item in task_overrides(tmp_path, train, test):
        args += ["--set", item]
    assert message in fails(capsys, args, code=1)


def test_instruction_inputs_that_are_folders_or_empty_fail_the_recipe_check(tmp_path):
    test = conversations(tmp_path / "test.jsonl", [GOOD])
    (tmp_path / "folder").mkdir()
    with pytest.raises(RecipeError, match=r"data.instructions\[0\].train names '.*folder', which is a folder; expected a JSONL file"):
        load_recipe("smoke", task_overrides(tmp_path, str(tmp_path / "folder"), test))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(RecipeError, match=r"data.instructions\[0\].train names '.*empty.jsonl', which is empty"):
        load_recipe("smoke", task_overrides(tmp_path, str(tmp_path / "empty.jsonl"), test))


def test_a_task_left_without_test_examples_stops_the_data_stage(tmp_path, capsys):
    """A test file of blank lines (or whose rows all went) is found at the data stage, before
    pretraining, not as an empty results table."""
    train = conversations(tmp_path / "train.jsonl", [GOOD])
    (tmp_path / "test.jsonl").write_text("\n\n")
    args = ["data", "--recipe", "smoke"]
    for item in task_overrides(tmp_path, train, str(tmp_path / "test.jsonl")):
        args += ["--set", item]
    err = fails(capsys, args, code=1)
    assert "data: task 't' has no test examples" in err and "test.jsonl' holds none" in err
    assert not json.loads((tmp_path / "run" / "data" / "finteam.json").read_text())["done"]


def test_a_folder_given_as_an_instruction_file_to_the_reader(tmp_path):
    from finteam.data import read_conversations

    with pytest.raises(ValueError, match="is a folder; expected a JSONL file"):
        read_conversations(tmp_path)
