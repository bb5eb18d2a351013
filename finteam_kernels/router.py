"""What a FinTeamMoE layer keeps of its router's work, and the capacity cap.

Shape legend: T tokens, E experts, K top-k.

- `RouterStats`: a layer's losses and loads of its last forward.
- `capacity_keep`: which assignments survive a capacity factor, in a documented order.

The model-level helpers that use these (`router_aux_loss`, `update_expert_bias`) are in
balancing.py, above the layer.
"""
import math
from typing import NamedTuple

import torch

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
