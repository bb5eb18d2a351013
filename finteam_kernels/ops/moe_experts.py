"""moe_experts (being built: for now the plain-PyTorch reference only)."""
from .. import reference


def moe_experts(x_TH, topk_ids_TK, topk_weights_TK, w_gate_up_E2IH, w_down_EHI, activation="silu", *, backend=None):
    return reference.moe_experts(x_TH, topk_ids_TK, topk_weights_TK, w_gate_up_E2IH, w_down_EHI, activation)
