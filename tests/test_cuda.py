"""Both GPU backends against the reference on CUDA tensors, forward and every gradient: every
test runs once with backend="triton" (the compiled Triton kernels: the GPU suite never
interprets them) and once with backend="cuda" (the CUDA library, csrc/cuda), through the public
ops (so the custom-op wiring is tested too). Skipped without a GPU (marked `cuda`); on a GPU
machine a missing or broken CUDA extension fails.

Shape legend: T tokens, H hidden, I expert intermediate, E experts, K top-k, N = T*K routed rows;
D and O are a GEMM's input and output widths.

Ids, counts and plans must equal the reference's; float results follow the tolerance rule:
fp32 against an fp64 reference (fp32 for the routing math, which the spec runs in fp32), tight;
fp16/bf16 against the fp32 reference, at most twice plain PyTorch's own error at that precision.
"""
import pytest
import torch

from finteam_kernels import (_ext, dispatch, grouped_gemm, moe_experts, permute, reference, router_losses,
                             topk_gating, unpermute)
from finteam_kernels._backend import triton_interpreting
from routing import routed
from tolerance import assert_close

pytestmark = pytest.mark.cuda

BACKEND = "cuda"  # the backend under test: set for each test by the `backend` fixture
LOW = (torch.bfloat16, torch.float16)
FLOATS = (torch.float32, torch.bfloat16, torch.float16)
inf, nan = float("inf"), float("nan")
# Tests of the CUDA library's own compiled ops (torch.ops.finteam.*), which Triton does not have.
library_only = pytest.mark.library_only


@pytest.fixture(autouse=True, params=["triton", "cuda"])
def backend(request):
    """Runs each test on one GPU backend (the helpers read BACKEND)."""
    global BACKEND
    if request.param == "cuda":
        reason = _ext.why_missing("cuda", "moe_experts")
        assert reason is None, f"on a GPU machine the CUDA extension must load: {reason}"
    else:
        assert not triton_interpreting(), "the GPU suite runs compiled Triton kernels: unset TRITON_INTERPRET"
        if "library_only" in request.keywords:
            pytest.skip("a test of the CUDA library's own compiled op")
    BACKEND = request.param
    yield request.param
    BACKEND = "cuda"


def wide_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float32 else torch.float32


def run(fn, inputs: list, grad_for):
    """fn(*inputs) and the gradients of its floating-point inputs for the incoming gradient
    grad_for(out) (no backward when grad_for is None)."""
    leaves = [t.detach().requires_grad_() if t.is_floating_point() else t for t in inputs]
    out = fn(*leaves)
    if grad_for is None:
        return out.detach(), []
    floats = [t for t in leaves if t.is_floating_point()]
    return out.detach(), list(torch.autograd.grad(out, floats, grad_for(out)))


def check(cuda_fn, ref_fn, inputs: list, name: str, *, expand_grad: bool = False) -> None:
    """cuda_fn against ref_fn: the output, then the gradient of every floating input, for one
    random incoming gradient (in the output's dtype, so every run sees the same values), or the
    stride-0 one that `out.sum().backward()` sends (expand_grad)."""
    dtype = next(t.dtype for t in inputs if t.is_floating_point())
    probe = cuda_fn(*inputs)
    values = torch.randn(probe.shape, device="cuda").to(probe.dtype)

    def grad_for(out):
        if expand_grad:
            return torch.ones((), device="cuda", dtype=out.dtype).expand(out.shape)
        return values.to(out.dtype)

    actual = run(cuda_fn, inputs, grad_for)
    expected = run(ref_fn, [t.to(wide_dtype(dtype)) if t.is_floating_point() else t for t in inputs], grad_for)
    low = dtype in LOW
    baseline = run(ref_fn, inputs, grad_for) if low else (None, [None] * len(actual[1]))
    # Results stored in fp32 (routing-weight gradients) were computed from low-precision data.
    computed_in = dtype if low else None
    assert_close(actual[0], expected[0], baseline=baseline[0], name=f"{name}: output", computed_in=computed_in)
    for i, (a, e, b) in enumerate(zip(actual[1], expected[1], baseline[1])):
        assert_close(a, e, baseline=b, name=f"{name}: gradient of floating input {i}", computed_in=computed_in)



# ---- topk_gating ----

def check_gating(logits_TE: torch.Tensor, k: int, **options) -> None:
    T = logits_TE.shape[0]
    grad_TK = torch.randn(T, k, device="cuda")
    x_TE = logits_TE.detach().requires_grad_()
    got = topk_gating(x_TE, k, backend=BACKEND, **options)
    (got_grad,) = torch.autograd.grad(got.weights_TK, x_TE, grad_TK)
    x32_TE = logits_TE.detach().float().requires_grad_()
    want = reference.topk_gating(x32_TE, k, **options)
    (want_grad,) = torch.autograd.grad(want.weights_TK, x32_TE, grad_TK)
    base_grad = None
    if logits_TE.dtype in LOW:
        xlow = logits_TE.detach().requires_grad_()
        (base_grad,) = torch.autograd.grad(reference.topk_gating(xlow, k, **options).weights_TK, xlow, grad_TK)
    assert_close(got.ids_TK, want.ids_TK, name="ids")
    assert_close(got.tokens_per_expert_E, want.tokens_per_expert_E, name="tokens_per_expert")
    assert_close(got.weights_TK, want.weights_TK, name="weights")
    assert_close(got_grad, want_grad, baseline=base_grad, name="grad_logits")


def _gating_grid():
    # T: none; one; fewer than a block's warps; one past a power of two (a partial last block).
    # E: one; two; prime; Mixtral's 8; 64; prime past 256; 512 (the most the issue asks for).
    for T in (0, 1, 3, 257):
        for E in (1, 2, 7, 8, 64, 257, 512):
            for K in sorted({1, 2, E}):
                if K <= E:
                    yield T, E, K


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("T, E, K", list(_gating_grid()))
def test_gating_grid(T, E, K, score):
    check_gating(torch.randn(T, E, device="cuda") * 2, K, score=score)


@pytest.mark.parametrize("T, E, K, options", [
    (33, 8, 2, dict(renormalize=False)),  # probabilities as weights
    (33, 8, 3, dict(score="sigmoid", renormalize=False, scaling=0.5)),  # raw sigmoid scores, scaled
    (33, 8, 2, dict(scaling=2.5)),  # scaling after renormalising
    (33, 64, 6, dict(expert_bias="randn")),  # bias steers selection only
    (33, 64, 8, dict(score="sigmoid", expert_bias="randn", num_groups=8, topk_groups=4, scaling=2.5)),  # DeepSeek-V3
    (33, 8, 4, dict(num_groups=4, topk_groups=2)),  # K = every expert of the kept groups
    (33, 7, 3, dict(score="sigmoid", num_groups=7, topk_groups=3)),  # groups of one expert
    (33, 60, 5, dict(num_groups=5, topk_groups=2, expert_bias="randn")),  # groups of 12
    (257, 512, 8, dict(score="sigmoid", expert_bias="randn", num_groups=16, topk_groups=4)),  # large E, grouped
    (5, 4096, 4, dict(num_groups=8, topk_groups=2)),  # past 512: one warp's row of 4096 in shared memory
])
def test_gating_options(T, E, K, options):
    options = dict(options)
    if options.get("expert_bias") == "randn":
        options["expert_bias"] = 0.1 * torch.randn(E, device="cuda")
    check_gating(torch.randn(T, E, device="cuda"), K, **options)


@pytest.mark.parametrize("K", [1, 2, 4])
@pytest.mark.parametrize("options", [
    dict(score="softmax"),
    dict(score="sigmoid", num_groups=4, topk_groups=2, scaling=2.0),
    dict(score="softmax", expert_bias="masks", renormalize=False),  # a -inf bias rules experts out
])
def test_gating_nan_inf_and_ties(K, options):
    options = dict(options)
    if options.get("expert_bias") == "masks":
        options["expert_bias"] = torch.tensor([0.0, -inf, 0.0, 0.0, -inf, 0.0, 0.0, 0.0], device="cuda")
    x_TE = torch.tensor([
        [nan] * 8, [-inf] * 8, [inf] * 8,  # no finite logit: experts 0..K-1, zero weights
        [nan, 1.0, -inf, 2.0, nan, 0.5, -inf, 3.0],  # NaN and -inf lose to every finite logit
        [0.0, inf, 1.0, 2.0, inf, 3.0, -1.0, nan],  # +inf is the largest float
        [-inf, -3.4e38, nan, -inf, -inf, nan, -inf, -inf],  # one finite logit near -FLT_MAX
        [0.0] * 8, [1.0, 0.0] * 4,  # ties go to the lowest index
        [1.0, 2.0, 2.0, 1.0, 2.0, 0.0, 0.0, 0.0],
    ], device="cuda")
    check_gating(x_TE, K, **options)


@pytest.mark.parametrize("dtype", LOW)
def test_gating_low_precision_and_strides(dtype):
    check_gating((torch.randint(-2, 3, (65, 8), device="cuda") * 0.5).to(dtype), 3)  # ties everywhere
    check_gating(torch.randn(64, 257, device="cuda").to(dtype), 8, score="sigmoid")
    check_gating(torch.randn(9, 33, device="cuda").to(dtype).t(), 3, num_groups=3, topk_groups=2)  # transposed
    x_TE = torch.randn(17, 8, device="cuda", requires_grad=True)  # stride-0 incoming gradient
    topk_gating(x_TE, 2, backend=BACKEND).weights_TK.sum().backward()
    x32 = x_TE.detach().clone().requires_grad_()
    reference.topk_gating(x32, 2).weights_TK.sum().backward()
    assert_close(x_TE.grad, x32.grad)


# ---- router_losses ----

@pytest.mark.parametrize("T, E, K", [(0, 8, 2), (1, 1, 1), (3, 7, 2), (257, 64, 6), (1000, 257, 8)])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
def test_router_losses(T, E, K, dtype, ids_dtype):
    logits = (torch.randn(T, E, device="cuda") * 3).to(dtype).requires_grad_()
    ids = routed(T, K, E, dtype=ids_dtype).cuda()
    got = router_losses(logits, ids, E, backend=BACKEND)
    ga, gz = torch.randn(2).tolist()
    (got_grad,) = torch.autograd.grad(ga * got.aux_loss + gz * got.z_loss, logits)
    x32 = logits.detach().float().requires_grad_()
    want = reference.router_losses(x32, ids, E)
    (want_grad,) = torch.autograd.grad(ga * want.aux_loss + gz * want.z_loss, x32)
    assert_close(got.aux_loss, want.aux_loss, name="aux_loss")
    assert_close(got.z_loss, want.z_loss, name="z_loss")
    base = None
    if dtype in LOW:
        xlow = logits.detach().requires_grad_()
        b = reference.router_losses(xlow, ids, E)
        (base,) = torch.autograd.grad(ga * b.aux_loss + gz * b.z_loss, xlow)
    assert_close(got_grad, want_grad, baseline=base, name="grad_logits")


# ---- dispatch ----

@pytest.mark.parametrize("T, K, E, experts", [
    (0, 2, 8, None),  # no tokens: offsets all zero
    (1, 1, 1, None),  # one token, one expert
    (3, 2, 7, None),  # prime E
    (257, 8, 64, None),  # many slots per tile, fine-grained experts
    (600, 2, 8, [6]),  # every slot on one expert: one run across several tiles
    (300, 3, 512, [0, 200, 511]),  # 509 empty experts, at both ends and between
    (4096, 2, 64, None),  # the benchmark's shape: 16 tiles
])
@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
def test_dispatch(T, K, E, experts, ids_dtype):
    ids = routed(T, K, E, experts, ids_dtype).cuda()
    got, want = dispatch(ids, E, backend=BACKEND), reference.dispatch(ids, E)
    for name, a, b in zip(got._fields, got, want):
        assert_close(a, b, name=name)


def test_dispatch_random_sweep():
    # Ids with repeats across tokens in every pattern a tile can meet, checked by the invariants.
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        E = int(torch.randint(1, 40, (1,), generator=g))
        K = int(torch.randint(1, E + 1, (1,), generator=g))
        T = int(torch.randint(0, 700, (1,), generator=g))
        ids = torch.rand(T, E, generator=g).argsort(dim=1)[:, :K].cuda()
        got, want = dispatch(ids, E, backend=BACKEND), reference.dispatch(ids, E)
        for name, a, b in zip(got._fields, got, want):
            assert_close(a, b, name=f"seed {seed}: {name}")


# ---- permute and unpermute ----

def plan_for(T, K, E, experts=None):
    return reference.dispatch(routed(T, K, E, experts).cuda(), E)


def layout(T, H, dtype, kind):
    if kind == "transposed":  # column stride T: the per-element path
        return torch.randn(H, T, device="cuda", dtype=dtype).t()
    if kind == "offset":  # unit stride but misaligned by one element: the per-element path
        return torch.randn(T, H + 1, device="cuda", dtype=dtype)[:, 1:]
    return torch.randn(T, H, device="cuda", dtype=dtype)  # 16-byte vectors when H allows


ROW_SHAPES = [
    # T, K, E, H, experts
    (1, 1, 1, 1, None),  # one of everything
    (3, 2, 7, 33, None),  # odd H: never a whole vector
    (17, 4, 8, 1024, None),  # vectors, 128 or 256 of them per row
    (64, 8, 64, 40, None),  # fine-grained, H a multiple of 8 but not of 16 elements
    (50, 1, 8, 24, [6]),  # all on one expert
    (40, 2, 16, 2056, [0, 5, 15]),  # wide rows past one block of threads, empty experts
]


@pytest.mark.parametrize("kind", ["contiguous", "transposed", "offset"])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("T, K, E, H, experts", ROW_SHAPES)
def test_permute(T, K, E, H, experts, dtype, kind):
    plan = plan_for(T, K, E, experts)
    x = layout(T, H, dtype, kind)
    check(lambda x: permute(x, plan, backend=BACKEND), lambda x: reference.permute(x, plan), [x], "permute")


@pytest.mark.parametrize("kind", ["contiguous", "transposed", "offset"])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("T, K, E, H, experts", ROW_SHAPES)
def test_unpermute(T, K, E, H, experts, dtype, kind):
    plan = plan_for(T, K, E, experts)
    y = layout(T * K, H, dtype, kind)
    w = torch.rand(T, K, device="cuda")
    check(lambda y, w: unpermute(y, plan, w, backend=BACKEND), lambda y, w: reference.unpermute(y, plan, w), [y, w],
          "unpermute")
    check(lambda y, w: unpermute(y, plan, w, backend=BACKEND), lambda y, w: reference.unpermute(y, plan, w), [y, w],
          "unpermute, stride-0 gradient", expand_grad=True)


def test_zero_tokens_rows():
    plan = plan_for(0, 2, 8)
    x = torch.randn(0, 16, device="cuda", requires_grad=True)
    out = permute(x, plan, backend=BACKEND)
    assert out.shape == (0, 16)
    out.sum().backward()
    assert x.grad.shape == (0, 16)


def test_rows_past_2_31_elements():
    # A row stride past 2**31 elements: every row after the first is addressed with 64 bits.
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs 40 GB of GPU memory")
    x = torch.empty(2, 2**31 + 64, device="cuda", dtype=torch.bfloat16)[:, :64].normal_()
    plan = plan_for(2, 2, 4)
    assert torch.equal(permute(x, plan, backend=BACKEND), reference.permute(x, plan))
    y = torch.empty(4, 2**31 + 64, device="cuda", dtype=torch.bfloat16)[:, :64].normal_()
    w = torch.rand(2, 2, device="cuda")
    assert_close(unpermute(y, plan, w, backend=BACKEND), reference.unpermute(y.float(), plan, w),
                 baseline=reference.unpermute(y, plan, w), name="unpermute past 2**31 elements")


# ---- grouped_gemm ----

def offsets_from(counts: list[int]) -> torch.Tensor:
    return torch.tensor([0] + counts, device="cuda").cumsum(0)


GEMM_CASES = [
    # counts per expert, D, O
    ([5], 8, 8),  # one expert, less than a tile
    ([0, 3, 0, 130, 0], 33, 17),  # empty experts around a group past one 128-row tile; odd D and O
    ([129, 1, 64], 64, 136),  # group sizes around tile edges; O past one 128-column tile
    ([0, 0, 0], 16, 24),  # no rows at all: every weight gradient exactly zero
    ([300, 0, 7, 1], 96, 40),  # vectors on both operands, several K steps
    ([1] * 9, 24, 8),  # one row per expert (decode)
    ([257], 1, 3),  # D = 1: a single K step, mostly padding
]


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("counts, D, O", GEMM_CASES)
def test_grouped_gemm(counts, D, O, dtype):
    offsets = offsets_from(counts)
    N, E = sum(counts), len(counts)
    x = torch.randn(N, D, device="cuda").to(dtype)
    w = (torch.randn(E, O, D, device="cuda") / D**0.5).to(dtype)
    check(lambda x, w: grouped_gemm(x, w, offsets, backend=BACKEND),
          lambda x, w: reference.grouped_gemm(x, w, offsets), [x, w], "grouped_gemm")
    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_()
    grouped_gemm(x, w, offsets, backend=BACKEND).sum().backward()
    for e, n in enumerate(counts):
        if n == 0:
            assert torch.equal(w.grad[e], torch.zeros_like(w.grad[e])), f"expert {e} is empty: dW must be exact zeros"


@library_only
def test_grouped_gemm_rows_past_offsets_are_zero():
    # Rows after offsets[E] belong to no expert: the compiled op writes them as zeros.
    x = torch.randn(10, 16, device="cuda")
    w = torch.randn(2, 8, 16, device="cuda")
    y = torch.ops.finteam.grouped_gemm_fwd(x, w, offsets_from([3, 4]))
    assert torch.equal(y[7:], torch.zeros(3, 8, device="cuda"))
    assert_close(y[:7], reference.grouped_gemm(x[:7].double(), w.double(), offsets_from([3, 4])))


def test_grouped_gemm_past_2_31_elements():
    # x_ND past 2**31 elements: the last rows are addressed with 64 bits. Checked on a few rows.
    N, D, O = 2**31 // 4096 + 40, 4096, 16
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs 24 GB of GPU memory")
    x = torch.randn(N, D, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(2, O, D, device="cuda", dtype=torch.bfloat16)
    offsets = offsets_from([N // 2, N - N // 2])
    y = grouped_gemm(x, w, offsets, backend=BACKEND)
    rows = torch.tensor([0, N // 2 - 1, N // 2, N - 2, N - 1], device="cuda")
    expert = (rows >= N // 2).long()
    want = torch.einsum("rd,rod->ro", x[rows].float(), w[expert].float())
    assert_close(y[rows].float(), want, baseline=torch.einsum("rd,rod->ro", x[rows], w[expert]).float(),
                 name="rows past 2**31 elements", computed_in=torch.bfloat16)


# ---- moe_experts ----

MOE_CASES = [
    # T, K, E, H, I, experts
    (0, 2, 8, 16, 8, None),  # no tokens
    (1, 1, 1, 8, 8, None),  # one token, one expert
    (3, 2, 7, 33, 17, None),  # prime E, odd H and I: per-element loads everywhere
    (64, 2, 8, 64, 96, [1, 6]),  # six empty experts
    (257, 4, 16, 128, 72, None),  # several tiles per expert
    (40, 4, 4, 64, 32, None),  # K = E: every token on every expert
    (300, 8, 257, 64, 40, None),  # E past 256: most experts get a few rows, some none
]


@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("T, K, E, H, I, experts", MOE_CASES)
def test_moe_experts(T, K, E, H, I, experts, dtype, activation):
    ids = routed(T, K, E, experts, torch.int64).cuda()  # transformers passes int64 ids
    x = torch.randn(T, H, device="cuda").to(dtype)
    w = torch.rand(T, K, device="cuda")
    gate_up = (torch.randn(E, 2 * I, H, device="cuda") / H**0.5).to(dtype)
    down = (torch.randn(E, H, I, device="cuda") / I**0.5).to(dtype)
    check(lambda x, w, gu, d: moe_experts(x, ids, w, gu, d, activation, backend=BACKEND),
          lambda x, w, gu, d: reference.moe_experts(x, ids, w, gu, d, activation), [x, w, gate_up, down],
          f"moe_experts[{activation}]")


@library_only
def test_moe_experts_needs_grad_false_keeps_no_h():
    x = torch.randn(5, 16, device="cuda")
    ids = routed(5, 2, 4).cuda()
    out, h, offsets, *_ = torch.ops.finteam.moe_experts_fwd(x, ids, torch.rand(5, 2, device="cuda"),
                                                            torch.randn(4, 24, 16, device="cuda"),
                                                            torch.randn(4, 16, 12, device="cuda"), "silu", False)
    assert out.shape == (5, 16) and h.shape == (0, 24) and offsets.shape == (5,)


def test_moe_experts_is_deterministic_and_graph_capturable():
    # No atomics in the combine or the reductions: bit-identical on every run. No host sync: the
    # forward and backward replay from a CUDA graph and agree with the eager run.
    T, K, E, H, I = 129, 2, 8, 64, 48
    ids = routed(T, K, E).cuda()
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.rand(T, K, device="cuda", requires_grad=True)
    gate_up = torch.randn(E, 2 * I, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    down = torch.randn(E, H, I, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    leaves = [x, w, gate_up, down]

    def step():
        out = moe_experts(x, ids, w, gate_up, down, backend=BACKEND)
        return [out.detach()] + list(torch.autograd.grad(out.float().square().sum(), leaves))

    first, second = step(), step()
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up outside the graph, as capture requires
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(first, captured))
