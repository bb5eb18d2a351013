"""64-bit addressing: the kernels themselves (not only the reference) compute element offsets past
2**31 correctly.

How this runs on a CPU without touching gigabytes. The Triton interpreter does not copy CPU
tensors: it hands the kernel their real data pointers and evaluates the kernel's integer
arithmetic in numpy with the kernel's own integer types, so an int32 product that overflows
wraps exactly as it would on a GPU (checked: a kernel computing `program_id * stride` in int32
reads the wrong row here). `far_rows` builds views whose rows lie FAR_STRIDE elements apart, with
FAR_STRIDE < 2**31 so that Triton passes it as an int32 argument, while row 2 starts past 2**31
elements: any row index that is not widened to int64 before it multiplies the stride makes a
wrong address. The buffer behind the view is allocated but never written except for the rows'
own pages (the kernel of the OS maps the rest lazily), so each view reserves 8 GiB of address
space and uses a few kilobytes. The view starts a little into its buffer, so a wrapped offset
(here -2**21 elements) still lands inside the allocation: a wrong value, not a crash.

Inputs are checked through the public ops and launchers (so every kernel backend is covered);
outputs, which the launchers always allocate contiguous, by launching the Triton kernels on
far-apart output views. A `cuda` test repeats the checks with real tensors of more than 2**31
elements.

Adding a kernel: build its inputs (or outputs) with `far_rows(rows, width)` (or `.t()` of one,
for a column stride past 2**31 / width) and compare with the reference on contiguous copies,
as the tests below do.
"""
import pytest
import torch
from backends import kernel_backends
from tolerance import assert_close

from finteam_kernels import dispatch, permute, reference, unpermute
from finteam_kernels._backend import kernel
from finteam_kernels.ops.permute import permute_bwd
from finteam_kernels.ops.unpermute import unpermute_bwd, unpermute_fwd

BACKENDS = kernel_backends()
FAR_STRIDE = 2**31 - 2**20  # an int32 stride; row 2 starts at 2**32 - 2**21 elements
_LEAD = 2**22  # elements before the view, where row 2's int32-wrapped offset (-2**21) lands


def far_rows(rows: int, width: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """A [rows, width] view (rows <= 3) of random values whose rows are FAR_STRIDE elements apart,
    in a lazily allocated buffer: row 2 lies past 2**31 elements, only the rows' pages are touched."""
    assert rows <= 3, "row 3 would wrap to a positive offset outside the lead-in; use at most 3 rows"
    try:
        buffer = torch.empty(_LEAD + (rows - 1) * FAR_STRIDE + width, dtype=dtype)
    except RuntimeError as err:
        pytest.skip(f"cannot reserve {(_LEAD + (rows - 1) * FAR_STRIDE) * dtype.itemsize / 2**30:.0f} GiB "
                    f"of address space here: {err}")
    view = buffer[_LEAD:].as_strided((rows, width), (FAR_STRIDE, 1))
    view.copy_(torch.randn(rows, width))
    return view


def test_far_rows_expose_int32_offsets():
    """The method can fail: a kernel that multiplies an int32 row index by the stride reads a
    wrong row 2 of `far_rows`, and the same kernel with the index widened to int64 the right one."""
    triton = pytest.importorskip("triton")
    tl = triton.language

    @triton.jit
    def copy_rows(src_ptr, out_ptr, stride, H, INDEX_TYPE: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(INDEX_TYPE)
        cols = tl.arange(0, BLOCK)
        tl.store(out_ptr + row * H + cols, tl.load(src_ptr + row * stride + cols, mask=cols < H), mask=cols < H)

    x = far_rows(3, 5)
    assert x.stride(0) < 2**31 < x.storage_offset() + 2 * x.stride(0)
    for index_type, right in ((tl.int64, True), (tl.int32, False)):
        out = torch.zeros(3, 5, dtype=x.dtype)
        copy_rows[(3,)](x, out, x.stride(0), 5, INDEX_TYPE=index_type, BLOCK=8)
        assert torch.equal(out[:2], x[:2])
        assert torch.equal(out[2], x[2]) == right, f"row 2 read with {index_type} offsets"


@pytest.mark.parametrize("backend", BACKENDS)
def test_permute_reads_far_rows(backend):
    x_TH = far_rows(3, 40)  # tokens 0, 1, 2; token 2 past 2**31
    plan = dispatch(torch.tensor([[2, 0], [1, 2], [0, 1]], dtype=torch.int32), 3, backend="reference")
    assert torch.equal(permute(x_TH, plan, backend=backend), reference.permute(x_TH.contiguous(), plan))


@pytest.mark.parametrize("backend", BACKENDS)
def test_permute_reads_far_columns(backend):
    x_TH = far_rows(3, 4).t()  # [4 tokens, 3 columns]: column 2 past 2**31
    plan = dispatch(torch.tensor([[1], [0], [1], [0]], dtype=torch.int32), 2, backend="reference")
    assert torch.equal(permute(x_TH, plan, backend=backend), reference.permute(x_TH.contiguous(), plan))


@pytest.mark.parametrize("backend", BACKENDS)
def test_permute_backward_reads_far_rows(backend):
    grad_NH = far_rows(3, 40)  # one token's three rows, row 2 past 2**31
    plan = dispatch(torch.tensor([[1, 0, 2]], dtype=torch.int32), 3, backend="reference")
    launcher = kernel("permute_bwd", backend, permute_bwd)
    expected = launcher(grad_NH.contiguous(), plan.slot_to_row_N, 3)
    assert torch.equal(launcher(grad_NH, plan.slot_to_row_N, 3), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unpermute_reads_far_rows(backend):
    y_NH = far_rows(3, 40)
    plan = dispatch(torch.tensor([[2, 0, 1]], dtype=torch.int32), 3, backend="reference")
    w = torch.rand(1, 3)
    expected = unpermute(y_NH.contiguous(), plan, w, backend=backend)
    assert torch.equal(unpermute(y_NH, plan, w, backend=backend), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unpermute_backward_reads_far_rows(backend):
    grad_TH, y_NH = far_rows(3, 40), far_rows(3, 40)  # three tokens, K = 1
    plan = dispatch(torch.tensor([[1], [2], [0]], dtype=torch.int32), 3, backend="reference")
    w = torch.rand(3, 1)
    launcher = kernel("unpermute_bwd", backend, unpermute_bwd)
    actual = launcher(grad_TH, y_NH, plan.row_to_slot_N, plan.slot_to_row_N, w)
    expected = launcher(grad_TH.contiguous(), y_NH.contiguous(), plan.row_to_slot_N, plan.slot_to_row_N, w)
    for name, a, e in zip(("grad_y_NH", "grad_weights_TK"), actual, expected):
        assert torch.equal(a, e), name


def test_triton_kernels_write_far_rows():
    """Launchers allocate contiguous outputs; here each row kernel writes into far-apart rows."""
    if "triton" not in BACKENDS:
        pytest.skip("triton is not installed")
    from finteam_kernels.ops._triton import interpreting
    from finteam_kernels.ops.rows_kernels import (_combine_rows_kernel, _gather_rows_kernel,
                                                  _unpermute_bwd_kernel, row_tile)

    H, dtype = 40, torch.bfloat16
    block_r, block_h = row_tile(H)
    index = torch.tensor([2, 0, 1], dtype=torch.int32)

    # gather: one token copied to three far rows (K = 3)
    x = torch.randn(1, H, dtype=dtype)
    out = far_rows(3, H)
    _gather_rows_kernel[(1, 1)](x, index, out, 3, H, x.stride(0), x.stride(1), out.stride(0),
                                INDEX_DIV=3, BLOCK_R=block_r, BLOCK_H=block_h)
    assert torch.equal(out, x.expand(3, H))

    # combine: three tokens (K = 1) into three far rows
    src, w = torch.randn(3, H, dtype=dtype), torch.rand(3, 1)
    out = far_rows(3, H)
    _combine_rows_kernel[(1, 1)](src, index, w, out, 3, H, 1, src.stride(0), src.stride(1), w.stride(0),
                                 w.stride(1), out.stride(0), HAS_WEIGHTS=True, INTERPRETED=interpreting(),
                                 BLOCK_T=block_r, BLOCK_H=block_h)
    assert torch.equal(out, unpermute_fwd(src, index, w))

    # unpermute backward: row gradients into three far rows, weight gradients into a far column
    grad, y = torch.randn(3, H, dtype=dtype), torch.randn(3, H, dtype=dtype)
    w = w.to(dtype)  # grad_w takes the weights' dtype: a 2-byte far buffer is 8 GiB of address space, not 16
    grad_y, grad_w = far_rows(3, H), far_rows(3, 1)
    _unpermute_bwd_kernel[(1,)](grad, y, index, w, grad_y, grad_w, 3, H, 1, grad.stride(0), grad.stride(1),
                                y.stride(0), y.stride(1), w.stride(0), w.stride(1), grad_y.stride(0),
                                grad_w.stride(0), INTERPRETED=interpreting(), BLOCK_R=block_r, BLOCK_H=block_h)
    expected_y, expected_w = unpermute_bwd(grad, y, index, index, w)
    assert torch.equal(grad_y, expected_y) and torch.equal(grad_w, expected_w)


@pytest.mark.cuda
def test_kernels_on_real_tensors_past_2_31_elements():
    """On a GPU: every op on tensors of more than 2**31 elements, against the reference."""
    device = torch.device("cuda")
    T, K, H = 2**18 + 8, 2, 4096  # x_NH holds 2**31 + 2**16 elements
    ids = torch.randint(0, 8, (T, K), device=device, dtype=torch.int32)
    plan = dispatch(ids, 8, backend="reference")
    x = torch.randn(T, H, device=device, dtype=torch.bfloat16)
    w = torch.rand(T, K, device=device)
    grad = torch.randn(T, H, device=device, dtype=torch.bfloat16)
    x_NH = reference.permute(x, plan)
    out_fp32, out_bf16 = reference.unpermute(x_NH.float(), plan, w), reference.unpermute(x_NH, plan, w)
    grad_NH = (reference.permute(grad.float(), plan) * _slot_weights(w, plan)).to(grad.dtype)
    for backend in _usable_backends(device, "permute"):
        assert torch.equal(permute(x, plan, backend=backend), x_NH), backend
    for backend in _usable_backends(device, "unpermute"):
        assert_close(unpermute(x_NH, plan, w, backend=backend), out_fp32, baseline=out_bf16, name=backend)
        actual_NH, _ = kernel("unpermute_bwd", backend, unpermute_bwd)(
            grad, x_NH, plan.row_to_slot_N, plan.slot_to_row_N, w)
        assert torch.equal(actual_NH, grad_NH), backend
        del actual_NH
    # dispatch: 2**27 + 512 slots over 4096 experts make a block table of more than 2**31 entries
    ids = torch.randint(0, 4096, (2**24 + 64, 8), device=device, dtype=torch.int32)
    expected = reference.dispatch(ids, 4096)
    for backend in _usable_backends(device, "dispatch"):
        for a, e in zip(dispatch(ids, 4096, backend=backend), expected):
            assert torch.equal(a, e), backend


def _slot_weights(w_TK, plan):
    """[N, 1]: the weight of the slot each row holds."""
    return w_TK.reshape(-1)[plan.row_to_slot_N.long()].unsqueeze(1)


def _usable_backends(device, op):
    from finteam_kernels._backend import why_unusable

    return [b for b in ("triton", "cuda") if why_unusable(b, device, op) is None]
