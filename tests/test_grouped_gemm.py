"""grouped_gemm: forward and both gradients against autograd through the reference (fp32 tight,
fp16/bf16 by the tolerance rule) on shapes chosen to break the tile scheduling, the exact-zero
weight gradient of empty experts, strided and transposed inputs, stride-0 gradients, 64-bit
addressing, determinism, the reference itself under gradcheck, the custom ops, and the argument
errors."""
import pytest
import torch
from backends import kernel_backends
from test_addressing_64bit import far_rows
from tolerance import assert_close

from finteam_kernels import grouped_gemm, reference
from finteam_kernels._backend import kernel
from finteam_kernels.ops.grouped_gemm import grouped_gemm_bwd, grouped_gemm_fwd

BACKENDS = kernel_backends()
LOW = (torch.bfloat16, torch.float16)


def offsets_of(counts) -> torch.Tensor:
    """int64 [E+1] expert offsets from the rows per expert."""
    offsets = torch.zeros(len(counts) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(counts, dtype=torch.int64).cumsum(0)
    return offsets


SHAPES = {
    # rows per expert, D, O
    "single": ([1], 1, 1),  # one row, one expert, 1x1 weights
    "no_rows": ([0, 0, 0], 8, 5),  # zero rows: empty y and dx, all-zero weight gradients
    "odd": ([40, 0, 77, 1, 0, 0, 139], 33, 17),  # 257 rows on prime E with three empty experts; odd D, O;
                                                 # expert blocks start and end inside row tiles
    "one_expert": ([0, 0, 0, 0, 0, 96, 0, 0], 40, 24),  # every row on expert 5, seven empty experts
    "multi_tile": ([70, 3, 60], 130, 70),  # several K steps over D and several column tiles over O
    "many_experts": ([0] * 30 + [2] + [0] * 32 + [1], 20, 12),  # E=64, three rows: most experts empty,
                                                               # the worst-case grid nearly all surplus
    "expert_chunks": ([0] * 129 + [2, 1], 9, 6),  # E=131: the row-tile scan crosses its 128-expert chunk
    # The cpu backward's row mixes (experts with at most 16 rows): 1 row, an empty expert between
    # busy ones, 16 and 17 rows (either side of the switch to ATen), and 33; D=131 ends in a
    # partial 64-column chunk and a partial task of 128 columns; O=67 splits dw into one task of
    # 64 rows and one of 3, and leaves tiles of 2 and 1 rows.
    "few_rows": ([1, 0, 16, 17, 5, 0, 3, 33], 131, 67),
}
EMPTY_CHECKED = ("no_rows", "odd", "one_expert", "many_experts", "expert_chunks", "few_rows")


def gemm_and_grads(x, w, offsets, grad, backend):
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    y = grouped_gemm(x, w, offsets, backend=backend)
    grad_x, grad_w = torch.autograd.grad(y, (x, w), grad)
    return y.detach(), grad_x, grad_w


def check_against_reference(x, w, offsets, backend, name, grad=None):
    """y and both gradients against the fp32 reference (and, in fp16/bf16, against plain
    PyTorch's own error at that precision). Returns the largest relative errors."""
    grad = torch.randn(x.shape[0], w.shape[1], dtype=x.dtype) if grad is None else grad
    actual = gemm_and_grads(x, w, offsets, grad, backend)
    expected = gemm_and_grads(x.float(), w.float(), offsets, grad.float(), "reference")
    baseline = gemm_and_grads(x, w, offsets, grad, "reference") if x.dtype in LOW else (None,) * 3
    errors = [assert_close(a, e, baseline=b, name=f"{name}: {what}")
              for what, a, e, b in zip(("y_NO", "grad_x_ND", "grad_w_EOD"), actual, expected, baseline)]
    return actual, errors


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,shape", [
    pytest.param(dtype, shape, id=f"{shape}-{str(dtype).removeprefix('torch.')}")
    for dtype, shapes in ((torch.float32, SHAPES), (torch.bfloat16, ("single", "odd", "one_expert", "multi_tile",
                                                                      "expert_chunks", "few_rows")),
                          (torch.float16, ("odd", "multi_tile")))
    for shape in shapes
])
def test_grouped_gemm_matches_reference(backend, dtype, shape):
    counts, D, O = SHAPES[shape]
    offsets = offsets_of(counts)
    x, w = torch.randn(sum(counts), D, dtype=dtype), torch.randn(len(counts), O, D, dtype=dtype)
    (y, grad_x, grad_w), _ = check_against_reference(x, w, offsets, backend, f"{shape} {dtype}")
    assert (y.dtype, grad_x.dtype, grad_w.dtype) == (dtype,) * 3
    empty = [e for e, c in enumerate(counts) if c == 0]
    if shape in EMPTY_CHECKED:
        assert empty and torch.equal(grad_w[empty], torch.zeros_like(grad_w[empty])), "empty experts' dW not zero"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_gemm_strided_inputs(backend, dtype):
    counts, D, O = [5, 0, 9, 4], 21, 11
    offsets, N, E = offsets_of(counts), sum(counts), len(counts)
    x_transposed = torch.randn(D, N, dtype=dtype).t()  # x stored column-major: D stride N
    x_every_other = torch.randn(N, 2 * D, dtype=dtype)[:, ::2]  # D stride 2
    w_transposed = torch.randn(E, D, O, dtype=dtype).transpose(1, 2)  # each w[e] stored transposed
    w_sliced = torch.randn(2 * E, O + 3, D, dtype=dtype)[::2, 1:-2]  # expert stride 2*(O+3)*D, offset rows
    grad_transposed = torch.randn(O, N, dtype=dtype).t()
    check_against_reference(x_transposed, w_sliced, offsets, backend, "transposed x", grad=grad_transposed)
    check_against_reference(x_every_other, w_transposed, offsets, backend, "strided x, transposed w")


@pytest.mark.parametrize("backend", BACKENDS)
def test_grouped_gemm_stride0_gradient(backend):
    """`y.sum().backward()` hands the backward a gradient with stride 0 in both dimensions; a
    broadcast row has stride 0 in the rows only."""
    counts, D, O = [3, 0, 6], 10, 7
    offsets = offsets_of(counts)
    x, w = torch.randn(sum(counts), D), torch.randn(len(counts), O, D)
    for grad in (torch.ones(()).expand(sum(counts), O), torch.randn(1, O).expand(sum(counts), O)):
        assert grad.stride()[0] == 0
        check_against_reference(x, w, offsets, backend, f"gradient strides {grad.stride()}", grad=grad)
    x_, w_ = x.clone().requires_grad_(), w.clone().requires_grad_()
    grouped_gemm(x_, w_, offsets, backend=backend).sum().backward()
    x_ref, w_ref = x.clone().requires_grad_(), w.clone().requires_grad_()
    reference.grouped_gemm(x_ref, w_ref, offsets).sum().backward()
    assert_close(x_.grad, x_ref.grad, name="sum: grad_x_ND")
    assert_close(w_.grad, w_ref.grad, name="sum: grad_w_EOD")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])  # fp32: no rounding to bf16 hides another order
def test_grouped_gemm_is_bitwise_deterministic(backend, dtype):
    counts, D, O = SHAPES["odd"]
    x, w = torch.randn(sum(counts), D, dtype=dtype), torch.randn(len(counts), O, D, dtype=dtype)
    grad = torch.randn(sum(counts), O, dtype=dtype)
    first = gemm_and_grads(x, w, offsets_of(counts), grad, backend)
    second = gemm_and_grads(x, w, offsets_of(counts), grad, backend)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("backend", BACKENDS)
def test_grouped_gemm_reads_far_rows(backend):
    """64-bit addressing: inputs whose rows (x, the incoming gradient) or experts (w) start past
    2**31 elements give exactly the results of contiguous copies (the method is described in
    test_addressing_64bit.py)."""
    D, O = 6, 5
    offsets = offsets_of([2, 0, 1])  # rows 0 and 1 on expert 0; row 2, past 2**31, on expert 2
    x_ND, grad_NO = far_rows(3, D), far_rows(3, O)
    w_EOD = far_rows(3, O * D).view(3, O, D)  # expert 2's weights past 2**31
    forward = kernel("grouped_gemm_fwd", backend, grouped_gemm_fwd)
    backward = kernel("grouped_gemm_bwd", backend, grouped_gemm_bwd)
    y_NO = forward(x_ND.contiguous(), w_EOD.contiguous(), offsets)
    assert_close(y_NO, reference.grouped_gemm(x_ND.float(), w_EOD.float(), offsets),
                 baseline=reference.grouped_gemm(x_ND.contiguous(), w_EOD.contiguous(), offsets), name="y_NO")
    assert torch.equal(forward(x_ND, w_EOD, offsets), y_NO)
    expected = backward(grad_NO.contiguous(), x_ND.contiguous(), w_EOD.contiguous(), offsets)
    for what, a, e in zip(("grad_x_ND", "grad_w_EOD"), backward(grad_NO, x_ND, w_EOD, offsets), expected):
        assert torch.equal(a, e), what


def test_grouped_gemm_weight_gradient_writes_far_experts():
    """The weight-gradient kernel stores expert 2's tile past 2**31 elements (launchers allocate
    contiguous outputs, so this drives the Triton launch helper with a far output view)."""
    needs_triton()
    from finteam_kernels.ops.grouped_gemm import wgrad

    D, O = 6, 5
    offsets = offsets_of([2, 0, 1])
    grad_NO, x_ND = torch.randn(3, O, dtype=torch.bfloat16), torch.randn(3, D, dtype=torch.bfloat16)
    grad_w_far = far_rows(3, O * D).view(3, O, D)
    wgrad(grad_NO, x_ND, offsets, out_EOD=grad_w_far)
    assert torch.equal(grad_w_far, wgrad(grad_NO, x_ND, offsets))


def needs_triton():
    if "triton" not in BACKENDS:
        pytest.skip("triton is not installed")
    from finteam_kernels.ops import grouped_gemm_kernels

    return grouped_gemm_kernels


@pytest.mark.parametrize("family", ["plain", "glu", "fp32"])
def test_every_config_matches_reference(monkeypatch, family):
    """Each autotune config (the tests above run the default one) through the launch helpers:
    the forward, with the gather and GLU epilogue for the gate/up family, and the weight
    gradient. Rows end inside tiles of every height; D and O span several tiles of every width."""
    kernels = needs_triton()
    from finteam_kernels.ops.grouped_gemm import gemm, wgrad

    dtype = torch.float32 if family == "fp32" else torch.bfloat16
    counts, D, O = [30, 0, 1, 69], 70, 130
    offsets, N = offsets_of(counts), sum(counts)
    glu = family == "glu"
    x = torch.randn(N, D, dtype=dtype)
    index = torch.randperm(N).to(torch.int32)  # with GLU, row r gathers token index[r] // 2 (K=2)
    w = torch.randn(len(counts), 2 * O if glu else O, D, dtype=dtype)
    x_rows = x[index.long() // 2] if glu else x
    h_expected = reference.grouped_gemm(x_rows.float(), w.float(), offsets)
    h_baseline = reference.grouped_gemm(x_rows, w, offsets)
    y_expected = reference.glu(h_expected, "silu") if glu else h_expected
    y_baseline = reference.glu(h_baseline, "silu") if glu else h_baseline
    dy = torch.randn(N, O, dtype=dtype)
    dw_expected = torch.stack([dy[a:b].float().t() @ x_rows[a:b].float() for a, b in zip(offsets, offsets[1:])])
    dw_baseline = torch.stack([dy[a:b].t() @ x_rows[a:b] for a, b in zip(offsets, offsets[1:])])
    for config in kernels.GEMM_CONFIGS[family]:
        monkeypatch.setattr(kernels, "default_gemm_config", lambda *_, c=config: kernels.gemm_meta(c))
        if glu:
            y, h = gemm(x, w, offsets, index_N=index, index_div=2, activation="silu", keep_h=True)
            assert_close(h, h_expected, baseline=h_baseline, name=f"{config}: h")
        else:
            y, _ = gemm(x, w, offsets)
        assert_close(y, y_expected, baseline=y_baseline, name=f"{config}: y")
    for config in kernels.WGRAD_CONFIGS["fp32" if family == "fp32" else "plain"]:
        monkeypatch.setattr(kernels, "default_wgrad_config", lambda *_, c=config: kernels.wgrad_meta(c))
        dw = wgrad(dy, x, offsets, index_N=index, index_div=2) if glu else wgrad(dy, x, offsets)
        assert_close(dw, dw_expected, baseline=dw_baseline, name=f"{config}: dw")


def test_autotuned_launch(monkeypatch):
    """The tuned path (each config benchmarked, the best launched) end to end, on a stand-in
    benchmark that runs each config once: checks the grids, keys and config plumbing that only
    a GPU would otherwise exercise."""
    kernels = needs_triton()
    import finteam_kernels.ops._triton as op

    monkeypatch.setattr(op, "autotune_enabled", lambda: True)
    for tuned in (*kernels.GEMM_TUNED.values(), *kernels.WGRAD_TUNED.values()):
        monkeypatch.setitem(tuned.__dict__, "do_bench", lambda kernel_call, quantiles: (kernel_call(), [1.0] * 3)[1])
    counts, D, O = [5, 0, 12], 20, 9
    for dtype in (torch.bfloat16, torch.float32):
        x, w = torch.randn(sum(counts), D, dtype=dtype), torch.randn(len(counts), O, D, dtype=dtype)
        check_against_reference(x, w, offsets_of(counts), "triton", f"tuned {dtype}")


def test_reference_grouped_gemm_gradcheck():
    """The spec's own backward, in float64, against finite differences (an empty expert included)."""
    offsets = offsets_of([3, 0, 4])
    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: reference.grouped_gemm(x, w, offsets), (x, w))


def test_grouped_gemm_opcheck():
    needs_triton()
    counts, D, O = [3, 0, 4], 9, 6
    offsets = offsets_of(counts)
    x = torch.randn(sum(counts), D, requires_grad=True)
    w = torch.randn(len(counts), O, D, requires_grad=True)
    torch.library.opcheck(torch.ops.finteam.grouped_gemm.default, (x, w, offsets, False, "triton"))
    grad = torch.randn(sum(counts), O)
    torch.library.opcheck(torch.ops.finteam.grouped_gemm_backward.default,
                          (grad, x.detach(), w.detach(), offsets, "triton"))


def test_grouped_gemm_errors():
    counts, D, O = [4, 0, 6], 33, 17
    offsets = offsets_of(counts)  # E=3, N=10
    x, w = torch.randn(10, D), torch.randn(3, O, D)
    with pytest.raises(ValueError, match=r"grouped_gemm: x_ND must be a 2-D tensor \[N, D\]; got a 1-D"):
        grouped_gemm(x.reshape(-1), w, offsets)
    with pytest.raises(TypeError, match=r"grouped_gemm: x_ND must be float32 or float16 or bfloat16; got .*float64"):
        grouped_gemm(x.double(), w.double(), offsets)
    with pytest.raises(ValueError, match=r"grouped_gemm: w_EOD must be a 3-D tensor \[E, O, D\]; got a 2-D"):
        grouped_gemm(x, w[0], offsets)
    with pytest.raises(TypeError, match=r"grouped_gemm: w_EOD is bfloat16 but x_ND is float32; they must have the same dtype"):
        grouped_gemm(x, w.bfloat16(), offsets)
    with pytest.raises(ValueError, match=r"grouped_gemm: w_EOD must have size 33 in dimension 2 \(D, the width of x_ND\); got shape \(3, 17, 32\)"):
        grouped_gemm(x, w[..., :32], offsets)
    with pytest.raises(TypeError, match=r"grouped_gemm: expert_offsets_E1 must be int64; got .*int32"):
        grouped_gemm(x, w, offsets.int())
    with pytest.raises(ValueError, match=r"grouped_gemm: expert_offsets_E1 must have size 4 in dimension 0 \(E\+1, one more than the number of experts\); got shape \(3,\)"):
        grouped_gemm(x, w, offsets[:3])
    with pytest.raises(ValueError, match=r"grouped_gemm: expert_offsets_E1 must start at 0, never decrease and end at 10 \(the number of rows\); got \[0, 4, 4, 9\]"):
        grouped_gemm(x, w, offsets_of([4, 0, 5]))
    with pytest.raises(ValueError, match=r"grouped_gemm: expert_offsets_E1 must start at 0, never decrease .*; got \[0, 6, 4, 10\]"):
        grouped_gemm(x, w, torch.tensor([0, 6, 4, 10]))
    with pytest.raises(ValueError, match=r"grouped_gemm: w_EOD is on meta but x_ND is on cpu"):
        grouped_gemm(x, w.to("meta"), offsets)
    with pytest.raises(ValueError, match=r"grouped_gemm: backend must be one of .*; got 'tpu'"):
        grouped_gemm(x, w, offsets, backend="tpu")
