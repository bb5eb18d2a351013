"""moe_experts: the whole expert computation of an MoE layer, given the routing.

Shape legend: T tokens, H hidden, I expert intermediate, E experts, K top-k, N = T*K routed rows.
Weights in transformers' layout (Mixtral, Qwen-MoE): w_gate_up_E2IH holds each expert's gate rows
then its up rows, w_down_EHI its down projection; shared with a model without copies.

Forward, with no host synchronisation (r is a routed row, e(r) its expert):
  dispatch       ids -> expert offsets and the row <-> slot permutation
  gate/up GEMM   [gate | up] = x[token(r)] @ W_gu[e]^T and a_NI = act(gate) * up in one kernel: the
                 permute of x is fused into the GEMM's loads, the GLU into its epilogue, which also
                 writes h_N2I = [gate | up] when a backward will follow
  down GEMM      y_NH = a_NI @ W_down[e]^T
  unpermute      out_TH[t] = sum_j w[t, j] * y_NH[row of slot t*K+j] (fp32, no atomics)
Backward, memory-aware: only h_N2I is kept (a GEMM to recompute), not a_NI (elementwise from h),
x_NH (a gather) nor y_NH (never needed: see moe_experts_kernels.py):
  g_NI = grad_out[token(r)] @ W_down[e]                   (GEMM, gather fused)
  dh_N2I, w*a_NI, grad_weights_TK from (h, g, w)           (one elementwise pass, w*a over g)
  dW_down[e] = grad_out[tokens of e]^T @ (w*a)_e           (weight-gradient GEMM, gather fused)
  dx_TH = gather-sum over slots of dh_N2I @ W_gu[e]        (GEMM, then permute's backward)
  dW_gu[e] = dh_e^T @ x[tokens of e]                       (weight-gradient GEMM, gather fused)
Each temporary is released once used, so the backward's peak beyond its outputs is h and dh plus
one [N, I] or [N, H] buffer.
"""
from typing import Optional

import torch

from .. import _checks, reference
from .._backend import direct_call, eager_function, kernel, pick_backend, traced
from ._triton import cdiv, device_guard, interpreting
from .dispatch import dispatch_counted
from .grouped_gemm import GEMM_DTYPES, gemm, wgrad
from .permute import permute_bwd
from .unpermute import unpermute_fwd

WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def moe_experts_fwd(x_TH: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor,
                    w_gate_up_E2IH: torch.Tensor, w_down_EHI: torch.Tensor, activation: str, needs_grad: bool):
    """Triton launcher of the forward: (out_TH, h_N2I, expert_offsets_E1, row_to_slot_N, slot_to_row_N),
    h_N2I being [0, 2I] unless needs_grad."""
    return experts_forward(x_TH, topk_ids_TK, topk_weights_TK, w_gate_up_E2IH, w_down_EHI, activation, needs_grad,
                           None)


def experts_forward(x_TH, topk_ids_TK, topk_weights_TK, w_gate_up_E2IH, w_down_EHI, activation, needs_grad,
                    tokens_per_expert_E):
    """moe_experts_fwd, given the ids' counts `tokens_per_expert_E` when the caller has them
    (topk_gating's), so that dispatch does not count again."""
    K = topk_ids_TK.shape[1]
    expert_offsets_E1, _, row_to_slot_N, slot_to_row_N = dispatch_counted(
        topk_ids_TK, w_gate_up_E2IH.shape[0], tokens_per_expert_E)
    a_NI, h_N2I = gemm(x_TH, w_gate_up_E2IH, expert_offsets_E1, index_N=row_to_slot_N, index_div=K,
                       activation=activation, keep_h=needs_grad)
    y_NH, _ = gemm(a_NI, w_down_EHI, expert_offsets_E1)
    out_TH = unpermute_fwd(y_NH, slot_to_row_N, topk_weights_TK)
    return out_TH, h_N2I, expert_offsets_E1, row_to_slot_N, slot_to_row_N


def _glu_backward(h_N2I: torch.Tensor, g_NI: torch.Tensor, row_to_slot_N: torch.Tensor,
                  topk_weights_TK: torch.Tensor, activation: str):
    """(dh_N2I, wa_NI, grad_weights_TK); wa_NI is written over g_NI, which is not needed after."""
    from .moe_experts_kernels import _glu_backward_kernel, launch_config

    N, I = g_NI.shape
    dh_N2I = h_N2I.new_empty((N, 2 * I))
    grad_weights_TK = topk_weights_TK.new_empty(topk_weights_TK.shape)
    if N == 0:
        return dh_N2I, g_NI, grad_weights_TK
    meta = launch_config(I)
    with device_guard(h_N2I):
        _glu_backward_kernel[(cdiv(N, meta["BLOCK_R"]),)](
            h_N2I, g_NI, row_to_slot_N, topk_weights_TK.contiguous(), dh_N2I, g_NI, grad_weights_TK,
            N, I, h_N2I.stride(0), h_N2I.stride(1), g_NI.stride(0), g_NI.stride(1), dh_N2I.stride(0),
            g_NI.stride(0), ACTIVATION=activation, INTERPRETED=interpreting(), **meta,
        )
    return dh_N2I, g_NI, grad_weights_TK


def moe_experts_bwd(grad_TH: torch.Tensor, x_TH: torch.Tensor, topk_weights_TK: torch.Tensor,
                    w_gate_up_E2IH: torch.Tensor, w_down_EHI: torch.Tensor, h_N2I: torch.Tensor,
                    expert_offsets_E1: torch.Tensor, row_to_slot_N: torch.Tensor, slot_to_row_N: torch.Tensor,
                    activation: str):
    """Triton launcher of the backward: (grad_x_TH, grad_weights_TK, grad_w_gate_up_E2IH, grad_w_down_EHI)."""
    K = topk_weights_TK.shape[1]
    grad_TH = grad_TH.to(x_TH.dtype)
    g_NI, _ = gemm(grad_TH, w_down_EHI.transpose(1, 2), expert_offsets_E1, index_N=row_to_slot_N, index_div=K)
    dh_N2I, wa_NI, grad_weights_TK = _glu_backward(h_N2I, g_NI, row_to_slot_N, topk_weights_TK, activation)
    del g_NI  # its memory now holds wa_NI
    grad_w_down_EHI = w_down_EHI.new_empty(w_down_EHI.shape)
    # dW_down[e]^T = (w*a)_e^T @ grad_out[tokens of e]: the gather stays on the wgrad's second
    # operand, and the result lands in the transposed view
    wgrad(wa_NI, grad_TH, expert_offsets_E1, index_N=row_to_slot_N, index_div=K,
          out_EOD=grad_w_down_EHI.transpose(1, 2))
    del wa_NI
    dx_NH, _ = gemm(dh_N2I, w_gate_up_E2IH.transpose(1, 2), expert_offsets_E1)
    grad_x_TH = permute_bwd(dx_NH, slot_to_row_N, K)
    del dx_NH
    grad_w_gate_up_E2IH = wgrad(dh_N2I, x_TH, expert_offsets_E1, index_N=row_to_slot_N, index_div=K)
    return grad_x_TH, grad_weights_TK, grad_w_gate_up_E2IH, grad_w_down_EHI


def _forward(backend: str, x_TH, topk_ids_TK, topk_weights_TK, w_gate_up_E2IH, w_down_EHI, activation, needs_grad,
             tokens_per_expert_E):
    """The forward on a kernel backend; only the Triton one takes the counts (the compiled ones
    count on the way, at no launch cost)."""
    if backend == "triton":
        return experts_forward(x_TH, topk_ids_TK, topk_weights_TK, w_gate_up_E2IH, w_down_EHI, activation,
                               needs_grad, tokens_per_expert_E)
    return kernel("moe_experts_fwd", backend, None)(
        x_TH, topk_ids_TK, topk_weights_TK, w_gate_up_E2IH, w_down_EHI, activation, needs_grad)


def _moe_experts_impl(x_TH: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor,
                      w_gate_up_E2IH: torch.Tensor, w_down_EHI: torch.Tensor, activation: str, needs_grad: bool,
                      ids_checked: bool, tokens_per_expert_E: Optional[torch.Tensor],
                      backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if not ids_checked:  # traced by torch.compile: the ids are first seen here
        _checks.check_ids("moe_experts", "topk_ids_TK", topk_ids_TK, w_gate_up_E2IH.shape[0])
    return _forward(backend, x_TH, topk_ids_TK, topk_weights_TK, w_gate_up_E2IH, w_down_EHI, activation, needs_grad,
                    tokens_per_expert_E)


_moe_experts = torch.library.custom_op("finteam::moe_experts", _moe_experts_impl, mutates_args=())


@_moe_experts.register_fake
def _(x_TH, topk_ids_TK, topk_weights_TK, w_gate_up_E2IH, w_down_EHI, activation, needs_grad, ids_checked,
      tokens_per_expert_E, backend):
    T, K = topk_ids_TK.shape
    E, I2, H = w_gate_up_E2IH.shape
    N = T * K
    return (x_TH.new_empty((T, H)), x_TH.new_empty((N if needs_grad else 0, I2)),
            topk_ids_TK.new_empty((E + 1,), dtype=torch.int64), topk_ids_TK.new_empty((N,), dtype=torch.int32),
            topk_ids_TK.new_empty((N,), dtype=torch.int32))


def _moe_experts_backward_impl(
    grad_TH: torch.Tensor, x_TH: torch.Tensor, topk_weights_TK: torch.Tensor, w_gate_up_E2IH: torch.Tensor,
    w_down_EHI: torch.Tensor, h_N2I: torch.Tensor, expert_offsets_E1: torch.Tensor, row_to_slot_N: torch.Tensor,
    slot_to_row_N: torch.Tensor, activation: str, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return kernel("moe_experts_bwd", backend, moe_experts_bwd)(
        grad_TH, x_TH, topk_weights_TK, w_gate_up_E2IH, w_down_EHI, h_N2I, expert_offsets_E1, row_to_slot_N,
        slot_to_row_N, activation)


_moe_experts_backward = torch.library.custom_op(
    "finteam::moe_experts_backward", _moe_experts_backward_impl, mutates_args=())


@_moe_experts_backward.register_fake
def _(grad_TH, x_TH, topk_weights_TK, w_gate_up_E2IH, w_down_EHI, h_N2I, expert_offsets_E1, row_to_slot_N,
      slot_to_row_N, activation, backend):
    return (x_TH.new_empty(x_TH.shape), topk_weights_TK.new_empty(topk_weights_TK.shape),
            w_gate_up_E2IH.new_empty(w_gate_up_E2IH.shape), w_down_EHI.new_empty(w_down_EHI.shape))


def _setup_context(ctx, inputs, output):
    x_TH, _, topk_weights_TK, w_gate_up_E2IH, w_down_EHI, ctx.activation, _, _, _, ctx.backend = inputs
    _, h_N2I, expert_offsets_E1, row_to_slot_N, slot_to_row_N = output
    ctx.mark_non_differentiable(h_N2I)
    # Autograd would otherwise hand the backward a zero-filled gradient for h_N2I, which it
    # ignores: a [N, 2I] fill per layer and step, 4% of the tiny team's training step.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x_TH, topk_weights_TK, w_gate_up_E2IH, w_down_EHI, h_N2I, expert_offsets_E1,
                          row_to_slot_N, slot_to_row_N)


def _backward(ctx, grad_TH, *_):
    if grad_TH is None:  # not materialised (see _setup_context): the output took no part in the loss
        return (None,) * 10
    backward_op = _moe_experts_backward if traced() else _moe_experts_backward_impl  # see eager_function
    grads = backward_op(grad_TH, *ctx.saved_tensors, ctx.activation, ctx.backend)
    grad_x_TH, grad_weights_TK, grad_w_gate_up_E2IH, grad_w_down_EHI = grads
    return grad_x_TH, None, grad_weights_TK, grad_w_gate_up_E2IH, grad_w_down_EHI, None, None, None, None, None


_moe_experts.register_autograd(_backward, setup_context=_setup_context)
_moe_experts_eager = eager_function(_moe_experts_impl, _setup_context, _backward)


def _check(x_TH, topk_ids_TK, topk_weights_TK, w_gate_up_E2IH, w_down_EHI, activation) -> None:
    op = "moe_experts"
    _checks.check_tensor(op, "x_TH", x_TH, "T, H", dtypes=GEMM_DTYPES)
    _checks.check_tensor(op, "topk_ids_TK", topk_ids_TK, "T, K", dtypes=_checks.ID_DTYPES)
    _checks.check_tensor(op, "topk_weights_TK", topk_weights_TK, "T, K", dtypes=WEIGHT_DTYPES)
    _checks.check_tensor(op, "w_gate_up_E2IH", w_gate_up_E2IH, "E, 2I, H", dtypes=GEMM_DTYPES)
    _checks.check_tensor(op, "w_down_EHI", w_down_EHI, "E, H, I", dtypes=GEMM_DTYPES)
    _checks.check_same_dtype(op, x_TH=x_TH, w_gate_up_E2IH=w_gate_up_E2IH, w_down_EHI=w_down_EHI)
    _checks.check_choice(op, "activation", activation, reference.ACTIVATIONS)
    T, H = x_TH.shape
    E, I2, _ = w_gate_up_E2IH.shape
    K = topk_ids_TK.shape[1]
    _checks.check_dim(op, "topk_ids_TK", topk_ids_TK, 0, T, "T, the tokens of x_TH")
    _checks.check_dim(op, "topk_weights_TK", topk_weights_TK, 0, T, "T, the tokens of x_TH")
    _checks.check_dim(op, "topk_weights_TK", topk_weights_TK, 1, K, "K, as in topk_ids_TK")
    _checks.check_dim(op, "w_gate_up_E2IH", w_gate_up_E2IH, 2, H, "H, the width of x_TH")
    if I2 % 2:
        raise ValueError(f"{op}: w_gate_up_E2IH must have an even size in dimension 1 (2I: the gate rows, then "
                         f"the up rows); got shape {tuple(w_gate_up_E2IH.shape)}")
    _checks.check_dim(op, "w_down_EHI", w_down_EHI, 0, E, "E, the experts of w_gate_up_E2IH")
    _checks.check_dim(op, "w_down_EHI", w_down_EHI, 1, H, "H, the width of x_TH")
    _checks.check_dim(op, "w_down_EHI", w_down_EHI, 2, I2 // 2, "I, half of w_gate_up_E2IH's dimension 1")
    if E == 0:
        raise ValueError(f"{op}: w_gate_up_E2IH must hold at least one expert (dimension 0, E); got shape "
                         f"{tuple(w_gate_up_E2IH.shape)}")
    _checks.check_int(op, "K (topk_ids_TK.shape[1])", K, 1, E, f" (experts per token, with E = {E})")
    _checks.check_same_device(op, x_TH=x_TH, topk_ids_TK=topk_ids_TK, topk_weights_TK=topk_weights_TK,
                              w_gate_up_E2IH=w_gate_up_E2IH, w_down_EHI=w_down_EHI)


def moe_experts(x_TH: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor,
                w_gate_up_E2IH: torch.Tensor, w_down_EHI: torch.Tensor, activation: str = "silu", *,
                backend: str | None = None) -> torch.Tensor:
    """out_TH[t] = sum_j topk_weights[t, j] * expert_{topk_ids[t, j]}(x[t]), where
    expert_e(x) = W_down[e] @ (act(W_gate[e] @ x) * (W_up[e] @ x)) and activation is "silu"
    (SwiGLU), "gelu" (GeGLU, erf) or "gelu_tanh" (GeGLU, tanh approximation).

    x and both weights share a dtype (fp32, fp16 or bf16), the output's; ids are int32 or int64,
    routing weights fp32, bf16 or fp16. Differentiable in x, the routing weights and both weights.
    """
    _check(x_TH, topk_ids_TK, topk_weights_TK, w_gate_up_E2IH, w_down_EHI, activation)
    ids_checked = _checks.check_ids("moe_experts", "topk_ids_TK", topk_ids_TK, w_gate_up_E2IH.shape[0])
    return routed_experts(x_TH, topk_ids_TK, topk_weights_TK, w_gate_up_E2IH, w_down_EHI, activation, backend,
                          ids_checked=ids_checked)


def routed_experts(x_TH: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor,
                   w_gate_up_E2IH: torch.Tensor, w_down_EHI: torch.Tensor, activation: str, backend: str | None, *,
                   ids_checked: bool = True, tokens_per_expert_E: torch.Tensor | None = None) -> torch.Tensor:
    """moe_experts without its argument checks, for a caller that made the routing itself with
    topk_gating (ids in [0, E) by construction, arguments consistent): FinTeamMoE. Its counts
    `tokens_per_expert_E` spare dispatch a count."""
    name = pick_backend(backend, x_TH.device, "moe_experts")
    if name == "reference":
        return reference.moe_experts(x_TH, topk_ids_TK, topk_weights_TK, w_gate_up_E2IH, w_down_EHI, activation)
    if direct_call(x_TH, topk_weights_TK, w_gate_up_E2IH, w_down_EHI):
        return _forward(name, x_TH, topk_ids_TK, topk_weights_TK, w_gate_up_E2IH, w_down_EHI, activation, False,
                        tokens_per_expert_E)[0]
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (x_TH, topk_weights_TK, w_gate_up_E2IH, w_down_EHI))
    run = _moe_experts if traced(x_TH, topk_weights_TK, w_gate_up_E2IH, w_down_EHI) else _moe_experts_eager
    return run(x_TH, topk_ids_TK, topk_weights_TK, w_gate_up_E2IH, w_down_EHI, activation, needs_grad,
               ids_checked, tokens_per_expert_E, name)[0]
