"""The small results of the MoE ops, as NamedTuples so they pass through torch.compile.

Shape legend: T tokens, E experts, K top-k, N = T*K routed rows.

A DispatchPlan is public and can be built or edited by anyone, so the ops that read its indices
validate it, except a plan that `dispatch` made and that nobody has written to since
(`issued_plan` / `is_issued`): its indices are in range by construction, and checking them again
would cost a pass over them (and, on a GPU, extra launches) on every call.
"""
from typing import NamedTuple

import torch


class Routing(NamedTuple):
    """What top-k gating decided for each token."""

    weights_TK: torch.Tensor  # float32: the weight of each chosen expert in the token's output
    ids_TK: torch.Tensor  # int32: K distinct experts per token, in [0, E)
    tokens_per_expert_E: torch.Tensor  # int32: how many tokens chose each expert


class DispatchPlan(NamedTuple):
    """Where each routed row goes when tokens are grouped by expert.

    Slot `s = t*K + j` is token t's j-th choice; row r is a position in the expert-grouped
    order. Rows of one expert are contiguous, `expert_offsets_E1[e]:expert_offsets_E1[e+1]`, and
    inside an expert they keep token order, so every op built on a plan is deterministic.
    """

    expert_offsets_E1: torch.Tensor  # int64 [E+1]: starts at 0, ends at N
    tokens_per_expert_E: torch.Tensor  # int32 [E]
    row_to_slot_N: torch.Tensor  # int32 [N]: the slot that row r holds
    slot_to_row_N: torch.Tensor  # int32 [N]: the row that slot s went to (the inverse)


class RouterLosses(NamedTuple):
    """The router's regularisers, each a 0-d float32 tensor."""

    aux_loss: torch.Tensor  # load balancing: E * sum_e f_e * P_e
    z_loss: torch.Tensor  # mean over tokens of logsumexp(logits)^2


class _IssuedPlan(DispatchPlan):
    """A DispatchPlan as `dispatch` returned it. It remembers the version counters of its tensors,
    which every in-place write bumps; `_replace` and `_make` give a plain copy of this class
    without them, which counts as foreign."""


def issued_plan(*fields: torch.Tensor) -> DispatchPlan:
    """The plan `dispatch` returns: a DispatchPlan the ops trust while its tensors are unwritten
    (a plain one while torch.compile traces, or under torch.inference_mode: neither has
    version counters to read, so such a plan is validated wherever it is used)."""
    if torch.compiler.is_compiling() or any(t.is_inference() for t in fields):
        return DispatchPlan(*fields)
    plan = _IssuedPlan(*fields)
    plan._versions = tuple(t._version for t in fields)
    return plan


def is_issued(plan) -> bool:
    """True for a plan made by `dispatch` whose tensors nobody has written to since."""
    versions = getattr(plan, "_versions", None) if type(plan) is _IssuedPlan else None
    return versions is not None and versions == tuple(t._version for t in plan)
