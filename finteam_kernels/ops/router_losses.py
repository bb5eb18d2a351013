"""router_losses (being built: for now the plain-PyTorch reference only)."""
from .. import reference


def router_losses(logits_TE, topk_ids_TK, num_experts, *, backend=None):
    return reference.router_losses(logits_TE, topk_ids_TK, num_experts)
