"""Named MoE shapes from real models, the token counts they run at, and the routings they see.

Shape legend: T tokens, H hidden, I expert intermediate, E experts, K top-k, N = T*K routed rows.

Full shapes are the models' own (one MoE layer); `--quick` keeps each model's E, K and routing
options and scales H and I down so that a 2-core CPU runs the whole table in minutes and holds
it in memory. Mixtral's quick shape (H=1024, I=3584) is the one the compiled-CPU issue states
its targets at.

Routings (what the experts see; the gating op sees the logits that produce them):
  uniform  random logits: every expert equally likely, each token K distinct experts
  skewed   logits biased by -1.5*log(1+e): expert 0 popular, a long tail (Zipf-like)
  empty    only the first max(K, E/4) experts can win: the rest get no tokens, the case that
           breaks weight-gradient GEMMs elsewhere
"""
from __future__ import annotations

import dataclasses
import math

import torch

from finteam_kernels import reference


@dataclasses.dataclass(frozen=True)
class MoEShape:
    name: str
    num_experts: int  # E
    top_k: int  # K
    hidden: int  # H
    intermediate: int  # I, per expert
    score: str = "softmax"
    renormalize: bool = True  # weights of the K chosen experts divided by their sum
    expert_bias: bool = False  # aux-loss-free balancing bias on selection
    num_groups: int = 1  # group-limited routing (DeepSeek-V3)
    topk_groups: int = 1
    scaling: float = 1.0

    def gating_kwargs(self) -> dict:
        return {"score": self.score, "num_groups": self.num_groups, "topk_groups": self.topk_groups, "scaling": self.scaling}

    def expert_bytes(self, itemsize: int = 2) -> int:
        """One expert's weights: gate and up [2I, H] plus down [H, I]."""
        return 3 * self.hidden * self.intermediate * itemsize


SHAPES = {
    s.name: s
    for s in (
        MoEShape("mixtral-8x7b", 8, 2, 4096, 14336),
        # One tensor-parallel-2 shard of Mixtral's experts: the inference targets are set here.
        MoEShape("mixtral-8x7b-tp2", 8, 2, 4096, 7168),
        MoEShape("qwen3-30b-a3b", 128, 8, 2048, 768),
        MoEShape("olmoe-1b-7b", 64, 8, 2048, 1024, renormalize=False),
        MoEShape("deepseek-v3", 256, 8, 7168, 2048, score="sigmoid", expert_bias=True, num_groups=8, topk_groups=4, scaling=2.5),
        # The three-role team assembled from Llama-3-8B: three full-size MLPs as experts.
        MoEShape("team-llama3-8b", 3, 2, 4096, 14336),
    )
}

_QUICK_DIMS = {  # (H, I): weights of 50-400 MB, so that token counts still reach the GEMM-bound regime
    "mixtral-8x7b": (1024, 3584),
    "mixtral-8x7b-tp2": (1024, 1792),
    "qwen3-30b-a3b": (512, 192),
    "olmoe-1b-7b": (512, 256),
    "deepseek-v3": (1024, 256),
    "team-llama3-8b": (512, 1792),
}
QUICK_SHAPES = {
    name: dataclasses.replace(shape, hidden=_QUICK_DIMS[name][0], intermediate=_QUICK_DIMS[name][1])
    for name, shape in SHAPES.items()
}

ROUTINGS = ("uniform", "skewed", "empty")
MODES = ("forward", "backward", "forward+backward")

# Inference is forward only (1 token is decoding, 1k-1.5k a prefill chunk); training runs
# forward and backward over long batches.
INFERENCE_TOKENS = (1, 4, 16, 64, 256, 1024, 1536, 4096)
TRAINING_TOKENS = (4096, 8192, 16384, 32768)
QUICK_INFERENCE_TOKENS = (1, 16, 256, 1024)
QUICK_TRAINING_TOKENS = (256,)


def shapes(quick: bool) -> dict[str, MoEShape]:
    return QUICK_SHAPES if quick else SHAPES


def cases(mode: str, quick: bool, tokens: tuple[int, ...] | None = None) -> list[tuple[int, str]]:
    """(T, routing) pairs to run in `mode`: every token count with uniform routing, and the
    skewed and empty-expert routings at one count: the largest inference count, or the second
    training count, on full shapes; the second largest inference count on quick ones (and none
    in quick training modes), where the largest counts are the costliest cells of a CPU run."""
    if tokens is None:
        if mode == "forward":
            tokens = QUICK_INFERENCE_TOKENS if quick else INFERENCE_TOKENS
        else:
            tokens = QUICK_TRAINING_TOKENS if quick else TRAINING_TOKENS
    ordered = sorted(tokens)
    chosen = [(t, "uniform") for t in ordered]
    if not ordered or (quick and mode != "forward"):
        return chosen
    if mode == "forward":
        pivot = ordered[-2] if quick and len(ordered) > 1 else ordered[-1]
    else:
        pivot = ordered[min(1, len(ordered) - 1)]
    return chosen + [(pivot, "skewed"), (pivot, "empty")]


def routing_bias(routing: str, shape: MoEShape) -> torch.Tensor:
    """float32 [E], added to random logits to give the routing its shape."""
    E = shape.num_experts
    if routing == "uniform":
        return torch.zeros(E)
    if routing == "skewed":
        return -1.5 * torch.log1p(torch.arange(E, dtype=torch.float32))
    if routing == "empty":
        live = max(shape.top_k, math.ceil(E / 4))
        return torch.where(torch.arange(E) < live, 0.0, -1e4)
    raise ValueError(f"routing must be one of {', '.join(ROUTINGS)}; got {routing!r}")


def router_logits(shape: MoEShape, T: int, routing: str, *, seed: int = 0) -> torch.Tensor:
    """float32 [T, E] on the CPU: random router logits with the routing's bias."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(T, shape.num_experts, generator=gen) + routing_bias(routing, shape)


def selection_bias(shape: MoEShape, *, seed: int = 1) -> torch.Tensor | None:
    """float32 [E]: the expert-selection bias of aux-loss-free balancing, small and random."""
    if not shape.expert_bias:
        return None
    gen = torch.Generator().manual_seed(seed)
    return 0.01 * torch.randn(shape.num_experts, generator=gen)


def route(shape: MoEShape, logits_TE: torch.Tensor):
    """The reference gating of `shape` applied to `logits_TE`: what every other op is fed."""
    return reference.topk_gating(
        logits_TE, shape.top_k, renormalize=shape.renormalize, expert_bias=selection_bias(shape), **shape.gating_kwargs()
    )
