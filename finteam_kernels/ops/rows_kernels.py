"""Triton kernels that move whole rows: the gather behind permute, the K-way combine behind
unpermute (and permute's backward), and unpermute's backward (a scaled gather fused with the
weight gradient's dot products).

Shape legend: T tokens, H hidden, K top-k, N = T*K routed rows.
All are memory-bound: one read and one write of every element moved, nothing else. Row, token
and column indices are widened to int64 before they multiply a stride, so tensors past 2**31
elements are addressed correctly. Sums run in fp32 (fp64 for fp64 data), in a fixed order.
"""
import triton
import triton.language as tl


@triton.jit
def _wide(x):
    """x in the precision sums run in: fp64 stays fp64, everything else becomes fp32."""
    if x.dtype == tl.float64:
        return x
    return x.to(tl.float32)


@triton.jit
def _gather_rows_kernel(
    src_ptr, index_ptr, out_ptr,
    H, stride_src_row, stride_src_h, stride_out_row,
    INDEX_DIV: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """out[r, :] = src[index[r] // INDEX_DIV, :]

    One program per (row r, block of H). `index` holds slots (t*K + j) and INDEX_DIV is K, so the
    source row is the slot's token. out is contiguous in H.
    """
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = cols < H
    source = tl.load(index_ptr + row).to(tl.int64) // INDEX_DIV
    values = tl.load(src_ptr + source * stride_src_row + cols * stride_src_h, mask=mask)
    tl.store(out_ptr + row * stride_out_row + cols, values, mask=mask)


@triton.jit
def _combine_rows_kernel(
    src_ptr, index_ptr, weight_ptr, out_ptr,
    H, K, stride_src_row, stride_src_h, stride_weight_t, stride_weight_k, stride_out_row,
    HAS_WEIGHTS: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """out[t, :] = sum_j weight[t, j] * src[index[t*K + j], :], in fp32, j in order.

    One program per (token t, block of H) reduces its K sources itself: no atomics, so the result
    is the same on every run. `index` ([T*K], contiguous) maps slots to source rows; `weight` is
    [T, K] with strides. out is contiguous in H, rounded once to its dtype.
    """
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = cols < H
    acc = _wide(tl.zeros([BLOCK_H], dtype=out_ptr.dtype.element_ty))
    for j in range(K):
        row = tl.load(index_ptr + token * K + j).to(tl.int64)
        values = _wide(tl.load(src_ptr + row * stride_src_row + cols * stride_src_h, mask=mask, other=0.0))
        if HAS_WEIGHTS:
            values = values * _wide(tl.load(weight_ptr + token * stride_weight_t + j * stride_weight_k))
        acc += values
    tl.store(out_ptr + token * stride_out_row + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _unpermute_bwd_kernel(
    grad_ptr, y_ptr, index_ptr, weight_ptr, grad_y_ptr, grad_weight_ptr,
    H, K, stride_grad_t, stride_grad_h, stride_y_row, stride_y_h, stride_weight_t, stride_weight_k,
    stride_grad_y_row, stride_grad_weight_t,
    BLOCK_H: tl.constexpr,
):
    """For row r holding slot s = index[r] = t*K + j:
        grad_y[r, :]      = weight[t, j] * grad[t, :]          (fp32 product, rounded once)
        grad_weight[t, j] = sum_h grad[t, h] * y[r, h]         (fp32, in grad_weight's dtype)

    One program per row walks its H in BLOCK_H steps: one read of grad[t] and y[r], one write of
    grad_y[r], and the dot product for free from the same loads (memory-bound). Each grad_weight
    element is written by exactly one program, and the dot is summed in a fixed order.
    grad may have stride 0 (a broadcast incoming gradient); grad_y is contiguous in H.
    """
    row = tl.program_id(0).to(tl.int64)
    slot = tl.load(index_ptr + row).to(tl.int64)
    token, j = slot // K, slot % K
    weight = _wide(tl.load(weight_ptr + token * stride_weight_t + j * stride_weight_k))
    dot = tl.zeros([BLOCK_H], dtype=weight.dtype)
    for start in range(0, H, BLOCK_H):
        cols = start + tl.arange(0, BLOCK_H).to(tl.int64)
        mask = cols < H
        grad = _wide(tl.load(grad_ptr + token * stride_grad_t + cols * stride_grad_h, mask=mask, other=0.0))
        y = _wide(tl.load(y_ptr + row * stride_y_row + cols * stride_y_h, mask=mask, other=0.0))
        tl.store(grad_y_ptr + row * stride_grad_y_row + cols, (grad * weight).to(grad_y_ptr.dtype.element_ty),
                 mask=mask)
        dot += grad * y
    tl.store(grad_weight_ptr + token * stride_grad_weight_t + j, tl.sum(dot, axis=0).to(grad_weight_ptr.dtype.element_ty))


def aot_specs():
    from ._triton import AotSpec

    specs = []
    for dtype in ("fp32", "bf16"):
        specs.append(AotSpec(
            f"gather_rows[{dtype}]", _gather_rows_kernel,
            {"src_ptr": f"*{dtype}", "index_ptr": "*i32", "out_ptr": f"*{dtype}",
             "H": "i32", "stride_src_row": "i64", "stride_src_h": "i64", "stride_out_row": "i64",
             "INDEX_DIV": "constexpr", "BLOCK_H": "constexpr"},
            {"INDEX_DIV": 2, "BLOCK_H": 1024}))
        for has_weights in (False, True):
            specs.append(AotSpec(
                f"combine_rows[{dtype},HAS_WEIGHTS={int(has_weights)}]", _combine_rows_kernel,
                {"src_ptr": f"*{dtype}", "index_ptr": "*i32", "weight_ptr": "*fp32", "out_ptr": f"*{dtype}",
                 "H": "i32", "K": "i32", "stride_src_row": "i64", "stride_src_h": "i64",
                 "stride_weight_t": "i64", "stride_weight_k": "i64", "stride_out_row": "i64",
                 "HAS_WEIGHTS": "constexpr", "BLOCK_H": "constexpr"},
                {"HAS_WEIGHTS": has_weights, "BLOCK_H": 1024}))
        specs.append(AotSpec(
            f"unpermute_bwd[{dtype}]", _unpermute_bwd_kernel,
            {"grad_ptr": f"*{dtype}", "y_ptr": f"*{dtype}", "index_ptr": "*i32", "weight_ptr": "*fp32",
             "grad_y_ptr": f"*{dtype}", "grad_weight_ptr": "*fp32",
             "H": "i32", "K": "i32", "stride_grad_t": "i64", "stride_grad_h": "i64", "stride_y_row": "i64",
             "stride_y_h": "i64", "stride_weight_t": "i64", "stride_weight_k": "i64",
             "stride_grad_y_row": "i64", "stride_grad_weight_t": "i64", "BLOCK_H": "constexpr"},
            {"BLOCK_H": 1024}))
    return specs
