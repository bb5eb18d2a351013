"""permute: copy each token's row once per expert it chose, grouped by expert.

Shape legend: T tokens, H hidden, K top-k, N = T*K routed rows.
  forward   x_NH[r] = x_TH[row_to_slot[r] // K]
  backward  dx_TH[t] = sum_j dx_NH[slot_to_row[t*K + j]]  (a gather-sum: deterministic, no atomics)
"""
import torch

from .. import _checks, reference
from .._backend import direct_call, eager_function, kernel, pick_backend, traced
from .._types import DispatchPlan
from ._triton import cdiv, device_guard, interpreting


def permute_fwd(x_TH: torch.Tensor, row_to_slot_N: torch.Tensor, top_k: int) -> torch.Tensor:
    """Triton launcher of the forward gather."""
    from .rows_kernels import _gather_rows_kernel, row_tile

    N, H = row_to_slot_N.shape[0], x_TH.shape[1]
    x_NH = x_TH.new_empty((N, H))
    if N == 0 or H == 0:
        return x_NH
    block_r, block_h = row_tile(H)
    with device_guard(x_TH):
        _gather_rows_kernel[(cdiv(N, block_r), cdiv(H, block_h))](
            x_TH, row_to_slot_N, x_NH,
            N, H, x_TH.stride(0), x_TH.stride(1), x_NH.stride(0),
            INDEX_DIV=top_k, BLOCK_R=block_r, BLOCK_H=block_h,
        )
    return x_NH


def permute_bwd(grad_NH: torch.Tensor, slot_to_row_N: torch.Tensor, top_k: int) -> torch.Tensor:
    """Triton launcher of the backward gather-sum."""
    from .rows_kernels import _combine_rows_kernel, row_tile

    N, H = grad_NH.shape
    T = N // top_k
    grad_TH = grad_NH.new_empty((T, H))
    if T == 0 or H == 0:
        return grad_TH
    block_t, block_h = row_tile(H)
    with device_guard(grad_NH):
        _combine_rows_kernel[(cdiv(T, block_t), cdiv(H, block_h))](
            grad_NH, slot_to_row_N, grad_NH, grad_TH,
            T, H, top_k, grad_NH.stride(0), grad_NH.stride(1), 0, 0, grad_TH.stride(0),
            HAS_WEIGHTS=False, INTERPRETED=interpreting(), BLOCK_T=block_t, BLOCK_H=block_h,
        )
    return grad_TH


def _permute_impl(
    x_TH: torch.Tensor, row_to_slot_N: torch.Tensor, slot_to_row_N: torch.Tensor, top_k: int, plan_checked: bool,
    backend: str,
) -> torch.Tensor:
    if not plan_checked:  # traced by torch.compile: the plan's values are first seen here
        _checks.check_rows("permute", row_to_slot_N, slot_to_row_N)
    return kernel("permute_fwd", backend, permute_fwd)(x_TH, row_to_slot_N, top_k)


_permute = torch.library.custom_op("finteam::permute", _permute_impl, mutates_args=())


@_permute.register_fake
def _(x_TH, row_to_slot_N, slot_to_row_N, top_k, plan_checked, backend):
    return x_TH.new_empty((row_to_slot_N.shape[0], x_TH.shape[1]))


def _permute_backward_impl(grad_NH: torch.Tensor, slot_to_row_N: torch.Tensor, top_k: int,
                           backend: str) -> torch.Tensor:
    return kernel("permute_bwd", backend, permute_bwd)(grad_NH, slot_to_row_N, top_k)


_permute_backward = torch.library.custom_op("finteam::permute_backward", _permute_backward_impl, mutates_args=())


@_permute_backward.register_fake
def _(grad_NH, slot_to_row_N, top_k, backend):
    return grad_NH.new_empty((grad_NH.shape[0] // top_k, grad_NH.shape[1]))


def _setup_context(ctx, inputs, output):
    _, _, slot_to_row_N, ctx.top_k, _, ctx.backend = inputs
    ctx.save_for_backward(slot_to_row_N)


def _backward(ctx, grad_NH):
    (slot_to_row_N,) = ctx.saved_tensors
    backward_op = _permute_backward if traced() else _permute_backward_impl  # see eager_function
    return backward_op(grad_NH, slot_to_row_N, ctx.top_k, ctx.backend), None, None, None, None, None


_permute.register_autograd(_backward, setup_context=_setup_context)
_permute_eager = eager_function(_permute_impl, _setup_context, _backward)


def permute(x_TH: torch.Tensor, plan: DispatchPlan, *, backend: str | None = None) -> torch.Tensor:
    """x_NH: each token's row once per expert it chose, in the plan's expert-grouped order."""
    _checks.check_tensor("permute", "x_TH", x_TH, "T, H", dtypes=_checks.FLOAT_DTYPES)
    top_k = _checks.check_plan("permute", plan, num_tokens=x_TH.shape[0])
    _checks.check_same_device("permute", x_TH=x_TH, **{"plan.row_to_slot_N": plan.row_to_slot_N,
                                                        "plan.slot_to_row_N": plan.slot_to_row_N})
    name = pick_backend(backend, x_TH.device, "permute")
    plan_checked = _checks.check_plan_indices("permute", plan)
    if name == "reference":
        return reference.permute(x_TH, plan)
    if direct_call(x_TH):
        return kernel("permute_fwd", name, permute_fwd)(x_TH, plan.row_to_slot_N, top_k)
    run = _permute if traced(x_TH) else _permute_eager
    return run(x_TH, plan.row_to_slot_N, plan.slot_to_row_N, top_k, plan_checked, name)
