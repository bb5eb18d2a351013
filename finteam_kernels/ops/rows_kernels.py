"""Triton kernels that move whole rows: the gather behind permute, the K-way combine behind
unpermute (and permute's backward), and unpermute's backward (a scaled gather fused with the
weight gradient's dot products).

Shape legend: T tokens, H hidden, K top-k, N = T*K routed rows.
All are memory-bound: one read and one write of every element moved, nothing else. Row, token
and column indices are widened to int64 before they multiply a stride, so tensors past 2**31
elements are addressed correctly. Sums run in fp32 (fp64 for fp64 data), in a fixed order.

Indices read from a plan are bounds-checked here too (one compare per row): the ops refuse a plan
with indices out of range before launching, but should one get through, its rows read as zeros
and nothing is stored for it, instead of memory outside the tensors being read or written.
"""
import triton
import triton.language as tl

from ._jit import store


@triton.jit
def _wide(x):
    """x in the precision sums run in: fp64 stays fp64, everything else becomes fp32."""
    if x.dtype == tl.float64:
        return x
    return x.to(tl.float32)


TILE = 2048  # elements a program moves: 16 per thread at 4 warps
MAX_TILE_ROWS = 16  # rows of a tile; each has its own base address, which costs registers


def row_tile(H: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_H): a tile as wide as H allows (up to 1024 columns), with as many rows as
    fill TILE elements (up to MAX_TILE_ROWS), so that narrow rows still give each program a useful
    amount of work."""
    block_h = min(1024, 1 << max(0, (H - 1).bit_length()))
    return min(MAX_TILE_ROWS, max(1, TILE // block_h)), block_h


@triton.jit
def _gather_rows_kernel(
    src_ptr, index_ptr, out_ptr,
    N, H, stride_src_row, stride_src_h, stride_out_row,
    INDEX_DIV: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """out[r, :] = src[index[r] // INDEX_DIV, :]

    One program per (BLOCK_R rows, BLOCK_H columns). `index` ([N], contiguous) holds slots
    (t*K + j) in [0, N) and INDEX_DIV is K, so the source row is the slot's token. out is
    contiguous in H; a row whose slot is out of range gets zeros.
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    row_mask = rows < N
    slots = tl.load(index_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    mask = row_mask[:, None] & (cols[None, :] < H)
    read = mask & ((slots >= 0) & (slots < N))[:, None]
    values = tl.load(src_ptr + (slots // INDEX_DIV)[:, None] * stride_src_row + cols[None, :] * stride_src_h,
                     mask=read, other=0.0)
    tl.store(out_ptr + rows[:, None] * stride_out_row + cols[None, :], values, mask=mask)


@triton.jit
def _combine_rows_kernel(
    src_ptr, index_ptr, weight_ptr, out_ptr,
    T, H, K, stride_src_row, stride_src_h, stride_weight_t, stride_weight_k, stride_out_row,
    HAS_WEIGHTS: tl.constexpr, INTERPRETED: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """out[t, :] = sum_j weight[t, j] * src[index[t*K + j], :], in fp32, j in order.

    One program per (BLOCK_T tokens, BLOCK_H columns) reduces their K sources itself: no
    atomics, so the result is the same on every run. `index` ([T*K], contiguous) maps slots to
    source rows in [0, T*K) (one that is not adds nothing); `weight` is [T, K] with strides. out
    is contiguous in H, rounded once (INTERPRETED: see `_jit.store`).
    """
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    token_mask = tokens < T
    mask = token_mask[:, None] & (cols[None, :] < H)
    acc = _wide(tl.zeros([BLOCK_T, BLOCK_H], dtype=out_ptr.dtype.element_ty))
    for j in range(K):
        rows = tl.load(index_ptr + tokens * K + j, mask=token_mask, other=0).to(tl.int64)
        read = mask & ((rows >= 0) & (rows < T * K))[:, None]
        values = _wide(tl.load(src_ptr + rows[:, None] * stride_src_row + cols[None, :] * stride_src_h,
                               mask=read, other=0.0))
        if HAS_WEIGHTS:
            weight = tl.load(weight_ptr + tokens * stride_weight_t + j * stride_weight_k, mask=token_mask, other=0.0)
            values = values * weight.to(acc.dtype)[:, None]
        acc += values
    store(out_ptr + tokens[:, None] * stride_out_row + cols[None, :], acc, mask, INTERPRETED)


@triton.jit
def _unpermute_bwd_kernel(
    grad_ptr, y_ptr, index_ptr, weight_ptr, grad_y_ptr, grad_weight_ptr,
    N, H, K, stride_grad_t, stride_grad_h, stride_y_row, stride_y_h, stride_weight_t, stride_weight_k,
    stride_grad_y_row, stride_grad_weight_t,
    INTERPRETED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """For row r holding slot s = index[r] = t*K + j:
        grad_y[r, :]      = weight[t, j] * grad[t, :]          (fp32 product, rounded once)
        grad_weight[t, j] = sum_h grad[t, h] * y[r, h]         (fp32, in grad_weight's dtype)

    One program per BLOCK_R rows walks H in BLOCK_H steps: one read of grad[t] and y[r] and one
    write of grad_y[r] per row, the dot product for free from the same loads (memory-bound). Each
    grad_weight element is written by exactly one program and summed in a fixed order.
    grad may have stride 0 (a broadcast incoming gradient); grad_y is contiguous in H. A row whose
    slot is outside [0, N) gets a zero gradient and writes no grad_weight.
    INTERPRETED: see `_jit.store`.
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    in_rows = rows < N
    slots = tl.load(index_ptr + rows, mask=in_rows, other=0).to(tl.int64)
    row_mask = in_rows & (slots >= 0) & (slots < N)
    tokens, j = slots // K, slots % K
    dot = _wide(tl.zeros([BLOCK_R, BLOCK_H], dtype=y_ptr.dtype.element_ty))
    weight = tl.load(weight_ptr + tokens * stride_weight_t + j * stride_weight_k, mask=row_mask, other=0.0)
    weight = weight.to(dot.dtype)
    for start in range(0, H, BLOCK_H):
        cols = start + tl.arange(0, BLOCK_H).to(tl.int64)
        mask = row_mask[:, None] & (cols[None, :] < H)
        grad = _wide(tl.load(grad_ptr + tokens[:, None] * stride_grad_t + cols[None, :] * stride_grad_h,
                             mask=mask, other=0.0))
        y = _wide(tl.load(y_ptr + rows[:, None] * stride_y_row + cols[None, :] * stride_y_h, mask=mask, other=0.0))
        store(grad_y_ptr + rows[:, None] * stride_grad_y_row + cols[None, :], grad * weight[:, None],
              in_rows[:, None] & (cols[None, :] < H), INTERPRETED)
        dot += grad * y
    store(grad_weight_ptr + tokens * stride_grad_weight_t + j, tl.sum(dot, axis=1), row_mask, INTERPRETED)


def aot_specs():
    from ._triton import AotSpec

    specs = []
    for dtype in ("fp32", "bf16"):
        for H in (64, 1024):  # the narrowest and the widest tile shapes a launch uses on real models
            block_r, block_h = row_tile(H)
            tile = f"{dtype},{block_r}x{block_h}"
            specs.append(AotSpec(
                f"gather_rows[{tile}]", _gather_rows_kernel,
                {"src_ptr": f"*{dtype}", "index_ptr": "*i32", "out_ptr": f"*{dtype}",
                 "N": "i32", "H": "i32", "stride_src_row": "i64", "stride_src_h": "i64", "stride_out_row": "i64",
                 "INDEX_DIV": "constexpr", "BLOCK_R": "constexpr", "BLOCK_H": "constexpr"},
                {"INDEX_DIV": 2, "BLOCK_R": block_r, "BLOCK_H": block_h}))
            for has_weights in (False, True):
                specs.append(AotSpec(
                    f"combine_rows[{tile},HAS_WEIGHTS={int(has_weights)}]", _combine_rows_kernel,
                    {"src_ptr": f"*{dtype}", "index_ptr": "*i32", "weight_ptr": "*fp32", "out_ptr": f"*{dtype}",
                     "T": "i32", "H": "i32", "K": "i32", "stride_src_row": "i64", "stride_src_h": "i64",
                     "stride_weight_t": "i64", "stride_weight_k": "i64", "stride_out_row": "i64",
                     "HAS_WEIGHTS": "constexpr", "INTERPRETED": "constexpr", "BLOCK_T": "constexpr",
                     "BLOCK_H": "constexpr"},
                    {"HAS_WEIGHTS": has_weights, "INTERPRETED": False, "BLOCK_T": block_r, "BLOCK_H": block_h}))
            specs.append(AotSpec(
                f"unpermute_bwd[{tile}]", _unpermute_bwd_kernel,
                {"grad_ptr": f"*{dtype}", "y_ptr": f"*{dtype}", "index_ptr": "*i32", "weight_ptr": "*fp32",
                 "grad_y_ptr": f"*{dtype}", "grad_weight_ptr": "*fp32",
                 "N": "i32", "H": "i32", "K": "i32", "stride_grad_t": "i64", "stride_grad_h": "i64",
                 "stride_y_row": "i64", "stride_y_h": "i64", "stride_weight_t": "i64", "stride_weight_k": "i64",
                 "stride_grad_y_row": "i64", "stride_grad_weight_t": "i64",
                 "INTERPRETED": "constexpr", "BLOCK_R": "constexpr", "BLOCK_H": "constexpr"},
                {"INTERPRETED": False, "BLOCK_R": block_r, "BLOCK_H": block_h}))
    return specs
