"""unpermute: forward and both gradients against autograd through the reference (fp32 tight,
fp16/bf16 by the tolerance rule), weights in each float dtype, strided inputs, stride-0
gradients, zero tokens, determinism, the custom ops, dispatch -> permute -> unpermute under
torch.compile(fullgraph=True), and the argument errors."""
import pytest
import torch
from backends import kernel_backends
from routing import routed
from tolerance import assert_close

from finteam_kernels import dispatch, permute, reference, unpermute

BACKENDS = kernel_backends()
LOW = (torch.bfloat16, torch.float16)



SHAPES = {
    # T, K, E, H, allowed experts
    "single": (1, 1, 1, 1, None),  # one token, one expert, one column
    "odd": (3, 2, 7, 33, None),  # prime E, odd H
    "wide": (5, 4, 8, 1030, None),  # H just past a 1024-column block, and the weight-gradient dot spans two
    "fine": (24, 8, 64, 40, None),  # fine-grained MoE: K=8 of 64, many experts empty
    "k_equals_e": (9, 5, 5, 12, None),  # every token on every expert
    "one_expert": (50, 1, 8, 24, [6]),  # all tokens on expert 6: one run, seven empty experts
    "empty_experts": (40, 2, 16, 20, [0, 5, 15]),  # three of 16 experts used, at both ends and between
}


def unpermute_and_grads(y, plan, w, grad, backend):
    y, w = y.detach().requires_grad_(), w.detach().requires_grad_()
    out = unpermute(y, plan, w, backend=backend)
    grad_y, grad_w = torch.autograd.grad(out, (y, w), grad)
    return out.detach(), grad_y, grad_w


def check_against_reference(y, plan, w, backend, name):
    """Output and both gradients against the fp32 reference (and, where y or w is fp16/bf16,
    against plain PyTorch's own error at that precision). Returns the largest relative errors."""
    grad = torch.randn(w.shape[0], y.shape[1], dtype=y.dtype)
    actual = unpermute_and_grads(y, plan, w, grad, backend)
    expected = unpermute_and_grads(y.float(), plan, w.float(), grad.float(), "reference")
    low = y.dtype in LOW or w.dtype in LOW
    baseline = unpermute_and_grads(y, plan, w, grad, "reference") if low else (None,) * 3
    return [assert_close(a, e, baseline=b, name=f"{name}: {what}")
            for what, a, e, b in zip(("out_TH", "grad_y_NH", "grad_weights_TK"), actual, expected, baseline)]


def case(shape, y_dtype, w_dtype):
    T, K, E, H, experts = SHAPES[shape]
    plan = dispatch(routed(T, K, E, experts), E, backend="reference")
    return torch.randn(T * K, H, dtype=y_dtype), plan, torch.rand(T, K).to(w_dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_unpermute_matches_reference(backend, dtype, shape):
    y, plan, w = case(shape, dtype, torch.float32)
    check_against_reference(y, plan, w, backend, shape)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("y_dtype,w_dtype", [
    (torch.bfloat16, torch.bfloat16),  # transformers' bf16 routing weights
    (torch.float16, torch.float16),
    (torch.float32, torch.bfloat16),  # low-precision weights with fp32 activations
    (torch.bfloat16, torch.float16),  # mixed: the weights' dtype is not y's
])
def test_unpermute_weight_dtypes(backend, y_dtype, w_dtype):
    y, plan, w = case("odd", y_dtype, w_dtype)
    out, grad_y, grad_w = unpermute_and_grads(y, plan, w, torch.randn(w.shape[0], y.shape[1], dtype=y_dtype), backend)
    assert (out.dtype, grad_y.dtype, grad_w.dtype) == (y_dtype, y_dtype, w_dtype)
    check_against_reference(y, plan, w, backend, f"y {y_dtype}, w {w_dtype}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_unpermute_float64_sums_in_float64(backend):
    """fp64 data (gradcheck's precision) is summed in fp64, not rounded through fp32."""
    y, plan, w = case("wide", torch.float64, torch.float64)
    grad = torch.randn(w.shape[0], y.shape[1], dtype=torch.float64)
    actual = unpermute_and_grads(y, plan, w, grad, backend)
    expected = unpermute_and_grads(y, plan, w, grad, "reference")
    for what, a, e in zip(("out_TH", "grad_y_NH", "grad_weights_TK"), actual, expected):
        assert_close(a, e, name=what)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unpermute_strided_inputs(backend):
    T, K, E, H = 13, 3, 6, 37
    plan = dispatch(routed(T, K, E), E, backend="reference")
    for dtype in (torch.float32, torch.bfloat16):
        y_transposed = torch.randn(H, T * K, dtype=dtype).t()  # column stride N
        y_every_other = torch.randn(T * K, 2 * H, dtype=dtype)[:, ::2]  # column stride 2
        w_transposed = torch.rand(K, T).t()  # weights [T, K] with strides (1, T)
        w_every_other = torch.rand(T, 2 * K)[:, 1::2]  # weights with strides (2K, 2), offset 1
        check_against_reference(y_transposed, plan, w_every_other, backend, f"{dtype} transposed y")
        check_against_reference(y_every_other, plan, w_transposed, backend, f"{dtype} strided y")


@pytest.mark.parametrize("backend", BACKENDS)
def test_unpermute_stride0_gradient(backend):
    """`out.sum().backward()` hands the backward a broadcast gradient (stride 0 in both dims)."""
    y, plan, w = case("odd", torch.float32, torch.float32)
    T, H = w.shape[0], y.shape[1]
    for incoming in ("sum", "broadcast"):
        y_, w_ = y.clone().requires_grad_(), w.clone().requires_grad_()
        y_ref, w_ref = y.clone().requires_grad_(), w.clone().requires_grad_()
        if incoming == "sum":
            unpermute(y_, plan, w_, backend=backend).sum().backward()
            reference.unpermute(y_ref, plan, w_ref).sum().backward()
        else:
            grad = torch.randn(1, H).expand(T, H)
            assert grad.stride() == (0, 1)
            unpermute(y_, plan, w_, backend=backend).backward(grad)
            reference.unpermute(y_ref, plan, w_ref).backward(grad)
        assert_close(y_.grad, y_ref.grad, name=f"{incoming}: grad_y_NH")
        assert_close(w_.grad, w_ref.grad, name=f"{incoming}: grad_weights_TK")


@pytest.mark.parametrize("backend", BACKENDS)
def test_unpermute_zero_tokens(backend):
    plan = dispatch(torch.zeros((0, 2), dtype=torch.int32), 4, backend="reference")
    y = torch.randn(0, 8, dtype=torch.bfloat16, requires_grad=True)
    w = torch.rand(0, 2, requires_grad=True)
    out = unpermute(y, plan, w, backend=backend)
    assert out.shape == (0, 8) and out.dtype == torch.bfloat16 and out.grad_fn is not None
    out.sum().backward()
    assert y.grad.shape == (0, 8) and w.grad.shape == (0, 2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])  # fp32: no rounding to bf16 hides another order
def test_unpermute_is_bitwise_deterministic(backend, dtype):
    y, plan, w = case("fine", dtype, torch.float32)
    grad = torch.randn(w.shape[0], y.shape[1], dtype=dtype)
    first, second = unpermute_and_grads(y, plan, w, grad, backend), unpermute_and_grads(y, plan, w, grad, backend)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_unpermute_opcheck():
    if "triton" not in BACKENDS:
        pytest.skip("triton is not installed")
    y, plan, w = case("odd", torch.float32, torch.float32)
    y.requires_grad_(), w.requires_grad_()
    torch.library.opcheck(torch.ops.finteam.unpermute.default,
                          (y, plan.row_to_slot_N, plan.slot_to_row_N, w, False, "triton"))
    grad = torch.randn(w.shape[0], y.shape[1])
    torch.library.opcheck(torch.ops.finteam.unpermute_backward.default,
                          (grad, y.detach(), plan.row_to_slot_N, plan.slot_to_row_N, w.detach(), "triton"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_dispatch_permute_unpermute_compile_fullgraph(backend):
    """The three ops in one compiled graph (fake implementations, the backward wiring), forward
    and backward equal to eager reference autograd."""
    T, K, E, H = 10, 2, 5, 16

    def moe_rows(x, ids, w, scale, backend):
        plan = dispatch(ids, E, backend=backend)
        return unpermute(permute(x, plan, backend=backend) * scale, plan, w, backend=backend)

    ids = routed(T, K, E)
    x, w, scale = torch.randn(T, H), torch.rand(T, K), torch.randn(T * K, 1)
    grad = torch.randn(T, H)
    results = []
    for run, name in ((torch.compile(moe_rows, fullgraph=True, backend="aot_eager"), backend),
                      (moe_rows, "reference")):
        x_, w_, scale_ = (t.clone().requires_grad_() for t in (x, w, scale))
        out = run(x_, ids, w_, scale_, name)
        results.append((out.detach(), *torch.autograd.grad(out, (x_, w_, scale_), grad)))
    for what, a, e in zip(("out", "grad_x", "grad_w", "grad_scale"), *results):
        assert_close(a, e, name=what)


def test_unpermute_errors():
    y, plan, w = case("odd", torch.float32, torch.float32)  # T=3, K=2, N=6, H=33
    with pytest.raises(ValueError, match=r"unpermute: y_NH must be a 2-D tensor \[N, H\]; got a 1-D"):
        unpermute(y.reshape(-1), plan, w)
    with pytest.raises(TypeError, match=r"unpermute: topk_weights_TK must be float32 or .*; got .*int64"):
        unpermute(y, plan, w.long())
    with pytest.raises(ValueError, match=r"unpermute: topk_weights_TK must be a 2-D tensor \[T, K\]; got a 1-D"):
        unpermute(y, plan, w.reshape(-1))
    with pytest.raises(ValueError, match=r"unpermute: y_NH must have size 6 in dimension 0 \(N, the plan's routed rows\); got shape \(5, 33\)"):
        unpermute(y[:5], plan, w)
    with pytest.raises(ValueError, match=r"unpermute: the plan's 6 rows are not K per token for 4 tokens"):
        unpermute(y, plan, torch.rand(4, 2))
    with pytest.raises(ValueError, match=r"unpermute: topk_weights_TK must have size 2 in dimension 1 \(K, from the plan's rows per token\); got shape \(3, 1\)"):
        unpermute(y, plan, torch.rand(3, 1))
    with pytest.raises(ValueError, match=r"unpermute: topk_weights_TK is on meta but y_NH is on cpu"):
        unpermute(y, plan, w.to("meta"))
    with pytest.raises(ValueError, match=r"unpermute: plan.row_to_slot_N is on cpu but y_NH is on meta"):
        unpermute(y.to("meta"), plan, w.to("meta"))


@pytest.mark.cuda
def test_rows_ops_never_synchronise_and_capture_in_a_cuda_graph():
    """On a GPU: dispatch -> permute -> unpermute, forward and backward, runs with no host
    synchronisation (sync debug mode "error"), and the forward replays from a CUDA graph."""
    T, K, E, H = 512, 4, 16, 256
    device = torch.device("cuda")
    ids = routed(T, K, E).to(device)
    x = torch.randn(T, H, device=device, dtype=torch.bfloat16, requires_grad=True)
    w = torch.rand(T, K, device=device, requires_grad=True)
    grad = torch.randn(T, H, device=device, dtype=torch.bfloat16)

    def forward():
        plan = dispatch(ids, E, backend="triton")
        return unpermute(permute(x, plan, backend="triton"), plan, w, backend="triton")

    def forward_backward():
        out = forward()
        return (out.detach(), *torch.autograd.grad(out, (x, w), grad))

    expected = forward_backward()  # also compiles every kernel
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        again = forward_backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.equal(a, e) for a, e in zip(again, expected))
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        captured = forward()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, expected[0])
