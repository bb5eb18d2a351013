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
from .._types import DispatchPlan, issued_plan
from ._triton import cdiv, device_guard, interpreting

MAX_ROWS = 2**31 - 1  # rows and slots are stored as int32


def dispatch_fwd(topk_ids_TK: torch.Tensor, num_experts: int):
    """Triton launcher: (expert_offsets_E1 int64, tokens_per_expert_E int32, row_to_slot_N int32,
    slot_to_row_N int32), no host synchronisation. One launch when the N slots fit one block,
    three beyond (see dispatch_kernels.py)."""
    return dispatch_counted(topk_ids_TK, num_experts, None)


def dispatch_counted(topk_ids_TK: torch.Tensor, num_experts: int, tokens_per_expert_E: torch.Tensor | None):
    """dispatch_fwd, given `tokens_per_expert_E` when the caller has them: they must be the counts
    of these very ids (topk_gating's), are not counted again, and are returned. Then up to
    SUM_MAX_BLOCKS blocks take two launches, not three."""
    from . import dispatch_kernels as dk

    _checks.check_int("dispatch", "num_experts", num_experts, 1, dk.MAX_EXPERTS, " for the triton backend")
    device = topk_ids_TK.device
    ids_N = topk_ids_TK.contiguous().view(-1)  # small: a copy only for strided ids
    N, E = ids_N.shape[0], num_experts
    given = tokens_per_expert_E is not None
    offsets_E1 = torch.empty(E + 1, dtype=torch.int64, device=device)
    counts_E = tokens_per_expert_E if given else torch.empty(E, dtype=torch.int32, device=device)
    row_to_slot_N = torch.empty(N, dtype=torch.int32, device=device)
    slot_to_row_N = torch.empty(N, dtype=torch.int32, device=device)
    if N == 0:
        offsets_E1.zero_()
        return offsets_E1, counts_E if given else counts_E.zero_(), row_to_slot_N, slot_to_row_N
    block_n, rank_chunk, num_warps = dk.INTERPRETER_BLOCKING if interpreting() else dk.GPU_BLOCKING
    blocks, lanes = cdiv(N, block_n), dk.expert_lanes(E)
    blocking = dict(BLOCK_N=block_n, E_PAD=lanes, num_warps=num_warps)
    with device_guard(topk_ids_TK):
        if blocks == 1:
            prefix_BE, how = counts_E, dk.Prefix.NONE  # (a stand-in: nothing comes before the block)
        else:
            prefix_BE = torch.empty((blocks, E), dtype=torch.int32, device=device)
            dk._count_kernel[(blocks,)](ids_N, prefix_BE, N, E, **blocking)
            how = dk.Prefix.SUM if given and blocks <= dk.SUM_MAX_BLOCKS else dk.Prefix.SCANNED
            if how == dk.Prefix.SCANNED:
                # the scan writes the totals: into the given counts' place only if there are none
                totals_E = torch.empty_like(counts_E) if given else counts_E
                dk._scan_kernel[(cdiv(E, dk.SCAN_BLOCK_E),)](
                    prefix_BE, totals_E, blocks, E, BLOCK_B=dk.SCAN_BLOCK_B, BLOCK_E=dk.SCAN_BLOCK_E)
        dk._place_kernel[(blocks,)](
            ids_N, prefix_BE, counts_E, offsets_E1, row_to_slot_N, slot_to_row_N, N, E,
            PREFIX=how, COUNT=how == dk.Prefix.NONE and not given, RANK_CHUNK=rank_chunk,
            SUM_ROWS=dk.sum_rows(lanes), **blocking)
    return offsets_E1, counts_E, row_to_slot_N, slot_to_row_N


@torch.library.custom_op("finteam::dispatch", mutates_args=())
def _dispatch(
    topk_ids_TK: torch.Tensor, num_experts: int, ids_checked: bool, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if not ids_checked:  # traced by torch.compile: the ids are first seen here
        _checks.check_ids("dispatch", "topk_ids_TK", topk_ids_TK, num_experts)
    return tuple(kernel("dispatch_fwd", backend, dispatch_fwd)(topk_ids_TK, num_experts))


@_dispatch.register_fake
def _(topk_ids_TK, num_experts, ids_checked, backend):
    N = topk_ids_TK.shape[0] * topk_ids_TK.shape[1]
    new = topk_ids_TK.new_empty
    return (new(num_experts + 1, dtype=torch.int64), new(num_experts, dtype=torch.int32),
            new(N, dtype=torch.int32), new(N, dtype=torch.int32))


def dispatch(topk_ids_TK: torch.Tensor, num_experts: int, *, backend: str | None = None) -> DispatchPlan:
    """DispatchPlan grouping the T*K slots of `topk_ids_TK` ([T, K], int32/int64 in [0, E)) by
    expert. The ops that take a plan trust this one without re-reading it, as long as nothing
    is written to its tensors."""
    _checks.check_tensor("dispatch", "topk_ids_TK", topk_ids_TK, "T, K", dtypes=_checks.ID_DTYPES)
    _checks.check_int("dispatch", "num_experts", num_experts, 1)
    if topk_ids_TK.numel() > MAX_ROWS:
        raise ValueError(f"dispatch: topk_ids_TK must route at most 2**31 - 1 rows (T*K; rows are indexed with "
                         f"int32); got T*K = {topk_ids_TK.numel()} for shape {tuple(topk_ids_TK.shape)}")
    ids_checked = _checks.check_ids("dispatch", "topk_ids_TK", topk_ids_TK, num_experts)
    name = pick_backend(backend, topk_ids_TK.device, "dispatch")
    if name == "reference":
        return issued_plan(*reference.dispatch(topk_ids_TK, num_experts))
    if direct_call():
        return issued_plan(*kernel("dispatch_fwd", name, dispatch_fwd)(topk_ids_TK, num_experts))
    return issued_plan(*_dispatch(topk_ids_TK, num_experts, ids_checked, name))
