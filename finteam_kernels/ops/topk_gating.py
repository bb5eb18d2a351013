"""topk_gating: score the experts of each token, pick K, weight them, count tokens per expert.

Shape legend: T tokens, E experts, K top-k.
  forward   scores = softmax|sigmoid(logits) in fp32; ids = the K best of scores + bias (group-
            limited with num_groups > 1); weights = scores at ids, renormalised, times scaling
  backward  grad_logits from grad_weights through the weighting, the gather and the score
            function, recomputing the scores from the saved logits (the bias and the choice of
            ids get no gradient)
The exact rules (ties, NaN and inf, dead rows) are `reference.topk_gating`'s.
"""
from typing import Optional

import torch

from .. import _checks, reference
from .._backend import direct_call, eager_function, kernel, pick_backend, traced
from .._types import Routing
from ._triton import cdiv, device_guard, interpreting

SCORES = ("softmax", "sigmoid")


def _as_kernel_input(logits_TE: torch.Tensor) -> torch.Tensor:
    """The kernels read fp32/fp16/bf16 logits (and score in fp32 anyway): fp64 is narrowed here."""
    return logits_TE.float() if logits_TE.dtype == torch.float64 else logits_TE


def topk_gating_fwd(
    logits_TE: torch.Tensor, expert_bias_E: Optional[torch.Tensor], k: int, score: str, renormalize: bool,
    num_groups: int, topk_groups: int, scaling: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton launcher of the fused forward: (weights_TK fp32, ids_TK int32, tokens_per_expert_E int32)."""
    from .topk_gating_kernels import _topk_gating_fwd_kernel, row_tile

    T, E = logits_TE.shape
    weights_TK = logits_TE.new_empty((T, k), dtype=torch.float32)
    ids_TK = logits_TE.new_empty((T, k), dtype=torch.int32)
    counts_E = logits_TE.new_zeros((E,), dtype=torch.int32)
    if T == 0:
        return weights_TK, ids_TK, counts_E
    block_t, block_e, num_warps = row_tile(E, "topk_gating")
    x_TE = _as_kernel_input(logits_TE)
    has_bias = expert_bias_E is not None
    # Without a bias the kernel reads none; a one-element stand-in keeps the argument a valid pointer.
    bias_E = expert_bias_E.float().contiguous() if has_bias else weights_TK.new_empty((1,))
    with device_guard(logits_TE):
        _topk_gating_fwd_kernel[(cdiv(T, block_t),)](
            x_TE, bias_E, weights_TK, ids_TK, counts_E,
            T, E, k, E // num_groups, topk_groups, float(scaling),
            x_TE.stride(0), x_TE.stride(1),
            int(score == "sigmoid"), int(has_bias), int(renormalize),
            INTERPRETED=interpreting(), BLOCK_T=block_t, BLOCK_E=block_e, num_warps=num_warps,
        )
    return weights_TK, ids_TK, counts_E


def topk_gating_bwd(
    grad_weights_TK: torch.Tensor, logits_TE: torch.Tensor, ids_TK: torch.Tensor, score: str, renormalize: bool,
    scaling: float,
) -> torch.Tensor:
    """Triton launcher of the backward: grad_logits_TE in the logits' dtype."""
    from .topk_gating_kernels import _topk_gating_bwd_kernel, row_tile

    T, E = logits_TE.shape
    x_TE = _as_kernel_input(logits_TE)
    grad_TE = x_TE.new_empty((T, E))
    if T == 0:
        return grad_TE.to(logits_TE.dtype)
    block_t, block_e, num_warps = row_tile(E, "topk_gating")
    ids_TK = ids_TK.to(torch.int32)
    grad_weights_TK = grad_weights_TK.float()
    with device_guard(logits_TE):
        _topk_gating_bwd_kernel[(cdiv(T, block_t),)](
            grad_weights_TK, x_TE, ids_TK, grad_TE,
            T, E, ids_TK.shape[1], float(scaling),
            grad_weights_TK.stride(0), grad_weights_TK.stride(1), x_TE.stride(0), x_TE.stride(1),
            ids_TK.stride(0), ids_TK.stride(1),
            int(score == "sigmoid"), int(renormalize),
            INTERPRETED=interpreting(), BLOCK_T=block_t, BLOCK_E=block_e, num_warps=num_warps,
        )
    return grad_TE.to(logits_TE.dtype)


def _topk_gating_impl(
    logits_TE: torch.Tensor, expert_bias_E: Optional[torch.Tensor], k: int, score: str, renormalize: bool,
    num_groups: int, topk_groups: int, scaling: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return kernel("topk_gating_fwd", backend, topk_gating_fwd)(
        logits_TE, expert_bias_E, k, score, renormalize, num_groups, topk_groups, scaling)


_topk_gating = torch.library.custom_op("finteam::topk_gating", _topk_gating_impl, mutates_args=())


@_topk_gating.register_fake
def _(logits_TE, expert_bias_E, k, score, renormalize, num_groups, topk_groups, scaling, backend):
    T, E = logits_TE.shape
    return (logits_TE.new_empty((T, k), dtype=torch.float32), logits_TE.new_empty((T, k), dtype=torch.int32),
            logits_TE.new_empty((E,), dtype=torch.int32))


def _topk_gating_backward_impl(
    grad_weights_TK: torch.Tensor, logits_TE: torch.Tensor, ids_TK: torch.Tensor, score: str, renormalize: bool,
    scaling: float, backend: str,
) -> torch.Tensor:
    return kernel("topk_gating_bwd", backend, topk_gating_bwd)(
        grad_weights_TK, logits_TE, ids_TK, score, renormalize, scaling)


_topk_gating_backward = torch.library.custom_op(
    "finteam::topk_gating_backward", _topk_gating_backward_impl, mutates_args=())


@_topk_gating_backward.register_fake
def _(grad_weights_TK, logits_TE, ids_TK, score, renormalize, scaling, backend):
    return logits_TE.new_empty(logits_TE.shape)


def _setup_context(ctx, inputs, output):
    logits_TE, _, _, ctx.score, ctx.renormalize, _, _, ctx.scaling, ctx.backend = inputs
    ctx.save_for_backward(logits_TE, output[1])


def _backward(ctx, grad_weights_TK, _grad_ids, _grad_counts):
    logits_TE, ids_TK = ctx.saved_tensors
    backward_op = _topk_gating_backward if traced() else _topk_gating_backward_impl  # see eager_function
    grad_TE = backward_op(grad_weights_TK, logits_TE, ids_TK, ctx.score, ctx.renormalize, ctx.scaling,
                                    ctx.backend)
    return grad_TE, None, None, None, None, None, None, None, None


_topk_gating.register_autograd(_backward, setup_context=_setup_context)
_topk_gating_eager = eager_function(_topk_gating_impl, _setup_context, _backward)


def _check_arguments(logits_TE, k, score, renormalize, expert_bias, num_groups, topk_groups, scaling) -> None:
    op = "topk_gating"
    _checks.check_tensor(op, "logits_TE", logits_TE, "T, E", dtypes=_checks.FLOAT_DTYPES)
    E = logits_TE.shape[1]
    _checks.check_int(op, "the number of experts logits_TE.shape[1]", E, 1)
    _checks.check_int(op, "k", k, 1, E, " (E, the number of experts)")
    _checks.check_choice(op, "score", score, SCORES)
    _checks.check_bool(op, "renormalize", renormalize)
    if expert_bias is not None:
        _checks.check_tensor(op, "expert_bias", expert_bias, "E", dtypes=_checks.FLOAT_DTYPES)
        _checks.check_dim(op, "expert_bias", expert_bias, 0, E, "one per expert, as logits_TE.shape[1]")
        _checks.check_same_device(op, logits_TE=logits_TE, expert_bias=expert_bias)
    _checks.check_int(op, "num_groups", num_groups, 1)
    if E % num_groups:
        raise ValueError(f"{op}: num_groups must divide the number of experts E={E}; got {num_groups}")
    _checks.check_int(op, "topk_groups", topk_groups, 1, num_groups, " (num_groups)")
    group_size = E // num_groups
    _checks.check_int(op, "k", k, 1, topk_groups * group_size,
                      f" (topk_groups * E / num_groups = {topk_groups} * {group_size}: the experts that may be chosen)")
    _checks.check_real(op, "scaling", scaling)


def topk_gating(
    logits_TE: torch.Tensor,
    k: int,
    *,
    score: str = "softmax",
    renormalize: bool = True,
    expert_bias: Optional[torch.Tensor] = None,
    num_groups: int = 1,
    topk_groups: int = 1,
    scaling: float = 1.0,
    backend: Optional[str] = None,
) -> Routing:
    """Route each token to K experts: Routing(weights_TK fp32, ids_TK int32, tokens_per_expert_E int32).

    score: "softmax" or "sigmoid" of the logits, in fp32. expert_bias [E] shifts selection only
    (aux-loss-free balancing). num_groups > 1 limits selection to the topk_groups best groups of
    E / num_groups consecutive experts (DeepSeek-V3). renormalize divides the K weights by their
    sum; scaling multiplies them. Ties go to the lowest expert; NaN counts as -inf; a token with
    no finite logit gets experts 0..K-1 with zero weights. See `reference.topk_gating`.
    """
    _check_arguments(logits_TE, k, score, renormalize, expert_bias, num_groups, topk_groups, scaling)
    return routed_gating(logits_TE, k, score, renormalize, expert_bias, num_groups, topk_groups, scaling, backend)


def routed_gating(logits_TE: torch.Tensor, k: int, score: str, renormalize: bool, expert_bias: Optional[torch.Tensor],
                  num_groups: int, topk_groups: int, scaling: float, backend: Optional[str]) -> Routing:
    """topk_gating without its argument checks, for a caller whose arguments are checked once for
    many calls: FinTeamMoE."""
    name = pick_backend(backend, logits_TE.device, "topk_gating")
    if name == "reference":
        return reference.topk_gating(logits_TE, k, score=score, renormalize=renormalize, expert_bias=expert_bias,
                                     num_groups=num_groups, topk_groups=topk_groups, scaling=scaling)
    if direct_call(logits_TE):
        return Routing(*kernel("topk_gating_fwd", name, topk_gating_fwd)(
            logits_TE, expert_bias, k, score, renormalize, num_groups, topk_groups, float(scaling)))
    run = _topk_gating if traced(logits_TE, expert_bias) else _topk_gating_eager
    return Routing(*run(logits_TE, expert_bias, k, score, renormalize, num_groups, topk_groups,
                        float(scaling), name))
