"""The real FiQA sentiment files (FinBen conversation form): the loaders read them, the splits
are deduplicated by post, and a short instruction tuning lowers the held-out answer loss.

The files are not part of the project: they are found through FINTEAM_FIQA_DIR or at
../shared/data/fiqasa next to the repository, and the tests are skipped, saying so, without them."""
import os
from pathlib import Path

import pytest
import torch

from finteam import data, evaluate, instruct, pipeline, pretrain
from finteam.batches import encode_example, pad_batch
from finteam.checkpoint import load_model, save_model
from finteam.config import load_recipe
from finteam.tokenizer import load as load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
FIQA = Path(os.environ.get("FINTEAM_FIQA_DIR", ROOT.parent / "shared" / "data" / "fiqasa"))
pytestmark = pytest.mark.skipif(not (FIQA / "test.jsonl").is_file(),
                                reason=f"FiQA files absent: set FINTEAM_FIQA_DIR or put them at {FIQA}")


def test_loaders_read_fiqa_and_split_by_post():
    splits = {s: data.read_conversations(FIQA / f"{s}.jsonl", "fiqasa") for s in ("train", "valid", "test")}
    assert {s: len(v) for s, v in splits.items()} == {"train": 7500, "valid": 1880, "test": 2350}
    posts = {s: {data.text_key(e.prompt) for e in v} for s, v in splits.items()}
    assert {s: len(v) for s, v in posts.items()} == {"train": 724, "valid": 186, "test": 233}
    assert {e.answer for e in splits["test"]} == {"Positive", "Negative", "Neutral"}
    rows = {s: [data.as_row(e) for e in v] for s, v in splits.items()}
    data.drop_overlap(rows, "fiqasa")
    kept = {s: {data.text_key(data.prompt_of(r)) for r in v} for s, v in rows.items()}
    assert not kept["train"] & kept["test"] and not kept["train"] & kept["valid"] and not kept["valid"] & kept["test"]
    assert len(kept["train"]) == 724 - 16 - 10 + len(posts["train"] & posts["valid"] & posts["test"])


def answer_loss(model, tokenizer, examples) -> float:
    batch = pad_batch([encode_example(tokenizer, e.prompt, e.answer, 160) for e in examples], tokenizer.pad_token_id)
    with torch.no_grad():
        return model(**batch).loss.item()


def test_short_instruction_tuning_and_evaluation_on_fiqa(tmp_path, capsys):
    task = {"name": "fiqasa", "metric": "classification", "role": "micro",
            "train": str(FIQA / "train.jsonl"), "valid": str(FIQA / "valid.jsonl"), "test": str(FIQA / "test.jsonl")}
    recipe = load_recipe("smoke", [f"out_dir={tmp_path}", f"data.instructions=[{task}]", "instruct.train.steps=20",
                                   "evaluate.max_examples=60"])
    paths = pipeline.Paths(recipe.run_dir)
    pipeline.run_data(recipe)
    assert "dropped" in capsys.readouterr().out  # the overlap with test was removed from train
    tok = load_tokenizer(paths.tokenizer)
    # A fresh smoke-size model: the test is about the real files flowing through tuning and
    # scoring, and pretraining it first would only add minutes.
    save_model(pretrain.base_model(recipe, tok, seed=0), paths.model(0, "base") / "model", {"stage": "test"}, tok)
    tests, meta = pipeline.test_sets(recipe, paths.data)
    assert list(meta) == ["fiqasa"] and meta["fiqasa"]["choices"] == ["Negative", "Neutral", "Positive"]
    held_out = tests["fiqasa"]
    before = answer_loss(load_model(paths.model(0, "base") / "model").eval(), tok, held_out)
    instruct.run(recipe, paths.model(0, "base") / "model", paths.data, tok, paths.tuned(0, "base"), 0, "instruct fiqa",
                 torch.device("cpu"))
    tuned = load_model(paths.tuned(0, "base") / "model").eval()
    after = answer_loss(tuned, tok, held_out)
    scores = evaluate.evaluate_model(tuned, tok, tests, meta, recipe.evaluate, recipe.instruct.max_len)["fiqasa"]
    print(f"FiQA test ({scores['n']} rows): answer loss {before:.3f} -> {after:.3f}, acc {scores['acc']:.3f}, "
          f"weighted F1 {scores['f1']:.3f}")
    assert after < before
    assert 0.0 <= scores["f1"] <= 1.0 and scores["n"] == 60
