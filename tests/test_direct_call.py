"""Without autograd, the public ops run their kernels directly, skipping the torch.library custom
op (`_backend.direct_call`). Both ways must give the same bits."""
import pytest
import torch
from backends import kernel_backends
from routing import routed

import finteam_kernels as fk

BACKENDS = kernel_backends()


def both_ways(fn, *tensors):
    """fn's outputs with autograd off (direct kernel call) and on (through the custom op)."""
    with torch.no_grad():
        direct = fn(*tensors)
    through_op = fn(*[t.detach().requires_grad_(t.is_floating_point()) for t in tensors])
    return direct, through_op


def assert_same(direct, through_op):
    direct = direct if isinstance(direct, tuple) else (direct,)
    through_op = through_op if isinstance(through_op, tuple) else (through_op,)
    for a, b in zip(direct, through_op):
        assert torch.equal(a, b.detach())


@pytest.mark.parametrize("backend", BACKENDS)
def test_direct_and_custom_op_calls_agree(backend):
    T, E, K, H, I = 9, 5, 2, 16, 12  # a few tokens, prime E
    logits_TE, x_TH = torch.randn(T, E), torch.randn(T, H)
    w_gate_up_E2IH, w_down_EHI = torch.randn(E, 2 * I, H), torch.randn(E, H, I)
    ids_TK = routed(T, K, E)
    weights_TK = torch.rand(T, K)
    plan = fk.dispatch(ids_TK, E, backend=backend)

    assert_same(*both_ways(lambda l: fk.topk_gating(l, K, backend=backend), logits_TE))
    assert_same(*both_ways(lambda l: fk.router_losses(l, ids_TK, E, backend=backend), logits_TE))
    assert_same(*both_ways(lambda x: fk.permute(x, plan, backend=backend), x_TH))
    x_NH = fk.permute(x_TH, plan, backend=backend)
    assert_same(*both_ways(lambda y, w: fk.unpermute(y, plan, w, backend=backend), x_NH, weights_TK))
    assert_same(*both_ways(lambda x, w: fk.grouped_gemm(x, w, plan.expert_offsets_E1, backend=backend),
                           x_NH, w_gate_up_E2IH))
    assert_same(*both_ways(lambda x, w, a, b: fk.moe_experts(x, ids_TK, w, a, b, backend=backend),
                           x_TH, weights_TK, w_gate_up_E2IH, w_down_EHI))
