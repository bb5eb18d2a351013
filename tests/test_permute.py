"""permute: forward and gradient against autograd through the reference (fp32 tight, fp16/bf16 by
the tolerance rule), strided inputs, stride-0 gradients, zero tokens, determinism, the custom
ops, and the argument errors."""
import pytest
import torch
from backends import kernel_backends
from routing import routed
from tolerance import assert_close

from finteam_kernels import dispatch, permute, reference

BACKENDS = kernel_backends()
LOW = (torch.bfloat16, torch.float16)



SHAPES = {
    # T, K, E, H, allowed experts
    "single": (1, 1, 1, 1, None),  # one token, one expert, one column
    "odd": (3, 2, 7, 33, None),  # prime E, odd H
    "wide": (5, 4, 8, 1030, None),  # H just past a 1024-column block: a second, nearly empty one
    "fine": (24, 8, 64, 40, None),  # fine-grained MoE: K=8 of 64, many experts empty
    "k_equals_e": (9, 5, 5, 12, None),  # every token on every expert
    "one_expert": (50, 1, 8, 24, [6]),  # all tokens on expert 6: one run, seven empty experts
    "empty_experts": (40, 2, 16, 20, [0, 5, 15]),  # three of 16 experts used, at both ends and between
}
LAYOUTS = {
    "contiguous": lambda T, H, dtype: torch.randn(T, H, dtype=dtype),
    "transposed": lambda T, H, dtype: torch.randn(H, T, dtype=dtype).t(),  # column stride T
    "every_other_column": lambda T, H, dtype: torch.randn(T, 2 * H, dtype=dtype)[:, ::2],  # column stride 2
}


def permute_and_grad(x, plan, grad, backend):
    x = x.detach().requires_grad_()
    out = permute(x, plan, backend=backend)
    (grad_x,) = torch.autograd.grad(out, x, grad)
    return out.detach(), grad_x


def check_against_reference(x, plan, backend, name):
    """The kernel's output and gradient against the fp32 reference (and, in fp16/bf16, against
    plain PyTorch's own error at that precision). Returns the largest relative errors."""
    grad = torch.randn(plan.row_to_slot_N.shape[0], x.shape[1], dtype=x.dtype)
    actual = permute_and_grad(x, plan, grad, backend)
    expected = permute_and_grad(x.float(), plan, grad.float(), "reference")
    baseline = permute_and_grad(x, plan, grad, "reference") if x.dtype in LOW else (None, None)
    return [assert_close(a, e, baseline=b, name=f"{name}: {what}")
            for what, a, e, b in zip(("x_NH", "grad_x_TH"), actual, expected, baseline)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_permute_matches_reference(backend, dtype, shape):
    T, K, E, H, experts = SHAPES[shape]
    plan = dispatch(routed(T, K, E, experts), E, backend="reference")
    check_against_reference(torch.randn(T, H, dtype=dtype), plan, backend, shape)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", [k for k in LAYOUTS if k != "contiguous"])
def test_permute_strided_input(backend, layout):
    T, K, E, H = 13, 3, 6, 37
    plan = dispatch(routed(T, K, E), E, backend="reference")
    for dtype in (torch.float32, torch.bfloat16):
        check_against_reference(LAYOUTS[layout](T, H, dtype), plan, backend, layout)


@pytest.mark.parametrize("backend", BACKENDS)
def test_permute_stride0_gradient(backend):
    """`out.sum().backward()` hands the backward a broadcast gradient (stride 0 in both dims)."""
    T, K, E, H = 11, 3, 5, 9
    plan = dispatch(routed(T, K, E), E, backend="reference")
    x = torch.randn(T, H, requires_grad=True)
    permute(x, plan, backend=backend).sum().backward()
    assert torch.equal(x.grad, torch.full((T, H), float(K)))
    x.grad = None
    grad = torch.tensor([[2.5]]).expand(T * K, H)
    assert grad.stride() == (0, 0)
    permute(x, plan, backend=backend).backward(grad)
    assert torch.equal(x.grad, torch.full((T, H), 2.5 * K))


@pytest.mark.parametrize("backend", BACKENDS)
def test_permute_zero_tokens(backend):
    plan = dispatch(torch.zeros((0, 2), dtype=torch.int32), 4, backend="reference")
    x = torch.randn(0, 8, requires_grad=True)
    out = permute(x, plan, backend=backend)
    assert out.shape == (0, 8) and out.grad_fn is not None
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == (0, 8)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])  # fp32: no rounding to bf16 hides another order
def test_permute_is_bitwise_deterministic(backend, dtype):
    T, K, E, H = 20, 4, 8, 70
    plan = dispatch(routed(T, K, E), E, backend="reference")
    x, grad = torch.randn(T, H, dtype=dtype), torch.randn(T * K, H, dtype=dtype)
    first, second = permute_and_grad(x, plan, grad, backend), permute_and_grad(x, plan, grad, backend)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_permute_opcheck():
    if "triton" not in BACKENDS:
        pytest.skip("triton is not installed")
    T, K, E, H = 5, 2, 3, 6
    plan = dispatch(routed(T, K, E), E, backend="reference")
    x = torch.randn(T, H, requires_grad=True)
    torch.library.opcheck(torch.ops.finteam.permute.default,
                          (x, plan.row_to_slot_N, plan.slot_to_row_N, K, False, "triton"))
    torch.library.opcheck(torch.ops.finteam.permute_backward.default,
                          (torch.randn(T * K, H), plan.slot_to_row_N, K, "triton"))


def test_permute_errors():
    T, K, E, H = 4, 2, 3, 5
    plan = dispatch(routed(T, K, E), E, backend="reference")
    x = torch.randn(T, H)
    with pytest.raises(ValueError, match=r"permute: x_TH must be a 2-D tensor \[T, H\]; got a 1-D float32"):
        permute(x.reshape(-1), plan)
    with pytest.raises(TypeError, match=r"permute: x_TH must be float32 or float16 or bfloat16 or float64; got .*int64"):
        permute(x.long(), plan)
    with pytest.raises(ValueError, match=r"permute: the plan's 8 rows are not K per token for 3 tokens"):
        permute(x[:3], plan)
    with pytest.raises(ValueError, match=r"permute: the plan routes 8 rows but there are no tokens"):
        permute(x[:0], plan)
    with pytest.raises(TypeError, match=r"permute: plan.row_to_slot_N must be int32 or int64; got .*float32"):
        permute(x, plan._replace(row_to_slot_N=plan.row_to_slot_N.float()))
    with pytest.raises(ValueError, match=r"permute: plan.slot_to_row_N must have size 8 in dimension 0"):
        permute(x, plan._replace(slot_to_row_N=plan.slot_to_row_N[:7]))
    with pytest.raises(ValueError, match=r"permute: plan.row_to_slot_N is on cpu but x_TH is on meta"):
        permute(x.to("meta"), plan)
    with pytest.raises(ValueError, match=r"permute: backend must be one of .* got 'fast'"):
        permute(x, plan, backend="fast")


@pytest.mark.parametrize("backend", BACKENDS)
def test_plans_made_under_inference_mode(backend):
    """Inference tensors have no version counter, so a plan `dispatch` makes under
    torch.inference_mode cannot prove it is unwritten: it is a plain plan, validated where it is
    used, and a row index written into it out of range is an error, not an out-of-bounds read."""
    T, K, E, H = 6, 2, 4, 8
    with torch.inference_mode():
        ids = routed(T, K, E)
        x = torch.randn(T, H)
        plan = dispatch(ids, E, backend=backend)
        assert torch.equal(permute(x, plan, backend=backend), reference.permute(x, reference.dispatch(ids, E)))
        plan.row_to_slot_N[0] = T * K  # one past the last slot
        with pytest.raises(ValueError, match=r"permute: plan\.row_to_slot_N"):
            permute(x, plan, backend=backend)
