"""moe_experts: forward and every gradient (x, routing weights, w_gate_up, w_down) against
autograd through the reference (fp32 tight, fp16/bf16 by the tolerance rule) for each activation,
on shapes chosen to break it; what transformers passes (int64 ids, bf16 routing weights);
strided inputs and weights, stride-0 gradients, zero tokens, what the backward keeps, determinism;
the reference itself against transformers' Mixtral experts and gradcheck; the custom ops,
torch.compile(fullgraph=True), and the argument errors."""
from functools import partial

import pytest
import torch
from backends import kernel_backends
from test_addressing_64bit import far_rows
from routing import routed
from tolerance import assert_close

from finteam_kernels import moe_experts, reference
from finteam_kernels._backend import kernel
from finteam_kernels.ops.moe_experts import moe_experts_bwd, moe_experts_fwd

BACKENDS = kernel_backends()
LOW = (torch.bfloat16, torch.float16)
GRADS = ("grad_x_TH", "grad_weights_TK", "grad_w_gate_up_E2IH", "grad_w_down_EHI")



SHAPES = {
    # T, E, K, H, I, allowed experts
    "single": (1, 1, 1, 5, 3, None),  # one token on one expert, H and I far below a block
    "odd": (33, 7, 2, 33, 17, None),  # prime E, odd H and I
    "k_equals_e": (3, 8, 8, 20, 9, None),  # every token on every expert
    "pair": (3, 2, 2, 12, 6, None),  # E=2 with K=E: both experts get every token
    "tiny": (3, 2, 1, 8, 4, None),  # the smallest routed case, for the checks that run the op many times
    "many_tokens": (257, 8, 2, 24, 16, None),  # T just past 256: several row tiles per expert
    "one_expert": (40, 7, 1, 16, 8, [3]),  # every token on expert 3, six empty experts
    "fine": (3, 64, 2, 16, 8, None),  # 64 experts for 6 rows: nearly all empty
    "many_experts": (90, 257, 3, 12, 10, None),  # E one past 256 (DeepSeek-V3's), odd K: ids past 255
    "no_tokens": (0, 4, 2, 16, 8, None),  # zero tokens: empty output, zero weight gradients
}


def case(shape, dtype=torch.float32, weights_dtype=torch.float32, ids_dtype=torch.int32):
    T, E, K, H, I, experts = SHAPES[shape]
    ids = routed(T, K, E, experts).to(ids_dtype)
    weights = torch.rand(T, K).to(weights_dtype)
    w_gate_up = (torch.randn(E, 2 * I, H) / H**0.5).to(dtype)
    w_down = (torch.randn(E, H, I) / I**0.5).to(dtype)
    return torch.randn(T, H, dtype=dtype), ids, weights, w_gate_up, w_down


def experts_and_grads(x, ids, weights, w_gate_up, w_down, grad, activation, backend):
    leaves = [t.detach().requires_grad_() for t in (x, weights, w_gate_up, w_down)]
    out = moe_experts(leaves[0], ids, leaves[1], leaves[2], leaves[3], activation, backend=backend)
    return (out.detach(), *torch.autograd.grad(out, leaves, grad))


def check_against_reference(x, ids, weights, w_gate_up, w_down, activation, backend, name, grad=None):
    """Output and the four gradients against the fp32 reference (and, in fp16/bf16, against
    plain PyTorch's own error at that precision). Returns the results and the largest relative
    errors."""
    grad = torch.randn(x.shape, dtype=x.dtype) if grad is None else grad
    args = (x, ids, weights, w_gate_up, w_down)
    actual = experts_and_grads(*args, grad, activation, backend)
    wide = [t if t is ids else t.float() for t in args]
    expected = experts_and_grads(*wide, grad.float(), activation, "reference")
    low = x.dtype in LOW or weights.dtype in LOW
    baseline = experts_and_grads(*args, grad, activation, "reference") if low else (None,) * 5
    errors = []
    for what, a, e, b in zip(("out_TH", *GRADS), actual, expected, baseline):
        # the routing weights' gradient is computed in x's precision, whatever the weights' dtype
        computed_in = x.dtype if what == "grad_weights_TK" and x.dtype in LOW else None
        errors.append(assert_close(a, e, baseline=b, name=f"{name}: {what}", computed_in=computed_in))
    return actual, errors


def dtype_name(dtype):
    return str(dtype).removeprefix("torch.")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,dtype,activation", [
    pytest.param(shape, dtype, activation, id=f"{shape}-{dtype_name(dtype)}-{activation}")
    for shape, dtype, activation in [
        *[(shape, torch.float32, "silu") for shape in SHAPES if shape != "tiny"],
        *[(shape, torch.bfloat16, "silu") for shape in ("odd", "k_equals_e", "many_tokens", "one_expert")],
        ("odd", torch.float16, "silu"),
        *[("odd", dtype, act) for dtype in (torch.float32, torch.bfloat16) for act in ("gelu", "gelu_tanh")],
    ]
])
def test_moe_experts_matches_reference(backend, shape, dtype, activation):
    x, ids, weights, w_gate_up, w_down = case(shape, dtype)
    if shape == "many_experts":
        assert ids.max() == 256, "the shape is meant to route a row to expert 256"
    actual, _ = check_against_reference(x, ids, weights, w_gate_up, w_down, activation, backend,
                                        f"{shape} {dtype_name(dtype)} {activation}")
    out, grad_x, grad_weights, grad_w_gate_up, grad_w_down = actual
    assert (out.dtype, grad_x.dtype, grad_weights.dtype) == (dtype, dtype, torch.float32)
    used = ids.long().unique()
    empty = [e for e in range(w_gate_up.shape[0]) if e not in used]
    if shape in ("one_expert", "fine", "no_tokens", "many_experts"):
        assert empty, "the shape is meant to leave experts empty"
        for what, g in (("grad_w_gate_up_E2IH", grad_w_gate_up), ("grad_w_down_EHI", grad_w_down)):
            assert torch.equal(g[empty], torch.zeros_like(g[empty])), f"{what}: empty experts not exactly zero"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,weights_dtype", [
    pytest.param(torch.bfloat16, torch.bfloat16, id="bf16"),  # transformers: bf16 model and routing weights, int64 ids
    pytest.param(torch.float32, torch.bfloat16, id="fp32-bf16_weights"),  # low-precision weights, fp32 activations
    pytest.param(torch.float16, torch.float16, id="fp16"),
])
def test_moe_experts_transformers_dtypes(backend, dtype, weights_dtype):
    x, ids, weights, w_gate_up, w_down = case("odd", dtype, weights_dtype, ids_dtype=torch.int64)
    actual, _ = check_against_reference(x, ids, weights, w_gate_up, w_down, "silu", backend,
                                        f"x {dtype_name(dtype)}, weights {dtype_name(weights_dtype)}")
    assert [t.dtype for t in actual] == [dtype, dtype, weights_dtype, dtype, dtype]


@pytest.mark.parametrize("backend", BACKENDS)
def test_moe_experts_strided_inputs(backend):
    T, E, K, H, I = 11, 5, 2, 18, 7
    x = torch.randn(H, T).t()  # x stored column-major
    ids = routed(T, K, E).t().contiguous().t()  # ids [T, K] with strides (1, T)
    weights = torch.rand(T, 2 * K)[:, 1::2]  # strides (2K, 2), offset 1
    w_gate_up = (torch.randn(E, H, 2 * I) / H**0.5).transpose(1, 2)  # each expert stored [H, 2I]
    w_down = (torch.randn(2 * E, H, I + 2) / I**0.5)[::2, :, 1:-1]  # every other expert, inner columns
    assert not any(t.is_contiguous() for t in (x, ids, weights, w_gate_up, w_down))
    check_against_reference(x, ids, weights, w_gate_up, w_down, "silu", backend, "strided")
    grad_transposed = torch.randn(H, T).t()
    check_against_reference(x, ids, weights, w_gate_up, w_down, "gelu", backend, "strided grad", grad=grad_transposed)


def routed_counts(counts, K):
    """ids [T, K] giving expert e exactly counts[e] rows (each at most T, so no token meets an
    expert twice): slot j of token t takes entry j*T + t of the experts listed in order."""
    labels = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    return labels.reshape(K, -1).t().contiguous().to(torch.int32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_name)
def test_moe_experts_few_rows(backend, dtype):
    """The cpu backward's row mixes (experts with at most 16 rows) and its fp32 forward's small-row
    GEMM (at most 32 rows) against the reference: 1 row, an empty expert between busy ones, 16
    and 17 rows (either side of the backward's switch to ATen), 33 (past the forward's);
    H=131 ends in a partial 64-column chunk and a partial task of 128 columns, 2I=134 splits
    dW_gate_up into tasks of 64, 64 and 6 rows; odd I; w_down non-contiguous (every other expert)."""
    counts, K, H, I = [1, 0, 16, 17, 5, 0, 3, 33, 1, 2], 2, 131, 67
    ids = routed_counts(counts, K)
    T, E = ids.shape[0], len(counts)
    weights = torch.rand(T, K)
    w_gate_up = (torch.randn(E, 2 * I, H) / H**0.5).to(dtype)
    w_down = (torch.randn(2 * E, H, I) / I**0.5).to(dtype)[::2]
    x = torch.randn(T, H, dtype=dtype)
    actual, _ = check_against_reference(x, ids, weights, w_gate_up, w_down, "silu", backend,
                                        f"few rows {dtype_name(dtype)}")
    empty = [e for e, c in enumerate(counts) if c == 0]
    for what, g in zip(GRADS[2:], actual[3:]):
        assert torch.equal(g[empty], torch.zeros_like(g[empty])), f"{what}: empty experts not exactly zero"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh"])
def test_moe_experts_fp32_inference_many_rows(backend, activation):
    """fp32 without grad, experts past the small-row GEMM (32 rows): on an AVX-512 or AVX2 CPU the
    cpu backend's tiled forward (tile_f32.h), elsewhere ATen's GEMMs. Row counts either side of a
    tile (64) and of a register block (32 columns), an empty expert, one streamed; H=131 leaves
    11 rows after the blocks of 12 W_down rows, I=67 one after the blocks of 6 gate rows; x with
    a row stride (a view of wider rows) and tokens in shuffled order."""
    g = torch.Generator().manual_seed(0)
    x, ids, weights, w_gate_up, w_down = _many_rows_case([0, 33, 64, 65, 200, 1, 131, 40], 131, 67, g)
    with torch.no_grad():
        actual = moe_experts(x, ids, weights, w_gate_up, w_down, activation, backend=backend)
    expected = reference.moe_experts(x.double(), ids, weights.double(), w_gate_up.double(), w_down.double(), activation)
    assert_close(actual, expected.float(), name=f"fp32 inference {activation}")


def _fp32_training_case(g):
    """fp32 experts with grad at row counts around the cpu backend's chunks (128 rows) and the
    backward's few-row mixes (16), an empty expert, one streamed forward (17, 1, 6 rows);
    2I=300 and H=131 end in a partial weight-gradient task both where they are 64 rows (gemm_f32:
    300 = 4*64 + 44) and where they are 256 (the BLAS: 256 + 44, and 131 a part of one); x and
    the incoming gradient with a row stride, tokens in shuffled order."""
    counts, H, I = [0, 17, 33, 64, 127, 128, 129, 257, 1, 40, 6], 131, 150
    x, ids, weights, w_gate_up, w_down = _many_rows_case(counts, H, I, g)
    grad_out = torch.randn(ids.shape[0], H + 3, generator=g)[:, 3:]
    return x, ids, weights, w_gate_up, w_down, grad_out


def _many_rows_case(counts, H, I, g):
    """fp32 moe_experts inputs with counts[e] routed rows for expert e (K=2), tokens in shuffled
    order, x a view with a row stride: (x, ids, weights, w_gate_up, w_down)."""
    K = 2
    ids = routed_counts(counts, K)
    ids = ids[torch.randperm(ids.shape[0], generator=g)]
    T, E = ids.shape[0], len(counts)
    x = torch.randn(T, H + 5, generator=g)[:, 2:-3]
    weights = torch.rand(T, K, generator=g)
    w_gate_up = torch.randn(E, 2 * I, H, generator=g) / H**0.5
    w_down = torch.randn(E, H, I, generator=g) / I**0.5
    return x, ids, weights, w_gate_up, w_down


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh"])
def test_moe_experts_fp32_training_many_rows(backend, activation):
    """fp32 with grad: the cpu backend's tiled forward writing h (tile_f32.h) and chunked backward
    (chunks_f32.h) for experts past its small-row paths, against the fp64 reference: the output
    and all four gradients (test_ext runs the other paths)."""
    case = _fp32_training_case(torch.Generator().manual_seed(0))
    _assert_fp32_training_matches(backend, case, activation, f"fp32 training {activation}")


def _assert_fp32_training_matches(backend, case, activation, name):
    """The output and all four gradients of moe_experts on `backend` against the fp64 reference,
    for case = (x, ids, weights, w_gate_up, w_down, grad_out) in fp32."""
    x, ids, weights, w_gate_up, w_down, grad_out = case
    results = []
    for run, dtype in ((partial(moe_experts, backend=backend), torch.float32), (reference.moe_experts, torch.float64)):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (x, weights, w_gate_up, w_down)]
        out = run(leaves[0], ids, *leaves[1:], activation)
        out.backward(grad_out.to(dtype))
        results.append([out.detach(), *(t.grad for t in leaves)])
    for what, a, e in zip(("out", *GRADS), *results):
        assert_close(a, e.float(), name=f"{name}: {what}")


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the CPU extension is not built")
def test_moe_experts_fp32_training_large_weights():
    """fp32 with grad, 1.6 MB of weights an expert: past the chunks' 1 MB limit for the BLAS, so
    the chunked backward runs them where its GEMMs are gemm_f32.h's and ATen's GEMMs elsewhere;
    odd widths (H=270, 2I=1000) and row counts around the 128-row chunks and 12-row blocks."""
    g = torch.Generator().manual_seed(1)
    inputs = _many_rows_case([0, 129, 257, 40], 270, 500, g)
    grad_out = torch.randn(inputs[1].shape[0], 270, generator=g)
    _assert_fp32_training_matches("cpu", (*inputs, grad_out), "silu", "fp32 training, large weights")


@pytest.mark.parametrize("backend", BACKENDS)
def test_moe_experts_stride0_gradient(backend):
    """`out.sum().backward()` hands the backward a gradient with stride 0 in both dimensions."""
    x, ids, weights, w_gate_up, w_down = case("odd")
    results = []
    for name in (backend, "reference"):
        leaves = [t.clone().requires_grad_() for t in (x, weights, w_gate_up, w_down)]
        moe_experts(leaves[0], ids, *leaves[1:], backend=name).sum().backward()
        results.append([t.grad for t in leaves])
    for what, a, e in zip(GRADS, *results):
        assert_close(a, e, name=f"sum: {what}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_moe_experts_zero_tokens_keep_the_graph(backend):
    x, ids, weights, w_gate_up, w_down = case("no_tokens", torch.bfloat16)
    leaves = [t.requires_grad_() for t in (x, weights, w_gate_up, w_down)]
    out = moe_experts(x, ids, weights, w_gate_up, w_down, backend=backend)
    assert out.shape == (0, x.shape[1]) and out.dtype == torch.bfloat16 and out.grad_fn is not None
    out.sum().backward()
    for t in leaves:
        assert t.grad is not None and t.grad.shape == t.shape and not t.grad.any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_moe_experts_keeps_only_h_for_backward(backend):
    """Memory: besides the inputs, the backward keeps h_N2I and the int32/int64 routing plan; not
    the activations a_NI, the gathered x_NH nor the expert outputs y_NH. Without grad, not even h."""
    x, ids, weights, w_gate_up, w_down = case("odd")
    T, E, K, H, I, _ = SHAPES["odd"]
    leaves = [t.requires_grad_() for t in (x, weights, w_gate_up, w_down)]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        moe_experts(x, ids, weights, w_gate_up, w_down, backend=backend)
    inputs = {t.data_ptr() for t in leaves}
    kept = sorted(tuple(t.shape) for t in saved if t.is_floating_point() and t.data_ptr() not in inputs)
    assert kept == [(T * K, 2 * I)], kept
    with torch.no_grad():
        out, h_N2I, *_ = torch.ops.finteam.moe_experts(x, ids, weights, w_gate_up, w_down, "silu", False, False, None,
                                                       backend)
    assert h_N2I.shape == (0, 2 * I)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])  # fp32: no rounding to bf16 hides another order
def test_moe_experts_is_bitwise_deterministic(backend, dtype):
    x, ids, weights, w_gate_up, w_down = case("odd", dtype)
    grad = torch.randn(x.shape, dtype=x.dtype)
    first = experts_and_grads(x, ids, weights, w_gate_up, w_down, grad, "silu", backend)
    second = experts_and_grads(x, ids, weights, w_gate_up, w_down, grad, "silu", backend)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("backend", BACKENDS)
def test_moe_experts_reads_far_rows(backend):
    """64-bit addressing in the gathers fused into the GEMMs: tokens of x and of the incoming
    gradient whose rows start past 2**31 elements give exactly the results of contiguous copies
    (the method is described in test_addressing_64bit.py)."""
    _, ids, weights, w_gate_up, w_down = case("tiny", torch.bfloat16)  # T=3: token 2 lies past 2**31
    H = w_down.shape[1]
    x_TH, grad_TH = far_rows(3, H), far_rows(3, H)
    forward = kernel("moe_experts_fwd", backend, moe_experts_fwd)
    backward = kernel("moe_experts_bwd", backend, moe_experts_bwd)
    actual = forward(x_TH, ids, weights, w_gate_up, w_down, "silu", True)
    expected = forward(x_TH.contiguous(), ids, weights, w_gate_up, w_down, "silu", True)
    assert all(torch.equal(a, e) for a, e in zip(actual, expected))
    _, h_N2I, *plan = expected
    actual = backward(grad_TH, x_TH, weights, w_gate_up, w_down, h_N2I, *plan, "silu")
    expected = backward(grad_TH.contiguous(), x_TH.contiguous(), weights, w_gate_up, w_down, h_N2I, *plan, "silu")
    for what, a, e in zip(GRADS, actual, expected):
        assert torch.equal(a, e), what


@pytest.mark.parametrize("hidden_act,activation", [("silu", "silu"), ("gelu", "gelu"),
                                                   ("gelu_pytorch_tanh", "gelu_tanh")])
def test_reference_matches_transformers_mixtral_experts(hidden_act, activation):
    """The spec against an independent formulation: transformers' eager Mixtral experts with the
    same weights (its layout is ours), forward and all gradients."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    T, E, K, H, I = 9, 4, 2, 12, 5
    config = MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=K,
                           hidden_act=hidden_act)
    config._experts_implementation = "eager"
    experts = MixtralExperts(config).double()
    torch.nn.init.normal_(experts.gate_up_proj)
    torch.nn.init.normal_(experts.down_proj)
    x = torch.randn(T, H, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(T, K, dtype=torch.float64, requires_grad=True)
    ids = routed(T, K, E).long()
    grad = torch.randn(T, H, dtype=torch.float64)
    theirs = experts(x, ids, weights)
    their_grads = torch.autograd.grad(theirs, (x, weights, experts.gate_up_proj, experts.down_proj), grad)
    ours = reference.moe_experts(x, ids, weights, experts.gate_up_proj, experts.down_proj, activation)
    our_grads = torch.autograd.grad(ours, (x, weights, experts.gate_up_proj, experts.down_proj), grad)
    for what, a, e in zip(("out_TH", *GRADS), (ours.detach(), *our_grads), (theirs.detach(), *their_grads)):
        assert_close(a, e, name=what)


@pytest.mark.parametrize("activation", reference.ACTIVATIONS)
def test_reference_moe_experts_gradcheck(activation):
    """The spec's own backward, in float64, against finite differences."""
    T, E, K, H, I = 4, 3, 2, 5, 3
    ids = routed(T, K, E)
    inputs = [torch.randn(T, H), torch.rand(T, K), torch.randn(E, 2 * I, H), torch.randn(E, H, I)]
    inputs = [t.double().requires_grad_() for t in inputs]
    assert torch.autograd.gradcheck(
        lambda x, w, gu, d: reference.moe_experts(x, ids, w, gu, d, activation), inputs)


def test_moe_experts_opcheck():
    if "triton" not in BACKENDS:
        pytest.skip("triton is not installed")
    x, ids, weights, w_gate_up, w_down = case("tiny")
    for t in (x, weights, w_gate_up, w_down):
        t.requires_grad_()
    torch.library.opcheck(torch.ops.finteam.moe_experts.default,
                          (x, ids, weights, w_gate_up, w_down, "silu", True, False, None, "triton"))
    _, h_N2I, offsets, row_to_slot, slot_to_row = torch.ops.finteam.moe_experts(
        x, ids, weights, w_gate_up, w_down, "silu", True, False, None, "triton")
    torch.library.opcheck(torch.ops.finteam.moe_experts_backward.default,
                          (torch.randn(x.shape), x.detach(), weights.detach(), w_gate_up.detach(), w_down.detach(),
                           h_N2I.detach(), offsets, row_to_slot, slot_to_row, "silu", "triton"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_moe_experts_compile_fullgraph(backend):
    """The op in one compiled graph (fake implementations, the backward wiring; aot_eager keeps
    the test free of a C++ toolchain), forward and every gradient equal to eager reference autograd."""
    x, ids, weights, w_gate_up, w_down = case("odd")
    grad = torch.randn(x.shape)

    def layer(x, ids, weights, w_gate_up, w_down, backend):
        return moe_experts(x * 2, ids, weights, w_gate_up, w_down, "silu", backend=backend)

    results = []
    for run, name in ((torch.compile(layer, fullgraph=True, backend="aot_eager"), backend), (layer, "reference")):
        leaves = [t.clone().requires_grad_() for t in (x, weights, w_gate_up, w_down)]
        out = run(leaves[0], ids, *leaves[1:], name)
        results.append((out.detach(), *torch.autograd.grad(out, leaves, grad)))
    for what, a, e in zip(("out_TH", *GRADS), *results):
        assert_close(a, e, name=what)


def test_moe_experts_errors():
    x, ids, weights, w_gate_up, w_down = case("odd")  # T=33, E=7, K=2, H=33, I=17
    op = "moe_experts"
    cases = [
        ((x.reshape(-1), ids, weights, w_gate_up, w_down), ValueError,
         rf"{op}: x_TH must be a 2-D tensor \[T, H\]; got a 1-D"),
        ((x.double(), ids, weights, w_gate_up.double(), w_down.double()), TypeError,
         rf"{op}: x_TH must be float32 or float16 or bfloat16; got .*float64"),
        ((x, ids.float(), weights, w_gate_up, w_down), TypeError, rf"{op}: topk_ids_TK must be int32 or int64; got .*float32"),
        ((x, ids, weights.long(), w_gate_up, w_down), TypeError,
         rf"{op}: topk_weights_TK must be float32 or bfloat16 or float16; got .*int64"),
        ((x, ids, weights, w_gate_up.bfloat16(), w_down), TypeError,
         rf"{op}: w_gate_up_E2IH is bfloat16 but x_TH is float32; they must have the same dtype"),
        ((x, ids, weights, w_gate_up, w_down.half()), TypeError,
         rf"{op}: w_down_EHI is float16 but x_TH is float32; they must have the same dtype"),
        ((x, ids[:5], weights, w_gate_up, w_down), ValueError,
         rf"{op}: topk_ids_TK must have size 33 in dimension 0 \(T, the tokens of x_TH\); got shape \(5, 2\)"),
        ((x, ids, weights[:, :1], w_gate_up, w_down), ValueError,
         rf"{op}: topk_weights_TK must have size 2 in dimension 1 \(K, as in topk_ids_TK\); got shape \(33, 1\)"),
        ((x, ids, weights, w_gate_up[..., :32], w_down), ValueError,
         rf"{op}: w_gate_up_E2IH must have size 33 in dimension 2 \(H, the width of x_TH\); got shape \(7, 34, 32\)"),
        ((x, ids, weights, w_gate_up[:, :33], w_down), ValueError,
         rf"{op}: w_gate_up_E2IH must have an even size in dimension 1 \(2I: the gate rows, then the up rows\); got shape \(7, 33, 33\)"),
        ((x, ids, weights, w_gate_up, w_down[:6]), ValueError,
         rf"{op}: w_down_EHI must have size 7 in dimension 0 \(E, the experts of w_gate_up_E2IH\); got shape \(6, 33, 17\)"),
        ((x, ids, weights, w_gate_up, w_down[..., :16]), ValueError,
         rf"{op}: w_down_EHI must have size 17 in dimension 2 \(I, half of w_gate_up_E2IH's dimension 1\); got shape \(7, 33, 16\)"),
        ((x, ids, weights, w_gate_up[:1], w_down[:1]), ValueError,
         rf"{op}: K \(topk_ids_TK.shape\[1\]\) must be in \[1, 1\] \(experts per token, with E = 1\); got 2"),
        ((x, ids, weights, w_gate_up[:0], w_down[:0]), ValueError,
         rf"{op}: w_gate_up_E2IH must hold at least one expert \(dimension 0, E\); got shape \(0, 34, 33\)"),
        ((x, ids.new_zeros((33, 0)), weights[:, :0], w_gate_up, w_down), ValueError,
         rf"{op}: K \(topk_ids_TK.shape\[1\]\) must be in \[1, 7\] .*; got 0"),
        ((x, ids + 5, weights, w_gate_up, w_down), ValueError, rf"{op}: topk_ids_TK must hold expert ids in \[0, 7\); got ids from 5 to 11"),
        ((x, ids, weights, w_gate_up, w_down.to("meta")), ValueError, rf"{op}: w_down_EHI is on meta but x_TH is on cpu"),
    ]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            moe_experts(*args)
    with pytest.raises(ValueError, match=rf"{op}: activation must be one of 'silu', 'gelu', 'gelu_tanh'; got 'relu'"):
        moe_experts(x, ids, weights, w_gate_up, w_down, "relu")
    with pytest.raises(ValueError, match=rf"{op}: backend must be one of .*; got 'tpu'"):
        moe_experts(x, ids, weights, w_gate_up, w_down, backend="tpu")
