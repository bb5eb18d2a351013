"""Held-out next-token loss on each role's text: does each expert know its corpus, and does the
team know all three?

Branch-Train-MiX reports this first (per-domain perplexity): an expert should be best on its
own domain and poor off it, and the mixed team should come close to each expert on that
expert's domain while the merge of the same experts falls between. The task scores cannot show
this when the tasks do not lean on what the corpora teach, so the evaluate stage measures it
directly, on every model before instruction tuning (after the MiX phase where there is one).

The texts are the recipe's `evaluate.heldout_files` where it names them (any role it leaves out is
not scored), else fresh documents of the synthetic world: the role corpora's generators run
again with another seed (the world's facts are the same; that is the point). Either way a
document that a training corpus holds is dropped, so every text is held out as text. Real
corpora without `evaluate.heldout_files` have no generator, so they get no held-out text.

Each document is scored alone, up to `model.seq_len` tokens: its summed loss and its number of
predicted tokens, so that a corpus's loss is a token-weighted mean and `stats.loss_intervals`
can resample documents.
"""
from __future__ import annotations

import random
from pathlib import Path

import torch

from . import prose
from .batches import pad_batch
from .config import ROLES, Recipe
from .data import load_corpus, read_texts
from .instruct import row_nll
from .synthetic import World

SEED = "heldout"  # the generators' seed for held-out text: no training corpus is drawn with it


def texts(recipe: Recipe, data_dir: Path) -> dict[str, list[str]] | None:
    """{role: up to `evaluate.heldout_docs` documents none of the training corpora holds}, or
    None when there is nothing to score (real corpora without `evaluate.heldout_files`, or 0 documents)."""
    n, files, cfg = recipe.evaluate.heldout_docs, recipe.evaluate.heldout_files, recipe.data
    if n == 0 or not files and cfg.source != "synthetic":
        return None
    if files:
        trained_docs = {d for role in ROLES for d in load_corpus(data_dir, role)}
        out = {}
        for role, specs in files.items():
            docs = [d for spec in specs for d in read_texts(spec, cfg.text_field) if d not in trained_docs]
            if not docs:
                raise ValueError(f"held-out text: evaluate.heldout_files.{role} holds no document that the training "
                                 "corpora do not")
            out[role] = docs[:n]
        return out
    world = World(cfg.world, recipe.seed)  # the data stage's world: the same facts
    trained = "\n".join(d for role in ROLES for d in load_corpus(data_dir, role))
    out = {}
    for role in ROLES:
        r, docs, seen = random.Random(f"{SEED}-{role}"), [], set()
        for _ in range(100 * n):  # each role has thousands of distinct documents; this never runs dry in practice
            doc = prose.role_document(world, r, role)
            if doc not in seen and doc not in trained:
                seen.add(doc)
                docs.append(doc)
                if len(docs) == n:
                    break
        if len(docs) < n:
            raise ValueError(f"held-out text: only {len(docs)} of {n} {role} documents are new to the corpora; "
                             "lower evaluate.heldout_docs")
        out[role] = docs
    return out


@torch.no_grad()
def doc_losses(model, tokenizer, docs: list[str], max_len: int, batch_size: int = 16) -> tuple[list[float], list[int]]:
    """(summed next-token loss, predicted tokens) of each document, its first `max_len` tokens."""
    model.eval()
    losses, counts = [], []
    for start in range(0, len(docs), batch_size):
        # Each document as the "answer" of an empty prompt: every token of it is scored.
        pairs = [([], tokenizer(d, add_special_tokens=False)["input_ids"][:max_len]) for d in docs[start : start + batch_size]]
        batch = {k: v.to(model.device) for k, v in pad_batch(pairs, tokenizer.pad_token_id).items()}
        loss_B, tokens_B = row_nll(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                   batch["labels"])
        losses += loss_B.tolist()
        counts += tokens_B.tolist()
    return losses, counts
