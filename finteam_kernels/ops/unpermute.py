"""unpermute: the weighted combine of each token's K expert outputs, back in token order.

Shape legend: T tokens, H hidden, K top-k, N = T*K routed rows.
  forward   out_TH[t] = sum_j w[t, j] * y_NH[slot_to_row[t*K + j]]   (fp32, j in order, y's dtype)
  backward  dy_NH[r] = w[slot] * grad_TH[token]                       (slot = row_to_slot[r])
            dw_TK[t, j] = sum_h grad_TH[t, h] * y_NH[slot_to_row[t*K + j], h]   (fp32, w's dtype)
Both directions write each output element from one program: deterministic, no atomics.
"""
import torch

from .. import _checks, reference
from .._backend import direct_call, eager_function, kernel, pick_backend, traced
from .._types import DispatchPlan
from ._triton import cdiv, device_guard, interpreting


def unpermute_fwd(y_NH: torch.Tensor, slot_to_row_N: torch.Tensor, topk_weights_TK: torch.Tensor) -> torch.Tensor:
    """Triton launcher of the forward combine: out_TH in y's dtype, accumulated in fp32."""
    from .rows_kernels import _combine_rows_kernel, row_tile

    T, K = topk_weights_TK.shape
    H = y_NH.shape[1]
    out_TH = y_NH.new_empty((T, H))
    if T == 0 or H == 0:
        return out_TH
    block_t, block_h = row_tile(H)
    with device_guard(y_NH):
        _combine_rows_kernel[(cdiv(T, block_t), cdiv(H, block_h))](
            y_NH, slot_to_row_N, topk_weights_TK, out_TH,
            T, H, K, y_NH.stride(0), y_NH.stride(1), topk_weights_TK.stride(0), topk_weights_TK.stride(1),
            out_TH.stride(0), HAS_WEIGHTS=True, INTERPRETED=interpreting(), BLOCK_T=block_t, BLOCK_H=block_h,
        )
    return out_TH


def unpermute_bwd(grad_TH: torch.Tensor, y_NH: torch.Tensor, row_to_slot_N: torch.Tensor,
                  slot_to_row_N: torch.Tensor, topk_weights_TK: torch.Tensor):
    """Triton launcher of the backward: (grad_NH in y's dtype, grad_weights_TK in the weights'
    dtype), one pass over the rows."""
    from .rows_kernels import _unpermute_bwd_kernel, row_tile

    T, K = topk_weights_TK.shape
    N, H = y_NH.shape
    grad_NH = y_NH.new_empty((N, H))
    grad_weights_TK = topk_weights_TK.new_zeros((T, K))
    if N == 0:
        return grad_NH, grad_weights_TK
    block_r, block_h = row_tile(H)
    with device_guard(y_NH):
        _unpermute_bwd_kernel[(cdiv(N, block_r),)](
            grad_TH, y_NH, row_to_slot_N, topk_weights_TK, grad_NH, grad_weights_TK,
            N, H, K, grad_TH.stride(0), grad_TH.stride(1), y_NH.stride(0), y_NH.stride(1),
            topk_weights_TK.stride(0), topk_weights_TK.stride(1), grad_NH.stride(0), grad_weights_TK.stride(0),
            INTERPRETED=interpreting(), BLOCK_R=block_r, BLOCK_H=block_h,
        )
    return grad_NH, grad_weights_TK


def _unpermute_impl(y_NH: torch.Tensor, row_to_slot_N: torch.Tensor, slot_to_row_N: torch.Tensor,
                    topk_weights_TK: torch.Tensor, plan_checked: bool, backend: str) -> torch.Tensor:
    if not plan_checked:  # traced by torch.compile: the plan's values are first seen here
        _checks.check_rows("unpermute", row_to_slot_N, slot_to_row_N)
    return kernel("unpermute_fwd", backend, unpermute_fwd)(y_NH, slot_to_row_N, topk_weights_TK)


_unpermute = torch.library.custom_op("finteam::unpermute", _unpermute_impl, mutates_args=())


@_unpermute.register_fake
def _(y_NH, row_to_slot_N, slot_to_row_N, topk_weights_TK, plan_checked, backend):
    return y_NH.new_empty((topk_weights_TK.shape[0], y_NH.shape[1]))


def _unpermute_backward_impl(grad_TH: torch.Tensor, y_NH: torch.Tensor, row_to_slot_N: torch.Tensor,
                             slot_to_row_N: torch.Tensor, topk_weights_TK: torch.Tensor,
                             backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(kernel("unpermute_bwd", backend, unpermute_bwd)(
        grad_TH, y_NH, row_to_slot_N, slot_to_row_N, topk_weights_TK))


_unpermute_backward = torch.library.custom_op("finteam::unpermute_backward", _unpermute_backward_impl, mutates_args=())


@_unpermute_backward.register_fake
def _(grad_TH, y_NH, row_to_slot_N, slot_to_row_N, topk_weights_TK, backend):
    return y_NH.new_empty(y_NH.shape), topk_weights_TK.new_empty(topk_weights_TK.shape)


def _setup_context(ctx, inputs, output):
    y_NH, row_to_slot_N, slot_to_row_N, topk_weights_TK, _, ctx.backend = inputs
    ctx.save_for_backward(y_NH, row_to_slot_N, slot_to_row_N, topk_weights_TK)


def _backward(ctx, grad_TH):
    y_NH, row_to_slot_N, slot_to_row_N, topk_weights_TK = ctx.saved_tensors
    backward_op = _unpermute_backward if traced() else _unpermute_backward_impl  # see eager_function
    grad_NH, grad_weights_TK = backward_op(grad_TH, y_NH, row_to_slot_N, slot_to_row_N, topk_weights_TK,
                                                   ctx.backend)
    return grad_NH, None, None, grad_weights_TK, None, None


_unpermute.register_autograd(_backward, setup_context=_setup_context)
_unpermute_eager = eager_function(_unpermute_impl, _setup_context, _backward)


def unpermute(y_NH: torch.Tensor, plan: DispatchPlan, topk_weights_TK: torch.Tensor, *,
              backend: str | None = None) -> torch.Tensor:
    """out_TH: each token's K expert rows of y_NH, weighted by topk_weights_TK and summed in fp32,
    in y's dtype."""
    _checks.check_tensor("unpermute", "y_NH", y_NH, "N, H", dtypes=_checks.FLOAT_DTYPES)
    _checks.check_tensor("unpermute", "topk_weights_TK", topk_weights_TK, "T, K", dtypes=_checks.FLOAT_DTYPES)
    T = topk_weights_TK.shape[0]
    top_k = _checks.check_plan("unpermute", plan, num_tokens=T)
    if T:
        _checks.check_dim("unpermute", "topk_weights_TK", topk_weights_TK, 1, top_k, "K, from the plan's rows per token")
    _checks.check_dim("unpermute", "y_NH", y_NH, 0, plan.row_to_slot_N.shape[0], "N, the plan's routed rows")
    _checks.check_same_device("unpermute", y_NH=y_NH, topk_weights_TK=topk_weights_TK,
                              **{"plan.row_to_slot_N": plan.row_to_slot_N, "plan.slot_to_row_N": plan.slot_to_row_N})
    name = pick_backend(backend, y_NH.device, "unpermute")
    plan_checked = _checks.check_plan_indices("unpermute", plan)
    if name == "reference":
        return reference.unpermute(y_NH, plan, topk_weights_TK)
    if direct_call(y_NH, topk_weights_TK):
        return kernel("unpermute_fwd", name, unpermute_fwd)(y_NH, plan.slot_to_row_N, topk_weights_TK)
    run = _unpermute if traced(y_NH, topk_weights_TK) else _unpermute_eager
    return run(y_NH, plan.row_to_slot_N, plan.slot_to_row_N, topk_weights_TK, plan_checked, name)
