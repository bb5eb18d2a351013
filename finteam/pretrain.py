"""Stage `pretrain`: the shared base, one continued-pretrained expert per role, and the dense
baseline.

  base         a named size trained from scratch on the three corpora mixed (or a checkpoint
               path, used as it is)
  experts      each role's expert starts from the base and trains on its own corpus only
               (Branch-Train-MiX's "branch" and "train": the experts never talk to each other,
               so on a cluster they train in parallel); all weights, or the FFNs alone
               (`pretrain.expert_trains`)
  dense        the baseline: a Llama whose FFN is top_k times wider (the team's active size),
               from scratch on the mixed corpora for as many tokens as base + all experts saw
"""
from __future__ import annotations

import random
import shutil
from pathlib import Path

from . import model as models
from .batches import PackedTokens
from .checkpoint import load_model, save_model, stamp
from .config import ROLES, Recipe, TrainConfig
from .data import load_corpus
from .train import fit, full_weights, rank_and_size


def mixed_corpus(data_dir: Path, seed: int) -> list[str]:
    docs = [d for role in ROLES for d in load_corpus(data_dir, role)]
    random.Random(seed).shuffle(docs)
    return docs


def train_lm(recipe: Recipe, model, texts: list[str], tokenizer, cfg: TrainConfig, out: Path, label: str,
             seed: int, device) -> dict:
    """Train a causal LM on packed `texts` and save it as `out/model` (a HF checkpoint)."""
    batches = PackedTokens(texts, tokenizer, recipe.model.seq_len, seed)
    meta = stamp(recipe, label, seed=seed)
    model.to(device)
    trained = fit(model, batches, cfg, out, meta, label, device, recipe.precision,
                  recipe.model.gradient_checkpointing)
    weights = full_weights(model)
    if rank_and_size()[0] == 0:
        save_model(model, out / "model", {**meta, "steps": trained.steps, "tokens": trained.tokens}, tokenizer, weights)
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return {"steps": trained.steps, "tokens": trained.tokens, "seconds": round(trained.seconds, 1),
            "tokens_per_s": round(trained.tokens_per_s), "final_loss": round(trained.losses[-1][1], 4),
            "corpus_tokens": batches.tokens}


def base_model(recipe: Recipe, tokenizer, seed: int, intermediate: int | None = None):
    """A fresh Llama of the recipe's named size (FFN width overridable, for the dense baseline)."""
    override = {"intermediate_size": intermediate} if intermediate else {}
    config = models.llama_config(recipe.model.base, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id, **override)
    return models.build(config, seed)


def train_base(recipe: Recipe, data_dir: Path, tokenizer, out: Path, seed: int, device) -> dict:
    model = base_model(recipe, tokenizer, seed)
    return train_lm(recipe, model, mixed_corpus(data_dir, seed), tokenizer, recipe.pretrain.base, out, "pretrain base", seed, device)


def train_expert(recipe: Recipe, role: str, data_dir: Path, base: Path, tokenizer, out: Path, seed: int, device) -> dict:
    model = load_model(base)
    if recipe.pretrain.expert_trains == "ffn":
        for name, p in model.named_parameters():
            p.requires_grad_(".mlp." in name)
    return train_lm(recipe, model, load_corpus(data_dir, role), tokenizer, recipe.pretrain.expert, out,
                    f"pretrain {role}", seed, device)


def dense_steps(recipe: Recipe) -> TrainConfig:
    """The dense baseline's schedule: the base's and all experts' steps in one run."""
    from dataclasses import replace

    base, expert = recipe.pretrain.base, recipe.pretrain.expert
    own_base = base.steps if recipe.model.base in models.SIZES else 0
    return replace(base, steps=own_base + len(ROLES) * expert.steps)


def train_dense(recipe: Recipe, data_dir: Path, tokenizer, out: Path, seed: int, device) -> dict:
    if recipe.model.base not in models.SIZES:
        raise ValueError("the dense baseline needs a named model.base size (it is trained from scratch)")
    width = recipe.assemble.top_k * models.SIZES[recipe.model.base]["intermediate_size"]
    model = base_model(recipe, tokenizer, seed, intermediate=width)
    return train_lm(recipe, model, mixed_corpus(data_dir, seed), tokenizer, dense_steps(recipe), out, "pretrain dense", seed, device)
