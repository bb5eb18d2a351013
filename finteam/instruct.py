"""Stage `instruct`: instruction-tune a model (the team, or a baseline) on the task mixture.

Loss on answers only (see batches.py), averaged per example by default (`instruct.loss`,
`example_loss`). The team routes `instruct.top_k` experts per token (0: as assembled), adds
transformers' load-balancing loss weighted by `instruct.router_aux_loss_coef`, and runs its
experts through `instruct.experts_implementation` ("finteam": our kernels), at the peak rate
`instruct.team_lr` when it is set (else `instruct.train.lr`, as every model), its experts' weights
at `instruct.expert_lr_scale` times that. With
`distributed.expert_parallel` > 1 under torchrun, the team's experts are split over the ranks
instead (parallel.py), with the same loss. `instruct.trainable` picks what learns in the team:
all weights, the routers only, or routers plus attention (the cheap BTX variants), or all
but the routers (the routing of the MiX phase kept); dense
baselines have no router and always train all weights.
"""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F

from . import model as models
from .batches import IGNORE, Instructions
from .checkpoint import load_model, save_model, stamp
from .config import Recipe
from .data import load_tasks
from .progress import log
from .expert_parallel import ExpertParallel, RouterLoss, is_expert
from .train import DataParallel, fit, model_loss, rank_and_size

ROUTER = ".mlp.gate."
TRAINABLE = {  # which of the team's parameters learn, by name
    "router": lambda name: ROUTER in name,
    "router+attention": lambda name: ROUTER in name or ".self_attn." in name,
    "all-but-router": lambda name: ROUTER not in name,  # the routing the MiX phase learned, kept
}


def is_moe(model) -> bool:
    return hasattr(model.config, "num_local_experts")


def select_trainable(model, trainable: str) -> int:
    """Freeze what `trainable` leaves out; returns the number of trainable parameters."""
    if trainable != "all" and is_moe(model):
        for name, p in model.named_parameters():
            p.requires_grad_(TRAINABLE[trainable](name))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def row_nll(logits_BLV: torch.Tensor, labels_BL: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed next-token loss [B], scored tokens [B]) of each row: position t predicts
    labels[t + 1], and labels of IGNORE are not scored."""
    target_BL = labels_BL[:, 1:]
    scored_BL = target_BL != IGNORE
    # Only the scored positions' logits are widened: a few answer tokens of each example, not
    # the whole padded batch times the vocabulary.
    per_token_A = F.cross_entropy(logits_BLV[:, :-1][scored_BL].float(), target_BL[scored_BL], reduction="none")
    row_A = scored_BL.nonzero()[:, 0]
    return per_token_A.new_zeros(len(labels_BL)).index_add(0, row_A, per_token_A), scored_BL.sum(1)


def example_loss(model, batch: dict) -> torch.Tensor:
    """Answer-token cross-entropy averaged within each example, then over the examples that
    have an answer token, plus the team's load-balancing loss where the model returns one (as
    transformers adds it to its own loss). A token mean would let the long answers (entity
    lists, numbers) outweigh the one-word labels of the classification tasks several times."""
    out = model(**{k: v for k, v in batch.items() if k != "labels"})
    per_example_B, answered_B = row_nll(out.logits, batch["labels"])
    loss = (per_example_B / answered_B.clamp_min(1)).sum() / (answered_B > 0).sum().clamp_min(1)
    aux = getattr(out, "aux_loss", None)
    if aux is not None:
        loss = loss + model.config.router_aux_loss_coef * aux.to(loss.device)
    return loss


def run(recipe: Recipe, model_dir: Path, data_dir: Path, tokenizer, out: Path, seed: int, label: str, device) -> dict:
    cfg = recipe.instruct
    model = load_model(model_dir)
    if is_moe(model):
        models.set_team_routing(model, cfg.top_k, cfg.router_aux_loss_coef)
    n_train = select_trainable(model, cfg.trainable)
    log(f"{label}  {n_train / 1e6:.2f}M of {models.num_params(model) / 1e6:.2f}M parameters train")
    parallel, loss_of = None, example_loss if cfg.loss == "example" else model_loss
    if is_moe(model) and recipe.distributed.expert_parallel > 1:
        parallel = ExpertParallel(recipe.distributed.expert_parallel, device)
        parallel.convert(model, str(model_dir))  # keeps each parameter's requires_grad
        loss_of = RouterLoss(model, loss_of)
    elif is_moe(model):
        models.use_experts(model, cfg.experts_implementation)
        model.config.output_router_logits = cfg.router_aux_loss_coef > 0  # the routers' logits feed that loss only
    batches = Instructions(load_tasks(data_dir, "train"), tokenizer, cfg.max_len, seed)
    meta = stamp(recipe, label, seed=seed, source=str(model_dir))
    model.to(device)
    train = dataclasses.replace(cfg.train, lr=cfg.team_lr) if is_moe(model) and cfg.team_lr > 0 else cfg.train
    scale = cfg.expert_lr_scale
    lr_scale = (lambda name: scale if is_expert(name) else 1.0) if is_moe(model) and scale != 1.0 else None
    trained = fit(model, batches, train, out, meta, label, device, recipe.precision,
                  recipe.model.gradient_checkpointing, parallel, loss_of, lr_scale)
    weights = (parallel or DataParallel()).weights(model)
    if rank_and_size()[0] == 0:
        model.config.output_router_logits = False
        save_model(model, out / "model", {**meta, "steps": trained.steps, "losses": trained.losses}, tokenizer, weights)
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return {"steps": trained.steps, "tokens": trained.tokens, "seconds": round(trained.seconds, 1),
            "tokens_per_s": round(trained.tokens_per_s), "final_loss": round(trained.losses[-1][1], 4)}
