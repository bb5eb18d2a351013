"""Stage `instruct`: instruction-tune a model (the team, or a baseline) on the task mixture.

Loss on answers only (see batches.py). For the team, transformers' load-balancing loss is added
(`output_router_logits=True`, weighted by the config's `router_aux_loss_coef`) and its experts
run through `instruct.experts_implementation` ("finteam": our kernels). With
`distributed.expert_parallel` > 1 under torchrun, the team's experts are split over the ranks
instead (parallel.py), with the same loss. `instruct.trainable`
picks what learns in the team: all weights, the routers only, or routers plus attention (the
cheap BTX variants); dense baselines have no router and always train all weights.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from . import model as models
from .batches import Instructions
from .checkpoint import load_model, save_model, stamp
from .config import Recipe
from .data import load_tasks
from .progress import log
from .expert_parallel import ExpertParallel, RouterLoss
from .train import DataParallel, fit, model_loss, rank_and_size

TRAINABLE = {"router": (".mlp.gate.",), "router+attention": (".mlp.gate.", ".self_attn.")}


def is_moe(model) -> bool:
    return hasattr(model.config, "num_local_experts")


def select_trainable(model, trainable: str) -> int:
    """Freeze what `trainable` leaves out; returns the number of trainable parameters."""
    if trainable != "all" and is_moe(model):
        for name, p in model.named_parameters():
            p.requires_grad_(any(part in name for part in TRAINABLE[trainable]))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def run(recipe: Recipe, model_dir: Path, data_dir: Path, tokenizer, out: Path, seed: int, label: str, device) -> dict:
    cfg = recipe.instruct
    model = load_model(model_dir)
    n_train = select_trainable(model, cfg.trainable)
    log(f"{label}  {n_train / 1e6:.2f}M of {models.num_params(model) / 1e6:.2f}M parameters train")
    parallel, loss_of = None, model_loss
    if is_moe(model) and recipe.distributed.expert_parallel > 1:
        parallel = ExpertParallel(recipe.distributed.expert_parallel, device)
        parallel.convert(model, str(model_dir))  # keeps each parameter's requires_grad
        loss_of = RouterLoss(model)
    elif is_moe(model):
        models.use_experts(model, cfg.experts_implementation)
        model.config.output_router_logits = True
    batches = Instructions(load_tasks(data_dir, "train"), tokenizer, cfg.max_len, seed)
    meta = stamp(recipe, label, seed=seed, source=str(model_dir))
    model.to(device)
    trained = fit(model, batches, cfg.train, out, meta, label, device, recipe.precision,
                  recipe.model.gradient_checkpointing, parallel, loss_of)
    weights = (parallel or DataParallel()).weights(model)
    if rank_and_size()[0] == 0:
        model.config.output_router_logits = False
        save_model(model, out / "model", {**meta, "steps": trained.steps, "losses": trained.losses}, tokenizer, weights)
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return {"steps": trained.steps, "tokens": trained.tokens, "seconds": round(trained.seconds, 1),
            "tokens_per_s": round(trained.tokens_per_s), "final_loss": round(trained.losses[-1][1], 4)}
