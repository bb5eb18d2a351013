"""dispatch (being built: the launcher runs the plain-PyTorch reference for now)."""
import torch

from .. import reference


def dispatch_fwd(topk_ids_TK: torch.Tensor, num_experts: int):
    """(expert_offsets_E1 int64, tokens_per_expert_E int32, row_to_slot_N int32, slot_to_row_N int32)."""
    return tuple(reference.dispatch(topk_ids_TK, num_experts))


def dispatch(topk_ids_TK, num_experts, *, backend=None):
    return reference.dispatch(topk_ids_TK, num_experts)
