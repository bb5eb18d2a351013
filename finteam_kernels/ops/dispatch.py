"""dispatch (being built: for now the plain-PyTorch reference only)."""
from .. import reference


def dispatch(topk_ids_TK, num_experts, *, backend=None):
    return reference.dispatch(topk_ids_TK, num_experts)
