"""finteam_kernels: fast Mixture-of-Experts ops for PyTorch.

Functional ops (each with a plain-PyTorch reference, Triton kernels, compiled CPU/CUDA kernels
where built, a backward, and a torch.library registration that works under torch.compile):

    topk_gating    logits_TE -> Routing(weights_TK, ids_TK, tokens_per_expert_E)
    router_losses  logits_TE, ids_TK -> RouterLosses(aux_loss, z_loss)
    dispatch       ids_TK -> DispatchPlan(expert_offsets_E1, tokens_per_expert_E, row_to_slot_N, slot_to_row_N)
    permute        x_TH, plan -> x_NH
    unpermute      y_NH, plan, weights_TK -> out_TH
    grouped_gemm   x_ND, w_EOD, expert_offsets_E1 -> y_NO
    moe_experts    x_TH, ids_TK, weights_TK, w_gate_up_E2IH, w_down_EHI -> out_TH

Each takes `backend=` ("auto", "triton", "cuda", "cpu", "reference"); see `_backend.py`.
Importing this package never touches a GPU driver.
"""
from ._types import DispatchPlan, RouterLosses, Routing
from .ops.dispatch import dispatch
from .ops.grouped_gemm import grouped_gemm
from .ops.moe_experts import moe_experts
from .ops.permute import permute
from .ops.router_losses import router_losses
from .ops.topk_gating import topk_gating
from .ops.unpermute import unpermute
from .layers import FinTeamMoE
from .balancing import router_aux_loss, update_expert_bias

__version__ = "0.1.0"

__all__ = [
    "DispatchPlan",
    "FinTeamMoE",
    "RouterLosses",
    "Routing",
    "dispatch",
    "grouped_gemm",
    "moe_experts",
    "permute",
    "router_aux_loss",
    "router_losses",
    "topk_gating",
    "unpermute",
    "update_expert_bias",
]
