"""What a trainer does with the routers of its FinTeamMoE layers: add their losses, balance their
load, and (optionally) cap each expert's load.

Shape legend: T tokens, E experts, K top-k.

- `router_aux_loss(model)`: the weighted load-balancing loss (Switch/Mixtral's E * sum f_e P_e)
  plus z-loss (ST-MoE) of every FinTeamMoE of the last forward, to add to the training loss.
- `update_expert_bias(model)`: aux-loss-free balancing (DeepSeek-V3): after the optimizer step,
  each layer moves its `expert_bias` by `bias_update_rate * sign(mean load - load_e)`, from the
  token counts of every forward since the last update, summed over the data-parallel group. The
  bias steers which experts are chosen, never their weights.
- `capacity_keep`: which assignments survive a capacity factor, in a documented order.
"""
import math
from typing import NamedTuple

import torch
import torch.distributed as dist

from .ops.dispatch import dispatch


class RouterStats(NamedTuple):
    """What one FinTeamMoE layer's router did in its last forward (no host sync to read it)."""

    aux_loss: torch.Tensor  # 0-d float32, differentiable: E * sum_e f_e * P_e (K when balanced)
    z_loss: torch.Tensor  # 0-d float32, differentiable: mean logsumexp(logits)^2
    tokens_per_expert_E: torch.Tensor  # int32: assignments each expert was chosen for, before drops
    dropped: torch.Tensor  # 0-d int64: assignments dropped by the capacity factor (0 when dropless)


def capacity_keep(ids_TK: torch.Tensor, num_experts: int, capacity_factor: float, backend: str | None = None):
    """(keep_TK bool, dropped 0-d int64): which of the T*K assignments fit in their expert.

    Each expert takes at most C = ceil(capacity_factor * T * K / E) assignments. Drop order
    (GShard's): every token's first choice is served before any second choice, and so on; among
    equal choice ranks, earlier tokens first. So a token loses its lower-ranked experts first, and
    late tokens lose out to early ones. Computed with a stable dispatch of the ids in that order:
    an assignment's row inside its expert is its place in the queue. No host sync.

    The layer zeroes a dropped assignment's weight (no renormalisation of the others): it adds
    nothing to the output and gets no gradient. moe_experts still computes its row, as the ops
    take a dense [T, K] routing: capacity shapes what the model learns, not the compute. Under
    expert parallelism T is the rank's own tokens.
    """
    T, K = ids_TK.shape
    capacity = math.ceil(capacity_factor * T * K / num_experts)
    ids_N1 = ids_TK.t().reshape(-1, 1)  # choice-rank major: all first choices, then all second...
    plan = dispatch(ids_N1, num_experts, backend=backend)
    place_N = plan.slot_to_row_N.long() - plan.expert_offsets_E1[ids_N1.reshape(-1).long()]
    keep_TK = (place_N < capacity).view(K, T).t()
    return keep_TK, (~keep_TK).sum()


def _layers(model: torch.nn.Module):
    from .layers import FinTeamMoE

    return [m for m in model.modules() if isinstance(m, FinTeamMoE)]


def router_aux_loss(model: torch.nn.Module) -> torch.Tensor:
    """sum over the FinTeamMoE layers of `model` of aux_loss_coef * aux_loss + z_loss_coef *
    z_loss, from each layer's last forward (0-d float32; 0 when no layer has run)."""
    total = None
    for layer in _layers(model):
        stats = layer.router_stats
        if stats is None:
            continue
        loss = layer.aux_loss_coef * stats.aux_loss + layer.z_loss_coef * stats.z_loss
        total = loss if total is None else total + loss
    return total if total is not None else torch.zeros((), dtype=torch.float32)


@torch.no_grad()
def update_expert_bias(model: torch.nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """Move every balancing layer's `expert_bias` towards equal load; call after optimizer.step().

    Counts are those of every training forward since the last call, summed over `group` (default:
    the whole default process group, when torch.distributed is initialised, so every rank gets the
    same bias; one all-reduce for all layers together). Layers with bias_update_rate == 0 are left
    alone.
    """
    layers = [layer for layer in _layers(model) if layer.bias_update_rate > 0]
    if not layers:
        return
    load = torch.cat([layer.expert_load_E for layer in layers])  # layers may differ in E
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(load, group=group)
    for layer, load_E in zip(layers, load.split([layer.num_experts for layer in layers])):
        error_E = load_E.double().mean() - load_E  # > 0: under-loaded, so raise its bias
        layer.expert_bias.add_(layer.bias_update_rate * torch.sign(error_E).to(layer.expert_bias.dtype))
        layer.expert_load_E.zero_()
