"""Held-out loss on each role's text (finteam/heldout.py, stats.loss_intervals): the texts are
new to every corpus, each document's loss is the model's own, and the intervals are those of a
case worked by hand."""
import dataclasses
import json
import math
import random

import pytest
import torch

from finteam import heldout, model as models, prose, report, stats
from finteam.config import ROLES, RecipeError, load_recipe
from finteam.data import load_corpus
from finteam.data import run as run_data
from finteam.synthetic import World


@pytest.fixture(scope="module")
def smoke_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("heldout")
    recipe = load_recipe("smoke", [f"out_dir={out}", "evaluate.heldout_docs=12"])
    run_data(recipe, out / "data")
    return recipe, out / "data"


def test_texts_are_fresh_documents_of_the_same_world(smoke_data):
    recipe, data_dir = smoke_data
    texts = heldout.texts(recipe, data_dir)
    assert set(texts) == set(ROLES)
    for role in ROLES:
        docs = texts[role]
        assert len(docs) == 12 and len(set(docs)) == 12
        trained = "\n".join(d for r in ROLES for d in load_corpus(data_dir, r))
        assert not any(d in trained for d in docs), role
    # The same world: every macro text names one of its central banks.
    names = [n for e in World(recipe.data.world, recipe.seed).economies for n in (e.name, e.adjective, e.bank)]
    assert all(any(n in d for n in names) for d in texts["macro"])
    assert heldout.texts(recipe, data_dir) == texts  # reproducible


def test_a_document_the_corpus_holds_is_never_held_out(smoke_data, monkeypatch):
    recipe, data_dir = smoke_data
    known = load_corpus(data_dir, "micro")[0]
    real = prose.role_document
    calls = iter(range(10**6))

    def sometimes_known(w, r, role):  # every other draw is a document the micro corpus holds
        return known if role == "micro" and next(calls) % 2 == 0 else real(w, r, role)

    monkeypatch.setattr(prose, "role_document", sometimes_known)
    assert known in "\n".join(load_corpus(data_dir, "micro"))
    assert known not in heldout.texts(recipe, data_dir)["micro"]


def test_no_texts_for_real_corpora_or_when_switched_off(smoke_data):
    recipe, data_dir = smoke_data
    off = load_recipe("smoke", ["evaluate.heldout_docs=0"])
    assert heldout.texts(off, data_dir) is None
    files = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, source="files"))
    assert heldout.texts(files, data_dir) is None


def test_doc_losses_are_the_models_own_loss_however_batched():
    config = models.llama_config("smoke", 64, 0, 1)
    model = models.build(config, 0).eval()

    class Tok:
        pad_token_id = 0

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [2 + ord(c) % 60 for c in text]}

    docs = ["a short one", "a somewhat longer document than the first", "xy", "the last document here is long " * 3]
    loss, tokens = heldout.doc_losses(model, Tok(), docs, max_len=40, batch_size=3)
    for d, l, n in zip(docs, loss, tokens):
        ids = torch.tensor([Tok()(d)["input_ids"][:40]])
        with torch.no_grad():
            mean = model(input_ids=ids, labels=ids).loss.item()  # transformers' own shifted mean
        assert n == ids.shape[1] - 1
        assert l == pytest.approx(mean * n, rel=1e-4)


def _losses(values):
    """per-seed {model: {corpus: {"loss", "tokens"}}} from {model: [S][corpus] -> [(nats, tokens)]}."""
    seeds = len(next(iter(values.values())))
    return [{m: {c: {"loss": [x for x, _ in docs], "tokens": [n for _, n in docs]} for c, docs in v[k].items()}
             for m, v in values.items()} for k in range(seeds)]


def test_loss_intervals_by_hand():
    # One seed, one corpus of n documents of 10 tokens each. Model b's loss per document is a's
    # plus d_i, so the paired difference a - b is -mean(d), with the normal-approximation interval
    # mean(d) +- 1.96 sd(d)/sqrt(n), and the point losses are token-weighted means.
    rng = random.Random(0)
    n = 2000
    a = [rng.uniform(5, 15) for _ in range(n)]
    d = [rng.gauss(1.0, 2.0) for _ in range(n)]
    per_seed = _losses({"a": [{"c": [(x, 10) for x in a]}], "b": [{"c": [(x + y, 10) for x, y in zip(a, d)]}]})
    out = stats.loss_intervals(per_seed, "a", reps=4000, seed=1)
    assert out["scores"]["a"]["c"]["value"] == pytest.approx(sum(a) / (10 * n))
    assert out["scores"]["a"]["mean"]["value"] == pytest.approx(sum(a) / (10 * n))
    dt = torch.tensor(d, dtype=torch.float64) / 10
    half = 1.96 * dt.std().item() / math.sqrt(n)
    cell = out["paired"]["b"]["c"]
    assert cell["value"] == pytest.approx(-dt.mean().item())
    assert cell["low"] == pytest.approx(-dt.mean().item() - half, abs=0.004)
    assert cell["high"] == pytest.approx(-dt.mean().item() + half, abs=0.004)


def test_loss_intervals_weigh_tokens_and_draw_seeds():
    # A corpus's loss weighs documents by their tokens: (1 + 30) / (1 + 10) nats, not the mean
    # of 1 and 3. Two seeds that disagree: the interval spans both seeds' values.
    per_seed = _losses({"m": [{"c": [(1.0, 1), (30.0, 10)], "e": [(2.0, 1)]}, {"c": [(1.0, 1), (30.0, 10)], "e": [(6.0, 1)]}]})
    out = stats.loss_intervals(per_seed, "m", reps=2000)
    assert out["scores"]["m"]["c"]["value"] == pytest.approx(31 / 11)
    assert out["scores"]["m"]["e"]["seeds"] == [2.0, 6.0]
    assert out["scores"]["m"]["e"]["low"] == 2.0 and out["scores"]["m"]["e"]["high"] == 6.0
    assert out["scores"]["m"]["mean"]["value"] == pytest.approx((31 / 11 + 4.0) / 2)
    assert out["paired"] == {}


def test_table_marks_the_lower_loss_as_the_teams_lead():
    per_seed = _losses({"team": [{"c": [(1.0, 1)] * 50}], "worse": [{"c": [(2.0, 1)] * 50}], "better": [{"c": [(0.5, 1)] * 50}]})
    table = report.heldout_table(stats.loss_intervals(per_seed, "team", reps=200))
    assert "| worse | -1.000 [-1.000, -1.000] ✓ |" in table
    assert "| better | 0.500 [0.500, 0.500] ✗ |" in table
    assert "| team | 1.000 [1.000, 1.000] | 1.000 [1.000, 1.000] |" in table


def test_heldout_files_are_read_without_what_the_corpora_hold(smoke_data, tmp_path):
    recipe, data_dir = smoke_data
    known = load_corpus(data_dir, "macro")[0]
    fresh = [f"A held-out note number {i} on rates." for i in range(20)]
    path = tmp_path / "macro.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in [known, *fresh]))
    files = load_recipe("smoke", [f"out_dir={tmp_path}", "evaluate.heldout_docs=12", f"evaluate.heldout_files.macro=[{path}]"])
    texts = heldout.texts(files, data_dir)
    assert texts == {"macro": fresh[:12]}  # the corpus's document dropped, capped at heldout_docs, other roles not scored
    real = dataclasses.replace(files, data=dataclasses.replace(files.data, source="files"))
    assert heldout.texts(real, data_dir) == texts  # real corpora are scored on the files too


def test_heldout_files_are_checked_with_the_recipe(tmp_path):
    with pytest.raises(RecipeError, match=r"evaluate.heldout_files takes the roles macro, micro, quant; got macor"):
        load_recipe("smoke", [f"evaluate.heldout_files.macor=[{tmp_path}]"])
    with pytest.raises(RecipeError, match=r"evaluate.heldout_files.quant names '.*nothing.jsonl', which does not exist"):
        load_recipe("smoke", [f"evaluate.heldout_files.quant=[{tmp_path / 'nothing.jsonl'}]"])


def test_heldout_settings_rerun_only_the_evaluation(tmp_path):
    from finteam.config import settings_of

    path = tmp_path / "macro.jsonl"
    path.write_text(json.dumps({"text": "a held-out note"}) + "\n")
    a = load_recipe("smoke")
    b = load_recipe("smoke", ["evaluate.heldout_docs=3", f"evaluate.heldout_files.macro=[{path}]"])
    for needs in (("seed", "data"), ("tokenizer",), ("model", "pretrain"), ("assemble",), ("mix",), ("instruct",)):
        assert settings_of(a, needs) == settings_of(b, needs), needs
    assert settings_of(a, ("evaluate",)) != settings_of(b, ("evaluate",))
