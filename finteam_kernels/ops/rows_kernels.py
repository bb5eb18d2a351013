"""Triton kernels that move whole rows: the gather behind permute (and unpermute's backward) and
the K-way combine behind unpermute (and permute's backward).

Shape legend: T tokens, H hidden, K top-k, N = T*K routed rows.
Both are memory-bound: one read and one write of every element moved, nothing else. Row and
token indices are widened to int64 before they multiply a stride, so tensors past 2**31
elements are addressed correctly.
"""
import triton
import triton.language as tl


@triton.jit
def _gather_rows_kernel(
    src_ptr, index_ptr, scale_ptr, out_ptr,
    H, stride_src_row, stride_src_h, stride_out_row,
    INDEX_DIV: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """out[r, :] = scale[index[r]] * src[index[r] // INDEX_DIV, :]

    One program per (row r, block of H). `index` holds slots (t*K + j) and INDEX_DIV is K, so the
    source row is the slot's token; `scale` (contiguous [N]) is indexed by slot. The product is
    taken in fp32 and rounded once to out's dtype.
    """
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = cols < H
    slot = tl.load(index_ptr + row).to(tl.int64)
    values = tl.load(src_ptr + (slot // INDEX_DIV) * stride_src_row + cols * stride_src_h, mask=mask)
    if HAS_SCALE:
        values = values.to(tl.float32) * tl.load(scale_ptr + slot).to(tl.float32)
    tl.store(out_ptr + row * stride_out_row + cols, values.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _combine_rows_kernel(
    src_ptr, index_ptr, weight_ptr, out_ptr,
    H, K, stride_src_row, stride_src_h, stride_out_row,
    HAS_WEIGHTS: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """out[t, :] = sum_j weight[t*K + j] * src[index[t*K + j], :], in fp32, j in order.

    One program per (token t, block of H) reduces its K sources itself: no atomics, so the result
    is the same on every run. `index` maps slots to source rows; `weight` is contiguous [T*K].
    """
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = cols < H
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for j in range(K):
        slot = token * K + j
        row = tl.load(index_ptr + slot).to(tl.int64)
        values = tl.load(src_ptr + row * stride_src_row + cols * stride_src_h, mask=mask).to(tl.float32)
        if HAS_WEIGHTS:
            values = values * tl.load(weight_ptr + slot).to(tl.float32)
        acc += values
    tl.store(out_ptr + token * stride_out_row + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


def aot_specs():
    from ._triton import AotSpec

    specs = []
    for dtype in ("fp32", "bf16"):
        for has_scale in (False, True):
            specs.append(AotSpec(
                f"gather_rows[{dtype},HAS_SCALE={int(has_scale)}]", _gather_rows_kernel,
                {"src_ptr": f"*{dtype}", "index_ptr": "*i32", "scale_ptr": "*fp32", "out_ptr": f"*{dtype}",
                 "H": "i32", "stride_src_row": "i64", "stride_src_h": "i64", "stride_out_row": "i64",
                 "INDEX_DIV": "constexpr", "HAS_SCALE": "constexpr", "BLOCK_H": "constexpr"},
                {"INDEX_DIV": 2, "HAS_SCALE": has_scale, "BLOCK_H": 1024}))
            specs.append(AotSpec(
                f"combine_rows[{dtype},HAS_WEIGHTS={int(has_scale)}]", _combine_rows_kernel,
                {"src_ptr": f"*{dtype}", "index_ptr": "*i32", "weight_ptr": "*fp32", "out_ptr": f"*{dtype}",
                 "H": "i32", "K": "i32", "stride_src_row": "i64", "stride_src_h": "i64", "stride_out_row": "i64",
                 "HAS_WEIGHTS": "constexpr", "BLOCK_H": "constexpr"},
                {"HAS_WEIGHTS": has_scale, "BLOCK_H": 1024}))
    return specs
