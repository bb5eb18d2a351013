"""The pipeline's data side: the synthetic world's rules, its corpora and tasks, the loaders
(FinBen conversation form, OpenAI messages form, text/JSONL/Parquet), recipes and metrics.
All in-process and fast: no model is trained here."""
import collections
import hashlib
import json
import re

import pytest

from finteam import data, metrics, prose
from finteam.cli import main
from finteam.config import RecipeError, WorldConfig, load_recipe
from finteam.synthetic import EARNINGS_DAY, World, policy_move

SMALL = WorldConfig(economies=3, companies=8, quarters=12, docs_per_role=200, examples_per_task=120)


@pytest.fixture(scope="module")
def world():
    return World(SMALL, seed=0)


def test_world_is_a_function_of_the_seed():
    a, b, c = World(SMALL, 0), World(SMALL, 0), World(SMALL, 1)
    assert prose.corpus(a, "macro", 0) == prose.corpus(b, "macro", 0)
    assert prose.tasks(a, 0) == prose.tasks(b, 0)
    assert [x.close for x in a.companies] != [x.close for x in c.companies]


def test_central_banks_follow_their_rule(world):
    for eco in world.economies:
        for q in range(SMALL.quarters):
            assert eco.move_bp[q] == policy_move(eco.inflation[q], eco.growth[q])
            previous = eco.rate[q - 1] if q else None
            if previous is not None:
                assert eco.rate[q] == pytest.approx(previous + eco.move_bp[q] / 100)
    moves = collections.Counter(m for eco in world.economies for m in eco.move_bp)
    assert len(moves) >= 3, f"the rule should produce hikes, holds and cuts, got {moves}"


def test_prices_react_to_earnings_and_carry_momentum(world):
    # Report day: beats must on average rise and misses fall (the micro rule in prices).
    by_outcome = collections.defaultdict(list)
    for c in world.companies:
        for q in range(SMALL.quarters):
            by_outcome[c.outcome(q)].append(c.returns[world.day(q, EARNINGS_DAY)])
    assert sum(by_outcome["beat"]) / len(by_outcome["beat"]) > 0.02
    assert sum(by_outcome["miss"]) / len(by_outcome["miss"]) < -0.02
    # Momentum: the next day follows the 5-day sign clearly more often than a coin.
    hits = [(world.momentum_sign(c, d) > 0) == (c.returns[d + 1] > 0) for c in world.companies for d in range(10, world.days - 1)]
    assert 0.7 < sum(hits) / len(hits) < 0.9


def test_tasks_follow_the_world_and_hold_out_test_prompts(world):
    splits = prose.tasks(world, 0)
    train_prompts = {r["conversations"][0]["value"] for r in splits["train"]}
    assert not train_prompts & {r["conversations"][0]["value"] for r in splits["test"]}
    by_task = collections.defaultdict(list)
    for row in splits["train"] + splits["test"]:
        by_task[row["task"]].append(row)
    assert set(by_task) == set(prose.TASKS)
    for name, (metric, role, choices) in prose.TASKS.items():
        labels = collections.Counter(r["label"] for r in by_task[name])
        if choices:
            assert set(labels) == set(choices), f"{name}: every label should occur, got {labels}"
            assert max(labels.values()) < 0.8 * sum(labels.values()), f"{name}: one label dominates: {labels}"
    # A headline's label is the macro rule applied to the numbers it quotes.
    row = by_task["headlines"][0]
    assert row["label"] in ("Yes", "No") and "raise" in row["conversations"][0]["value"]


def test_corpora_are_varied_prose(world):
    for role in ("macro", "micro", "quant"):
        docs = prose.corpus(world, role, 0)
        openings = collections.Counter(" ".join(d.split()[:2]) for d in docs)
        assert len(set(docs)) > 0.9 * len(docs), f"{role}: documents repeat"
        assert len(openings) > 20, f"{role}: too few distinct openings: {openings.most_common(5)}"


def test_copy_documents_name_a_place_twice_and_leave_the_default_corpora_as_they_were():
    small = dict(docs_per_role=60, economies=3, companies=6, quarters=8)
    digest = lambda w, role: hashlib.sha256("\n".join(prose.corpus(w, role, 3)).encode()).hexdigest()[:16]  # noqa: E731
    plain, copying = World(WorldConfig(**small), 3), World(WorldConfig(**small, copy_docs=0.3), 3)
    # the corpora written before the setting existed (the same world, seed and sizes)
    assert [digest(plain, r) for r in ("macro", "micro", "quant")] == ["43cc55aa42a9ed52", "1da13dd1ff399729",
                                                                         "e7daad90f10d3bcf"]
    assert digest(copying, "macro") == digest(plain, "macro") and digest(copying, "quant") == digest(plain, "quant")
    cities = {c for eco in copying.economies for c in eco.cities}
    visits = 0
    for doc in prose.corpus(copying, "micro", 3):
        first = re.match(r"(?:.*? visited (\w[\w ]*?) this week\.|.*? a new plant in (\w[\w ]*?)\.|In (\w[\w ]*?), )", doc)
        place = first and next(g for g in first.groups() if g)
        if place in cities and doc.count(place) >= 2:
            visits += 1
    assert 10 <= visits <= 30, f"{visits} of 60 micro entries open with a copy document (about 30% expected)"


FINBEN_ROWS = [
    {"id": "fx0", "conversations": [{"from": "human", "value": "What is the sentiment?\nText: Shares rose.\nAnswer:"},
                                    {"from": "agent", "value": "Positive"}], "text": "Shares rose.", "label": "Positive"},
    {"id": "fx1", "conversations": [{"from": "human", "value": "Classify the sentiment.\nText: Shares rose.\nAnswer:"},
                                    {"from": "agent", "value": "Positive"}]},
    {"id": "fx2", "conversations": [{"from": "human", "value": "What is the sentiment?\nText: Profit fell.\nAnswer:"},
                                    {"from": "agent", "value": "Negative"}]},
]
MESSAGES_ROWS = [
    {"id": "m0", "messages": [{"role": "system", "content": "You are an analyst."},
                              {"role": "user", "content": "What is the sentiment?\nText: Profit fell.\nAnswer:"},
                              {"role": "assistant", "content": "Negative"}]},
    {"id": "m1", "messages": [{"role": "user", "content": "Text: Guidance unchanged.\nAnswer:"},
                              {"role": "assistant", "content": " Neutral "}]},
]


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_reads_the_finben_conversation_form(tmp_path):
    examples = data.read_conversations(write_rows(tmp_path / "fx.jsonl", FINBEN_ROWS), task="fx")
    assert [(e.id, e.task, e.answer) for e in examples] == [("fx0", "fx", "Positive"), ("fx1", "fx", "Positive"), ("fx2", "fx", "Negative")]
    assert examples[0].prompt == FINBEN_ROWS[0]["conversations"][0]["value"]


def test_reads_the_messages_form_and_mixed_files(tmp_path):
    examples = data.read_conversations(write_rows(tmp_path / "m.jsonl", MESSAGES_ROWS + FINBEN_ROWS[:1]), task="m")
    assert examples[0].prompt == "You are an analyst.\nWhat is the sentiment?\nText: Profit fell.\nAnswer:"
    assert [e.answer for e in examples] == ["Negative", "Neutral", "Positive"]


@pytest.mark.parametrize("row, message", [
    ({"id": 1, "text": "no turns"}, "expected a 'conversations'"),  # neither form
    ({"messages": [{"role": "user", "content": "q"}]}, "last turn must be the answer"),  # no answer
    ({"conversations": [{"from": "robot", "value": "q"}, {"from": "agent", "value": "a"}]}, "known speaker"),
])
def test_bad_conversations_name_file_and_line(tmp_path, row, message):
    path = write_rows(tmp_path / "bad.jsonl", [FINBEN_ROWS[0], row])
    with pytest.raises(ValueError, match=rf"bad.jsonl:2: .*{message}"):
        data.read_conversations(path)


def test_overlap_between_splits_is_dropped_by_post_text():
    splits = {"train": [data.as_row(data.Example("a", "fx", p, "x"))
                        for p in ("Q1\nText: Shares rose.\nAnswer:", "Q2\nText: Profit fell.\nAnswer:", "Q3\nText: New post.\nAnswer:")],
              "valid": [], "test": [data.as_row(data.Example("t", "fx", "Other wording\nText: Shares rose.\nAnswer:", "x"))]}
    assert data.drop_overlap(splits, "fx") == 1
    assert [data.text_key(data.prompt_of(r)) for r in splits["train"]] == ["Profit fell.", "New post."]


def test_text_loaders_read_txt_jsonl_and_parquet(tmp_path):
    import datasets

    (tmp_path / "a.txt").write_text("First report.\n\nSecond report.\n")
    write_rows(tmp_path / "b.jsonl", [{"body": "Third report."}, {"body": ""}])
    datasets.Dataset.from_dict({"body": ["Fourth report."]}).to_parquet(str(tmp_path / "c.parquet"))
    assert data.read_texts(str(tmp_path / "a.txt")) == ["First report.", "Second report."]
    assert data.read_texts(str(tmp_path), text_field="body") == ["First report.", "Second report.", "Third report.", "Fourth report."]
    with pytest.raises(ValueError, match="no column 'text'"):
        data.read_texts(str(tmp_path / "b.jsonl"))


def test_recipes_load_and_bad_ones_fail_naming_the_field(tmp_path):
    tiny = load_recipe("tiny")
    assert tiny.name == "tiny" and tiny.assemble.top_k == 2 and tiny.instruct.experts_implementation == "finteam"
    assert load_recipe("smoke").model.base == "smoke"
    big = load_recipe("llama3-8b", check_inputs=False)
    assert big.tokenizer.kind == "base" and big.data.source == "files"
    with pytest.raises(RecipeError, match="unknown field 'pretrain.expert.stepz'"):
        load_recipe("tiny", ["pretrain.expert.stepz=3"])
    with pytest.raises(RecipeError, match="assemble.top_k must be int; got 'two'"):
        load_recipe("tiny", ["assemble.top_k=two"])
    with pytest.raises(RecipeError, match="assemble.router_init must be one of hidden, embed, random"):
        load_recipe("tiny", ["assemble.router_init=magic"])
    with pytest.raises(RecipeError, match=r"data.instructions\[0\].train names '.*nowhere.jsonl', which does not exist"):
        load_recipe("tiny", ["data.instructions=[{name: x, train: nowhere.jsonl, test: nowhere.jsonl}]"])
    with pytest.raises(RecipeError, match="unknown recipe 'tinyy'"):
        load_recipe("tinyy")


def test_cli_fails_before_any_work_on_a_bad_recipe(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--recipe", "smoke", "--set", f"out_dir={out}", "--set", "pretrain.base.steps=0"]) == 2
    assert "pretrain.base.steps must be >= 1" in capsys.readouterr().err
    assert not out.exists()


def test_metrics_match_hand_computed_values():
    gold = ["pos", "pos", "neg", "neu"]
    pred = ["pos", "neg", "neg", "pos"]
    # pos: P=1/2 R=1/2 F=.5 (w 2); neg: P=1/2 R=1 F=2/3 (w 1); neu: 0 (w 1) -> (1 + 2/3) / 4
    assert metrics.weighted_f1(pred, gold) == pytest.approx((1 + 2 / 3) / 4)
    assert metrics.accuracy(pred, gold) == 0.5
    assert metrics.mcc(["Rise", "Rise", "Fall", "Fall"], ["Rise", "Fall", "Fall", "Fall"], "Rise") == pytest.approx(1 / 3 ** 0.5)
    assert metrics.mcc(["Rise"] * 4, ["Rise", "Fall", "Fall", "Rise"], "Rise") == 0.0  # constant prediction
    assert metrics.entity_f1(["Acme Corp, ORG\nJane Doe, PER", "None"], ["Acme Corp, ORG\nHalden, LOC", "None"]) == pytest.approx(0.5)
    assert metrics.numeric_match(["The answer is 1,234.5", "-0.27", "n/a"], ["1234.50", "-0.28", "3"], 0.01) == pytest.approx(1 / 3)
    assert metrics.numeric_match(["12.1"], ["12.0"], 0.01) == 1.0  # within 1%
