"""dispatch: group the T*K routed slots by expert, stably, without synchronising with the host.

Shape legend: T tokens, E experts, K top-k, N = T*K routed slots and rows.
  slot s = t*K + j is token t's j-th choice; row r is its place in the expert-grouped order.
  expert_offsets_E1 (int64, [E+1], from 0 to N), tokens_per_expert_E (int32),
  row_to_slot_N and slot_to_row_N (int32, inverse permutations of [0, N)).
Inside an expert rows follow slot order, so every op built on a plan is deterministic.
A token may name the same expert twice (K > E is allowed here): dispatch only groups slots;
distinct experts per token are topk_gating's promise, not a requirement of the grouping.
"""
import torch

from .. import _checks, reference
from .._backend import direct_call, kernel, pick_backend
from .._types import DispatchPlan
from ._triton import cdiv, device_guard, interpreting

MAX_ROWS = 2**31 - 1  # rows and slots are stored as int32


def dispatch_fwd(topk_ids_TK: torch.Tensor, num_experts: int):
    """Triton launcher: (expert_offsets_E1 int64, tokens_per_expert_E int32, row_to_slot_N int32,
    slot_to_row_N int32). Three launches, no host synchronisation."""
    from . import dispatch_kernels as dk

    _checks.check_int("dispatch", "num_experts", num_experts, 1, dk.MAX_EXPERTS, " for the triton backend")
    device = topk_ids_TK.device
    ids_N = topk_ids_TK.contiguous().view(-1)  # small: a copy only for strided ids
    N, E = ids_N.shape[0], num_experts
    offsets_E1 = torch.zeros(E + 1, dtype=torch.int64, device=device)
    counts_E = torch.zeros(E, dtype=torch.int32, device=device)
    row_to_slot_N = torch.empty(N, dtype=torch.int32, device=device)
    slot_to_row_N = torch.empty(N, dtype=torch.int32, device=device)
    if N == 0:
        return offsets_E1, counts_E, row_to_slot_N, slot_to_row_N
    block_n, rank_chunk, num_warps = dk.INTERPRETER_BLOCKING if interpreting() else dk.GPU_BLOCKING
    blocks, lanes = cdiv(N, block_n), dk.expert_lanes(E)
    hist_BE = torch.empty((blocks, E), dtype=torch.int32, device=device)
    with device_guard(topk_ids_TK):
        dk._count_kernel[(blocks,)](ids_N, hist_BE, N, E, BLOCK_N=block_n, E_PAD=lanes, num_warps=num_warps)
        dk._scan_kernel[(cdiv(E, dk.SCAN_BLOCK_E),)](
            hist_BE, counts_E, blocks, E, BLOCK_B=dk.SCAN_BLOCK_B, BLOCK_E=dk.SCAN_BLOCK_E)
        dk._place_kernel[(blocks,)](
            ids_N, hist_BE, counts_E, offsets_E1, row_to_slot_N, slot_to_row_N, N, E,
            BLOCK_N=block_n, E_PAD=lanes, RANK_CHUNK=rank_chunk, num_warps=num_warps)
    return offsets_E1, counts_E, row_to_slot_N, slot_to_row_N


@torch.library.custom_op("finteam::dispatch", mutates_args=())
def _dispatch(
    topk_ids_TK: torch.Tensor, num_experts: int, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(kernel("dispatch_fwd", backend, dispatch_fwd)(topk_ids_TK, num_experts))


@_dispatch.register_fake
def _(topk_ids_TK, num_experts, backend):
    N = topk_ids_TK.shape[0] * topk_ids_TK.shape[1]
    new = topk_ids_TK.new_empty
    return (new(num_experts + 1, dtype=torch.int64), new(num_experts, dtype=torch.int32),
            new(N, dtype=torch.int32), new(N, dtype=torch.int32))


def dispatch(topk_ids_TK: torch.Tensor, num_experts: int, *, backend: str | None = None) -> DispatchPlan:
    """DispatchPlan grouping the T*K slots of `topk_ids_TK` ([T, K], int32/int64 in [0, E)) by
    expert."""
    _checks.check_tensor("dispatch", "topk_ids_TK", topk_ids_TK, "T, K", dtypes=_checks.ID_DTYPES)
    _checks.check_int("dispatch", "num_experts", num_experts, 1)
    if topk_ids_TK.numel() > MAX_ROWS:
        raise ValueError(f"dispatch: topk_ids_TK must route at most 2**31 - 1 rows (T*K; rows are indexed with "
                         f"int32); got T*K = {topk_ids_TK.numel()} for shape {tuple(topk_ids_TK.shape)}")
    _checks.check_ids("dispatch", "topk_ids_TK", topk_ids_TK, num_experts)
    name = pick_backend(backend, topk_ids_TK.device, "dispatch")
    if name == "reference":
        return reference.dispatch(topk_ids_TK, num_experts)
    if direct_call():
        return DispatchPlan(*kernel("dispatch_fwd", name, dispatch_fwd)(topk_ids_TK, num_experts))
    return DispatchPlan(*_dispatch(topk_ids_TK, num_experts, name))
