"""router_losses: the load-balancing loss and the z-loss of one router.

Shape legend: T tokens, E experts, K top-k, P partial-sum programs.
  forward   aux = E * sum_e f_e * P_e, f_e = (assignments to e) / T, P_e = mean_t softmax(logits_t)_e
            (transformers' Mixtral `load_balancing_loss_func`); z = mean_t logsumexp(logits_t)^2
  backward  grad_logits through P_e and the logsumexp; the counts f_e carry no gradient
Deterministic: partial sums per program, then one program adds them in a fixed order.
"""
from typing import Optional

import torch

from .. import _checks, reference
from .._backend import direct_call, eager_function, kernel, pick_backend, traced
from .._types import RouterLosses
from ._triton import cdiv, device_guard, interpreting

# Programs of the partial-sum pass: enough to fill a GPU, few enough that one program can add
# their [P, E] partial sums quickly. Fixed, so the summation order depends only on T and E.
MAX_PARTIALS = 512


def _prepare(logits_TE: torch.Tensor, topk_ids_TK: torch.Tensor):
    """The kernels read fp32/fp16/bf16 logits and int32 ids (ids are < E, so they fit)."""
    x_TE = logits_TE.float() if logits_TE.dtype == torch.float64 else logits_TE
    return x_TE, topk_ids_TK.to(torch.int32)


def _partial_sums(x_TE: torch.Tensor, ids_TK: torch.Tensor, num_experts: int, with_probs: bool):
    """(prob_sums_PE, lse_sq_sums_P, counts_E) from the partials kernel (T >= 1)."""
    from .router_losses_kernels import _router_partials_kernel
    from .topk_gating_kernels import row_tile

    T = x_TE.shape[0]
    block_t, block_e, num_warps = row_tile(num_experts, "router_losses")
    programs = min(cdiv(T, block_t), MAX_PARTIALS)
    # Counting alone writes no sums; one-element stand-ins keep the arguments valid pointers.
    prob_sums_PE = x_TE.new_empty((programs, num_experts) if with_probs else (1, 1), dtype=torch.float32)
    lse_sq_sums_P = x_TE.new_empty((programs if with_probs else 1,), dtype=torch.float32)
    counts_E = x_TE.new_zeros((num_experts,), dtype=torch.int32)
    with device_guard(x_TE):
        _router_partials_kernel[(programs,)](
            x_TE, ids_TK, prob_sums_PE, lse_sq_sums_P, counts_E,
            T, num_experts, ids_TK.shape[1], x_TE.stride(0), x_TE.stride(1), ids_TK.stride(0), ids_TK.stride(1),
            WITH_PROBS=with_probs, BLOCK_T=block_t, BLOCK_E=block_e, num_warps=num_warps,
        )
    return prob_sums_PE, lse_sq_sums_P, counts_E


def router_losses_fwd(logits_TE: torch.Tensor, topk_ids_TK: torch.Tensor, num_experts: int):
    """Triton launcher of the forward: (aux_loss, z_loss), 0-d float32."""
    from .router_losses_kernels import FINISH_BLOCK_E, FINISH_BLOCK_P, _router_losses_finish_kernel

    T = logits_TE.shape[0]
    if T == 0:
        return logits_TE.new_zeros((), dtype=torch.float32), logits_TE.new_zeros((), dtype=torch.float32)
    aux = logits_TE.new_empty((), dtype=torch.float32)  # both written by the finishing kernel
    z = logits_TE.new_empty((), dtype=torch.float32)
    x_TE, ids_TK = _prepare(logits_TE, topk_ids_TK)
    prob_sums_PE, lse_sq_sums_P, counts_E = _partial_sums(x_TE, ids_TK, num_experts, with_probs=True)
    with device_guard(x_TE):
        _router_losses_finish_kernel[(1,)](
            prob_sums_PE, lse_sq_sums_P, counts_E, aux, z,
            prob_sums_PE.shape[0], T, num_experts,
            BLOCK_P=FINISH_BLOCK_P, BLOCK_E=FINISH_BLOCK_E,
        )
    return aux, z


def router_losses_bwd(
    grad_aux: torch.Tensor, grad_z: torch.Tensor, logits_TE: torch.Tensor, topk_ids_TK: torch.Tensor,
    num_experts: int,
) -> torch.Tensor:
    """Triton launcher of the backward: grad_logits_TE in the logits' dtype."""
    from .router_losses_kernels import _router_losses_bwd_kernel
    from .topk_gating_kernels import row_tile

    T = logits_TE.shape[0]
    x_TE, ids_TK = _prepare(logits_TE, topk_ids_TK)
    grad_TE = x_TE.new_empty((T, num_experts))
    if T == 0:
        return grad_TE.to(logits_TE.dtype)
    _, _, counts_E = _partial_sums(x_TE, ids_TK, num_experts, with_probs=False)
    block_t, block_e, num_warps = row_tile(num_experts, "router_losses")
    with device_guard(x_TE):
        _router_losses_bwd_kernel[(cdiv(T, block_t),)](
            grad_aux.float(), grad_z.float(), x_TE, counts_E, grad_TE,
            T, num_experts, x_TE.stride(0), x_TE.stride(1),
            INTERPRETED=interpreting(), BLOCK_T=block_t, BLOCK_E=block_e, num_warps=num_warps,
        )
    return grad_TE.to(logits_TE.dtype)


def _router_losses_impl(
    logits_TE: torch.Tensor, topk_ids_TK: torch.Tensor, num_experts: int, ids_checked: bool, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    if not ids_checked:  # traced by torch.compile: the ids are first seen here
        _checks.check_ids("router_losses", "topk_ids_TK", topk_ids_TK, num_experts)
    return kernel("router_losses_fwd", backend, router_losses_fwd)(logits_TE, topk_ids_TK, num_experts)


_router_losses = torch.library.custom_op("finteam::router_losses", _router_losses_impl, mutates_args=())


@_router_losses.register_fake
def _(logits_TE, topk_ids_TK, num_experts, ids_checked, backend):
    return logits_TE.new_empty((), dtype=torch.float32), logits_TE.new_empty((), dtype=torch.float32)


def _router_losses_backward_impl(
    grad_aux: torch.Tensor, grad_z: torch.Tensor, logits_TE: torch.Tensor, topk_ids_TK: torch.Tensor,
    num_experts: int, backend: str,
) -> torch.Tensor:
    return kernel("router_losses_bwd", backend, router_losses_bwd)(grad_aux, grad_z, logits_TE, topk_ids_TK,
                                                                   num_experts)


_router_losses_backward = torch.library.custom_op(
    "finteam::router_losses_backward", _router_losses_backward_impl, mutates_args=())


@_router_losses_backward.register_fake
def _(grad_aux, grad_z, logits_TE, topk_ids_TK, num_experts, backend):
    return logits_TE.new_empty(logits_TE.shape)


def _setup_context(ctx, inputs, output):
    logits_TE, topk_ids_TK, ctx.num_experts, _, ctx.backend = inputs
    ctx.save_for_backward(logits_TE, topk_ids_TK)


def _backward(ctx, grad_aux, grad_z):
    logits_TE, topk_ids_TK = ctx.saved_tensors
    backward_op = _router_losses_backward if traced() else _router_losses_backward_impl  # see eager_function
    grad_TE = backward_op(grad_aux, grad_z, logits_TE, topk_ids_TK, ctx.num_experts, ctx.backend)
    return grad_TE, None, None, None, None


_router_losses.register_autograd(_backward, setup_context=_setup_context)
_router_losses_eager = eager_function(_router_losses_impl, _setup_context, _backward)


def _check_arguments(logits_TE, topk_ids_TK, num_experts) -> bool:
    """Raises on a bad argument; returns whether the ids' values were checked (see check_ids)."""
    op = "router_losses"
    _checks.check_tensor(op, "logits_TE", logits_TE, "T, E", dtypes=_checks.FLOAT_DTYPES)
    _checks.check_tensor(op, "topk_ids_TK", topk_ids_TK, "T, K", dtypes=_checks.ID_DTYPES)
    _checks.check_dim(op, "topk_ids_TK", topk_ids_TK, 0, logits_TE.shape[0], "one row per token, as logits_TE")
    _checks.check_same_device(op, logits_TE=logits_TE, topk_ids_TK=topk_ids_TK)
    _checks.check_int(op, "num_experts", num_experts, 1)
    _checks.check_dim(op, "logits_TE", logits_TE, 1, num_experts, "num_experts")
    return _checks.check_ids(op, "topk_ids_TK", topk_ids_TK, num_experts)


def router_losses(
    logits_TE: torch.Tensor, topk_ids_TK: torch.Tensor, num_experts: int, *, backend: Optional[str] = None
) -> RouterLosses:
    """RouterLosses(aux_loss, z_loss), 0-d float32 tensors; see `reference.router_losses`.

    aux_loss = E * sum_e f_e * P_e with f_e = (assignments of the T*K to expert e) / T, so a
    perfectly balanced router scores K (transformers' Mixtral convention); z_loss =
    mean logsumexp(logits)^2. Zero tokens give zero losses that stay in the autograd graph.
    """
    ids_checked = _check_arguments(logits_TE, topk_ids_TK, num_experts)
    return routed_losses(logits_TE, topk_ids_TK, num_experts, backend, ids_checked=ids_checked)


def routed_losses(logits_TE: torch.Tensor, topk_ids_TK: torch.Tensor, num_experts: int, backend: Optional[str], *,
                  ids_checked: bool = True) -> RouterLosses:
    """router_losses without its argument checks, for a caller that made the ids itself with
    topk_gating from these logits: FinTeamMoE."""
    name = pick_backend(backend, logits_TE.device, "router_losses")
    if name == "reference":
        return reference.router_losses(logits_TE, topk_ids_TK, num_experts)
    if direct_call(logits_TE):
        return RouterLosses(*kernel("router_losses_fwd", name, router_losses_fwd)(logits_TE, topk_ids_TK, num_experts))
    run = _router_losses if traced(logits_TE) else _router_losses_eager
    return RouterLosses(*run(logits_TE, topk_ids_TK, num_experts, ids_checked, name))
