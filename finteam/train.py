"""The training loop shared by every stage that trains (pretrain, instruct, the baselines).

AdamW, linear warm-up then cosine decay to `lr * min_lr_ratio`, gradient accumulation, global
grad-norm clipping, bf16 autocast on CUDA (on CPU fp32 measured faster: see docs/pipeline.md).

Data order is a pure function of (seed, sample index): micro-batch m of step s on rank r reads
samples [((s*A + m)*W + r)*B, ... + B) of an endless stream that reshuffles every epoch. So the
data position is the step number, a resumed run reads exactly what the killed run would have,
and W ranks with A micro-batches see the same samples as one process with W*A micro-batches.

Under torchrun (WORLD_SIZE > 1) the model is sharded with FSDP2 (`fully_shard` on each decoder
layer, then the root): parameters, gradients and optimizer state split across ranks, gradients
averaged by reduce-scatter. Checkpoints gather full state dicts on rank 0. How a model is split
is a `DataParallel` object (this plain FSDP2 by default; parallel.py's `ExpertParallel` for the
team with `distributed.expert_parallel` > 1).

Resume: `<out>/checkpoints/latest` (see checkpoint.py) holds weights, optimizer, scheduler,
RNG and step. Ctrl-C finishes the current step, saves, and exits (a second Ctrl-C aborts).

Divergence: a non-finite loss or gradient norm (on any rank) stops training before the
optimizer step, so the weights, the optimizer and the last checkpoint stay as they were; the
weights are also checked before each save. `Diverged` names the stage and the step, and the
stage is never marked finished.
"""
from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from .checkpoint import load_train_state, save_train_state
from .config import TrainConfig
from .progress import Progress, log


class Interrupted(SystemExit):
    """Raised after Ctrl-C once the checkpoint is safe; exits with 130 like any interrupted tool."""

    def __init__(self, message: str):
        super().__init__(130)
        self.message = message


class Diverged(RuntimeError):
    """Training met a non-finite loss, gradient or weight; nothing non-finite was saved."""


@dataclass
class Trained:
    steps: int
    tokens: int
    seconds: float
    losses: list[tuple[int, float]] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


def rank_and_size() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class DataParallel:
    """FSDP2 over all ranks: one unit per decoder layer, then the root. Full state dicts (weights
    and optimizer, in the model's own parameter names) are gathered on rank 0 to save, and
    broadcast from it to resume."""

    def shard(self, model) -> None:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)

    def clip(self, model, max_norm: float) -> torch.Tensor:
        """Scale the gradients to a global norm of at most `max_norm`; returns the norm before."""
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)

    def state(self, model, opt) -> tuple[dict, dict]:
        """(weights, optimizer state), full, on rank 0 (other ranks' may be empty)."""
        return _state(model, opt, full=True)

    def restore(self, model, opt, weights: dict, opt_state: dict) -> None:
        """Load full `weights` and `opt_state` (on rank 0; empty elsewhere)."""
        if rank_and_size()[1] > 1:
            box = [opt_state]
            dist.broadcast_object_list(box, src=0)
            opt_state = box[0]
        _restore(model, opt, weights, opt_state, rank_and_size()[1] > 1)

    def weights(self, model) -> dict | None:
        """The full state dict on rank 0, None on the other ranks."""
        return full_weights(model)


def cosine(cfg: TrainConfig):
    def factor(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def optimizer(model, cfg: TrainConfig, lr_scale=None) -> torch.optim.Optimizer:
    """AdamW, with weight decay on matrices only. `lr_scale(name)` multiplies a parameter's peak
    rate (the schedule scales every group alike); None or 1 keeps the two groups of old."""
    scaled = [(p, lr_scale(name) if lr_scale else 1.0) for name, p in model.named_parameters() if p.requires_grad]
    groups = []
    for scale in sorted({s for _, s in scaled}):
        params = [p for p, s in scaled if s == scale]
        extra = {} if scale == 1.0 else {"lr": cfg.lr * scale}
        pair = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay, **extra},
                {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, **extra}]
        groups += [g for g in pair if g["params"] or not extra]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


def autocast(device: torch.device, precision: str):
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def _state(model, opt, full: bool):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=full, cpu_offload=full)
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, opt, options=options)


def _restore(model, opt, weights, opt_state, distributed: bool) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=distributed, strict=False)
    missing, unexpected = set_model_state_dict(model, weights, options=options)
    tied = {"lm_head.weight"}
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"resume: checkpoint does not match the model (missing {missing}, unexpected {unexpected})")
    set_optimizer_state_dict(model, opt, opt_state, options=options)


def model_loss(model, batch: dict) -> torch.Tensor:
    return model(**batch).loss


def fit(model, batches, cfg: TrainConfig, out: Path, meta: dict, label: str, device: torch.device,
        precision: str = "auto", checkpointing: bool = False, parallel: DataParallel | None = None,
        loss_of=model_loss, lr_scale=None) -> Trained:
    """Train `model` on `batches` for `cfg.steps` optimizer steps, resuming from `out/checkpoints`
    (`checkpointing`: recompute activations in the backward, for models whose activations
    would not fit; `parallel`: how ranks split the model, plain FSDP2 by default; `loss_of(model,
    batch)`: the training loss of a micro-batch; `lr_scale`: see `optimizer`)."""
    rank, size = rank_and_size()
    parallel = parallel or DataParallel()
    if checkpointing:
        model.gradient_checkpointing_enable()
    if size > 1:
        parallel.shard(model)
    opt = optimizer(model, cfg, lr_scale)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine(cfg))
    ckpt_dir = out / "checkpoints"
    trained = Trained(0, 0, 0.0)
    saved = load_train_state(ckpt_dir) if rank == 0 else None
    if size > 1:
        box = [saved is not None]
        dist.broadcast_object_list(box, src=0)
        resuming = box[0]
    else:
        resuming = saved is not None
    if resuming:
        weights, trainer = saved if saved is not None else ({}, {})
        opt_state = trainer.pop("optimizer", {})  # as large as two models: `parallel` moves it
        box = [trainer]
        if size > 1:
            dist.broadcast_object_list(box, src=0)
        trainer = box[0]
        parallel.restore(model, opt, weights, opt_state)
        sched.load_state_dict(trainer["scheduler"])
        torch.set_rng_state(trainer["rng"])
        trained = Trained(trainer["step"], trainer["tokens"], trainer["seconds"], [tuple(x) for x in trainer["losses"]])
        log(f"{label}  resuming at step {trained.steps}/{cfg.steps}")

    def save(step: int) -> None:
        if not _finite_on_all_ranks([p for p in model.parameters()], device):
            raise Diverged(f"{label}: the weights are not finite after step {step}/{cfg.steps}; not saved. "
                           + _kept(ckpt_dir, cfg))
        weights, opt_state = parallel.state(model, opt)
        trainer = {"step": step, "optimizer": opt_state, "scheduler": sched.state_dict(), "rng": torch.get_rng_state(),
                   "tokens": trained.tokens, "seconds": trained.seconds, "losses": [list(x) for x in trained.losses]}
        if rank == 0:
            save_train_state(ckpt_dir, step, weights, trainer, {**meta, "step": step})
        if size > 1:
            dist.barrier()

    stop = {"asked": False}

    def on_sigint(signum, frame):
        if stop["asked"]:
            raise KeyboardInterrupt
        stop["asked"] = True
        log(f"{label}  Ctrl-C: finishing step, saving a checkpoint (press again to abort)")

    previous = signal.signal(signal.SIGINT, on_sigint) if _main_thread() else None
    bar = Progress(label, cfg.steps, start=trained.steps, every=cfg.log_every)
    model.train()
    try:
        for step in range(trained.steps + 1, cfg.steps + 1):
            t0 = time.perf_counter()
            total, tokens = 0.0, 0
            for micro in range(cfg.grad_accum):
                first = (((step - 1) * cfg.grad_accum + micro) * size + rank) * cfg.batch_size
                batch = {k: v.to(device) for k, v in batches.get(first, cfg.batch_size).items()}
                with autocast(device, precision):
                    loss = loss_of(model, batch) / cfg.grad_accum
                loss.backward()
                total += loss.item()
                tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
            # With clipping off, a limit of inf still gives the norm (and scales by exactly 1).
            norm = parallel.clip(model, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
            if not _finite_on_all_ranks([total, norm], device):
                raise Diverged(f"{label}: non-finite loss or gradient at step {step}/{cfg.steps} (here: loss {total:.4g}, "
                               f"gradient norm {float(_local(norm)):.4g}); stopped before the optimizer step. "
                               + _kept(ckpt_dir, cfg))
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            seconds = time.perf_counter() - t0
            trained.steps, trained.tokens, trained.seconds = step, trained.tokens + tokens * size, trained.seconds + seconds
            trained.losses.append((step, total))
            bar.update(step, tokens * size / seconds, loss=total, lr=sched.get_last_lr()[0])
            if stop["asked"]:
                save(step)
                raise Interrupted(f"{label}: interrupted at step {step}/{cfg.steps}; checkpoint saved in {ckpt_dir}. "
                                  "Run the same command again to resume.")
            if step % cfg.save_every == 0 and step < cfg.steps:
                save(step)
        if not _finite_on_all_ranks([p for p in model.parameters()], device):
            raise Diverged(f"{label}: the weights are not finite after the last step {cfg.steps}; not saved. "
                           + _kept(ckpt_dir, cfg))
    finally:
        bar.close()
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    return trained


def _local(t):
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _finite_on_all_ranks(values: list, device: torch.device) -> bool:
    """Whether every float and tensor in `values` is finite on every rank (one small
    all-reduce under torchrun, so that all ranks stop together)."""
    finite = torch.ones((), dtype=torch.bool, device=device)
    for v in values:
        if isinstance(v, torch.Tensor):
            finite &= torch.isfinite(_local(v).detach()).all().to(device)
        elif not math.isfinite(v):
            finite = torch.zeros_like(finite)
    if rank_and_size()[1] > 1:
        flag = finite.to(torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        finite = flag.bool()
    return bool(finite)


def _kept(ckpt_dir: Path, cfg: TrainConfig) -> str:
    """Where the stage stands after a divergence: not finished, the last checkpoint untouched."""
    latest = ckpt_dir / "latest"
    kept = (f"The last good checkpoint, {latest.resolve().name}, is kept in {ckpt_dir}" if latest.exists()
            else f"No checkpoint was saved yet (one every {cfg.save_every} steps)")
    return (f"{kept}; the stage is not marked finished. Lower the learning rate or raise the warm-up "
            "for this stage, then rerun (changed settings start the stage over).")


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def full_weights(model) -> dict | None:
    """The full state dict (gathered under FSDP) on rank 0, None on the other ranks."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    rank, size = rank_and_size()
    if size == 1:
        return model.state_dict()
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return weights if rank == 0 else None
