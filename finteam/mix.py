"""Stage `mix`: Branch-Train-MiX's last phase, and the compute each compared model has had.

Branch-Train-MiX (Sukhbaatar et al. 2024) does not go straight from the merged weights to the
tasks: after stacking the experts' FFNs and averaging everything else, it trains the MoE
further on the experts' corpora mixed (the "MiX" phase). The averaged attention and norms were
never trained together with any one expert's FFN, and the router has only its init; this phase
lets both learn from next-token loss before any task is seen.

  team    the assembled Mixtral on the three corpora mixed, next-token loss plus transformers'
          load-balancing loss (`assemble.router_aux_loss_coef`), all weights trained
  dense   the dense baseline continues on the same token stream (same blocks, same order)
  merge   the uniform merge continues on it too

so each model the team is compared with that had a pre-tuning phase gets as many extra tokens
as the team did. The role experts are the team's parts and get no extra tokens.

Compute: a training step costs about 6 x (active parameters) FLOPs per token (2 forward, 4
backward; Kaplan et al. 2020), attention's sequence-length term left out. `active_params`
counts a model's parameters from its config alone, a Mixtral's experts `top_k` times and the
tied head once, and `lineage` names the training stages behind each tuned model.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from . import model as models
from .batches import PackedTokens
from .checkpoint import load_model, save_model, stamp
from .config import ROLES, Recipe
from .instruct import is_moe
from .pretrain import mixed_corpus
from .progress import log
from .train import fit, full_weights, rank_and_size

MIXED = ("team", "dense", "merge")  # the models the mix stage trains


def run(recipe: Recipe, model_dir: Path, data_dir: Path, tokenizer, out: Path, seed: int, label: str, device) -> dict:
    """Train the model at `model_dir` on the mixed corpora for `mix.train.steps`; save `out/model`."""
    cfg = recipe.mix.train
    model = load_model(model_dir)
    if is_moe(model):
        models.use_experts(model, recipe.instruct.experts_implementation)
        model.config.output_router_logits = True  # adds router_aux_loss_coef x the load-balancing loss
    # The seed of the stream is the run's, not the model's: team, dense and merge read the same blocks.
    batches = PackedTokens(mixed_corpus(data_dir, seed), tokenizer, recipe.model.seq_len, seed)
    meta = stamp(recipe, label, seed=seed, source=str(model_dir))
    model.to(device)
    trained = fit(model, batches, cfg, out, meta, label, device, recipe.precision, recipe.model.gradient_checkpointing)
    weights = full_weights(model)
    if rank_and_size()[0] == 0:
        model.config.output_router_logits = False
        save_model(model, out / "model", {**meta, "steps": trained.steps, "tokens": trained.tokens}, tokenizer, weights)
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    active = active_params(model.config)
    log(f"{label}  {trained.tokens / 1e6:.2f}M tokens, {train_flops(trained.tokens, active):.3g} FLOPs")
    return {"steps": trained.steps, "tokens": trained.tokens, "seconds": round(trained.seconds, 1),
            "tokens_per_s": round(trained.tokens_per_s), "final_loss": round(trained.losses[-1][1], 4),
            "active_params": active, "flops": train_flops(trained.tokens, active)}


def active_params(config) -> int:
    """Parameters one token uses, from a Llama or Mixtral config: embeddings (once when tied
    to the head), attention, norms, and the FFN of `num_experts_per_tok` experts plus the router."""
    H, L, V = config.hidden_size, config.num_hidden_layers, config.vocab_size
    head_dim = getattr(config, "head_dim", None) or H // config.num_attention_heads
    attention = H * head_dim * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)
    ffn = 3 * H * config.intermediate_size
    experts = getattr(config, "num_local_experts", None)
    if experts:
        ffn = ffn * config.num_experts_per_tok + H * experts
    embeddings = V * H * (1 if config.tie_word_embeddings else 2)
    return embeddings + L * (attention + ffn + 2 * H) + H


def train_flops(tokens: int, active: int) -> float:
    return 6.0 * active * tokens


def lineage(name: str, recipe: Recipe) -> list[str]:
    """The training stages behind tuned model `name`, as (stage label) strings the pipeline
    maps to folders: `pretrain base`, `pretrain <role>`, `pretrain dense`, `mix <model>`,
    `instruct <model>`."""
    named = recipe.model.base in models.SIZES
    base = ["pretrain base"] * named
    mixed = [f"mix {name}"] * (recipe.mix.enabled and name in MIXED)
    if name == "dense":
        before = ["pretrain dense"]
    elif name in ROLES:
        before = base + [f"pretrain {name}"]
    else:
        before = base + [f"pretrain {r}" for r in ROLES]
    return before + mixed + [f"instruct {name}"]


def account(stages: dict[str, tuple[dict, object]]) -> dict:
    """{"tokens", "flops"} summed over `stages`: {label: (stage summary, config of the model it
    trained)}; a stage without a `tokens` summary (a checkpoint taken as it is) adds nothing."""
    tokens, flops = 0, 0.0
    for summary, config in stages.values():
        n = int(summary.get("tokens", 0))
        tokens += n
        flops += train_flops(n, active_params(config))
    return {"tokens": tokens, "flops": flops}
