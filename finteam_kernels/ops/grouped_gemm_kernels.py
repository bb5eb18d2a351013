"""Triton kernels of the grouped GEMM: one launch multiplies every expert's block of rows by that
expert's weight matrix, and one launch computes every expert's weight gradient.

Shape legend: E experts, N routed rows (grouped by expert: rows of e are
`expert_offsets_E1[e]:expert_offsets_E1[e+1]`), D and O a GEMM's input and output widths.

Forward (`_grouped_gemm_kernel`): y[r] = a[src(r)] @ w[e(r)]^T. The grid is sized on the host for
the worst case, `cdiv(N, BLOCK_M) + min(E, N)` row tiles (each expert's last tile may be partial)
times the column tiles, so the host never reads the offsets; each program finds its expert and
row tile from the offsets on the device and surplus programs exit at once. Strides are arguments,
so the same kernel computes x @ w[e]^T and x @ w[e] (a transposed view of w) and reads strided
and stride-0 inputs. Two fusions serve the MoE layer:
  - row gather: row r reads `a[index[r] // INDEX_DIV]` (the permute of tokens into expert order
    happens inside the GEMM, so the permuted copy is never written);
  - GLU epilogue: w holds gate rows then up rows ([E, 2*O, D]); each program computes the gate and
    the up tile of its columns and writes act(gate) * up, and optionally the pre-activation
    h = [gate | up] for the backward.
Weight gradient (`_grouped_wgrad_kernel`): dw[e] = dy_e^T @ a_e, the expert's rows being the
reduction dimension, one program per (O tile, D tile, expert); an expert with no rows writes
exact zeros. It takes the same row gather on a.

Accumulation is fp32; outputs are rounded once to their tensor's dtype. Every row, column and
expert index is widened to int64 before it multiplies a stride, so tensors past 2**31 elements
are addressed correctly.
"""
import inspect

import triton
import triton.language as tl

# Experts scanned per step when a program looks for its row tile (any E works; this is the chunk).
EXPERT_CHUNK = 128

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): few configs, each a proven matmul shape
# for tensor cores; the default (see `default_gemm_config`) is picked without tuning.
GEMM_CONFIGS = (
    (128, 128, 64, 8, 3),  # large expert blocks: best operand reuse
    (128, 64, 64, 4, 4),  # large blocks, narrow outputs (and the GLU tile, which holds two accumulators)
    (64, 128, 64, 4, 3),  # few rows per expert (decode, many experts)
    (64, 64, 32, 4, 4),  # fp32 operands, and the smallest problems
)
# (BLOCK_O, BLOCK_D, BLOCK_K, num_warps, num_stages) of the weight gradient; BLOCK_K runs over rows.
WGRAD_CONFIGS = (
    (128, 128, 64, 8, 3),
    (64, 128, 64, 4, 3),
    (64, 64, 32, 4, 4),
)
# Shared memory a config may ask for (bytes): fits sm_80 (164 KiB) and sm_90 (227 KiB).
SHARED_LIMIT = 160 * 1024


@triton.jit
def activation(x, ACTIVATION: tl.constexpr):
    """(act(x), act'(x)) in fp32 for ACTIVATION "silu", "gelu" (erf) or "gelu_tanh".

    Callers that need only act(x) leave act'(x) unused and the compiler drops it."""
    if ACTIVATION == "silu":
        s = tl.sigmoid(x)
        return x * s, s * (1.0 + x * (1.0 - s))
    elif ACTIVATION == "gelu":
        cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
        return x * cdf, cdf + x * 0.3989422804014327 * tl.exp(-0.5 * x * x)
    else:
        # tanh(u) = 2 * sigmoid(2u) - 1: saturates to +-1 without overflow
        inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        t = 2.0 * tl.sigmoid(2.0 * inner) - 1.0
        d_inner = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * x * x)
        return 0.5 * x * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * d_inner


@triton.jit
def _find_row_tile(offsets_ptr, E, tile, BLOCK_M: tl.constexpr, EXPERT_CHUNK: tl.constexpr):
    """(expert, first row of this tile) for global row tile `tile` of the expert-grouped rows,
    where expert e owns cdiv(rows of e, BLOCK_M) consecutive tiles; expert == E when `tile` is
    past the last one. An O(E) scan of the offsets, far below the cost of one GEMM tile."""
    expert = tl.full([], 0, tl.int32)
    tiles_before = tl.full([], 0, tl.int64)
    tiles_seen = tl.full([], 0, tl.int64)
    for e0 in range(0, E, EXPERT_CHUNK):
        es = e0 + tl.arange(0, EXPERT_CHUNK)
        live = es < E
        lo = tl.load(offsets_ptr + es, mask=live, other=0)
        hi = tl.load(offsets_ptr + es + 1, mask=live, other=0)
        tiles = (hi - lo + BLOCK_M - 1) // BLOCK_M
        ends = tiles_seen + tl.cumsum(tiles, 0)
        before = live & (ends <= tile)
        expert += tl.sum(before.to(tl.int32), 0)
        tiles_before += tl.sum(tl.where(before, tiles, 0), 0)
        tiles_seen += tl.sum(tiles, 0)
    row0 = tl.load(offsets_ptr + expert) + (tile - tiles_before) * BLOCK_M
    return expert, row0


@triton.jit
def _grouped_gemm_kernel(
    a_ptr, index_ptr, b_ptr, offsets_ptr, c_ptr, h_ptr,
    N, O, D, E, index_div, rows_bucket,
    stride_am, stride_ad, stride_be, stride_bo, stride_bd, stride_cm, stride_co, stride_hm, stride_ho,
    GATHER: tl.constexpr, ACTIVATION: tl.constexpr, STORE_H: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EXPERT_CHUNK: tl.constexpr,
):
    """c[r, :O] = a[src(r), :D] @ b[e(r)][:O, :D]^T for the N expert-grouped rows r.

    - src(r) = index[r] // index_div if GATHER else r; e(r) from the int64 offsets [E+1].
    - ACTIVATION "none": a plain GEMM. Otherwise b[e] is [2*O, D] (gate rows, then up rows) and
      c[r, j] = act(gate[r, j]) * up[r, j]; with STORE_H, h[r, :2*O] = [gate | up] too.
    - Masked: rows past their expert's end, columns past O, the reduction tail past D (loaded as
      zeros). Rows past N are never touched; any strides, including 0.
    - UPCAST (set only under the interpreter, whose bf16 tl.dot is wrong) multiplies in fp32.
    - `rows_bucket` (N rounded up to a power of two) is only the autotune key.
    Cost: the operands of each tile once per K step (2*N*O*D flops, one read of every weight
    tile per row tile): compute-bound at real sizes.
    """
    pid = tl.program_id(0)
    num_pid_m = (N + BLOCK_M - 1) // BLOCK_M + tl.minimum(E, N)
    num_pid_n = (O + BLOCK_N - 1) // BLOCK_N
    # groups of GROUP_M row tiles sweep the column tiles together, so their weight tiles stay in L2
    group = GROUP_M * num_pid_n
    first_m = (pid // group) * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_m
    pid_n = (pid % group) // group_m

    expert, row0 = _find_row_tile(offsets_ptr, E, pid_m, BLOCK_M, EXPERT_CHUNK)
    if expert >= E:
        return
    row_end = tl.load(offsets_ptr + expert + 1)
    rows = row0 + tl.arange(0, BLOCK_M).to(tl.int64)
    row_mask = rows < row_end
    if GATHER:
        src = tl.load(index_ptr + rows, mask=row_mask, other=0).to(tl.int64) // index_div
    else:
        src = rows
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    col_mask = cols < O
    ks = tl.arange(0, BLOCK_K).to(tl.int64)

    a_ptrs = a_ptr + src[:, None] * stride_am + ks[None, :] * stride_ad
    b_ptrs = b_ptr + expert.to(tl.int64) * stride_be + cols[None, :] * stride_bo + ks[:, None] * stride_bd
    # the step along D in int64: a transposed operand's D stride can be the full row count
    a_step = tl.full([], BLOCK_K, tl.int64) * stride_ad
    b_step = tl.full([], BLOCK_K, tl.int64) * stride_bd
    up_shift = tl.full([], O, tl.int64) * stride_bo
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    acc_up = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k_mask = ks < D - k0
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        if ACTIVATION != "none":
            b_up = tl.load(b_ptrs + up_shift, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
            if UPCAST:
                b_up = b_up.to(tl.float32)
            acc_up = tl.dot(a, b_up, acc_up, input_precision=DOT_PRECISION)
        a_ptrs += a_step
        b_ptrs += b_step

    mask = row_mask[:, None] & col_mask[None, :]
    if ACTIVATION != "none":
        if STORE_H:
            h_ptrs = h_ptr + rows[:, None] * stride_hm + cols[None, :] * stride_ho
            tl.store(h_ptrs, acc.to(h_ptr.dtype.element_ty), mask=mask)
            tl.store(h_ptrs + tl.full([], O, tl.int64) * stride_ho, acc_up.to(h_ptr.dtype.element_ty), mask=mask)
        act, _ = activation(acc, ACTIVATION)
        acc = act * acc_up
    c_ptrs = c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_co
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grouped_wgrad_kernel(
    dy_ptr, a_ptr, index_ptr, offsets_ptr, dw_ptr,
    O, D, index_div, rows_bucket,
    stride_dym, stride_dyo, stride_am, stride_ad, stride_dwe, stride_dwo, stride_dwd,
    GATHER: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dw[e, :O, :D] = dy[rows of e, :O]^T @ a[src(rows of e), :D] for every expert e.

    - grid (cdiv(O, BLOCK_O) * cdiv(D, BLOCK_D), E); the expert's rows, from the int64 offsets,
      are the reduction dimension, walked BLOCK_K at a time (each program owns its tile: no
      atomics, the same result on every run).
    - src(r) = index[r] // index_div if GATHER else r. An expert with no rows writes zeros.
    - dw may be a strided view (e.g. the transpose of the weight it is the gradient of).
    - UPCAST and `rows_bucket` as in `_grouped_gemm_kernel`.
    Cost: 2*N*O*D flops; every dy and a row is read once per (O tile, D tile) of its expert.
    """
    pid = tl.program_id(0)
    expert = tl.program_id(1).to(tl.int64)
    num_pid_d = (D + BLOCK_D - 1) // BLOCK_D
    o_idx = (pid // num_pid_d) * BLOCK_O + tl.arange(0, BLOCK_O).to(tl.int64)
    d_idx = (pid % num_pid_d) * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    o_mask = o_idx < O
    d_mask = d_idx < D
    row_start = tl.load(offsets_ptr + expert)
    row_end = tl.load(offsets_ptr + expert + 1)
    acc = tl.full((BLOCK_O, BLOCK_D), 0.0, tl.float32)
    for r0 in range(row_start, row_end, BLOCK_K):
        rows = r0 + tl.arange(0, BLOCK_K).to(tl.int64)
        row_mask = rows < row_end
        if GATHER:
            src = tl.load(index_ptr + rows, mask=row_mask, other=0).to(tl.int64) // index_div
        else:
            src = rows
        dy_t = tl.load(dy_ptr + rows[None, :] * stride_dym + o_idx[:, None] * stride_dyo,
                       mask=o_mask[:, None] & row_mask[None, :], other=0.0)
        a = tl.load(a_ptr + src[:, None] * stride_am + d_idx[None, :] * stride_ad,
                    mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        if UPCAST:
            dy_t = dy_t.to(tl.float32)
            a = a.to(tl.float32)
        acc = tl.dot(dy_t, a, acc, input_precision=DOT_PRECISION)
    dw_ptrs = dw_ptr + expert * stride_dwe + o_idx[:, None] * stride_dwo + d_idx[None, :] * stride_dwd
    tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=o_mask[:, None] & d_mask[None, :])


def gemm_meta(config) -> dict:
    block_m, block_n, block_k, num_warps, num_stages = config
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8,
            "num_warps": num_warps, "num_stages": num_stages}


def wgrad_meta(config) -> dict:
    block_o, block_d, block_k, num_warps, num_stages = config
    return {"BLOCK_O": block_o, "BLOCK_D": block_d, "BLOCK_K": block_k,
            "num_warps": num_warps, "num_stages": num_stages}


def _shared_bytes(meta: dict, element_size: int, glu: bool) -> int:
    """Shared memory of the operand pipeline (the epilogue reuses it)."""
    if "BLOCK_M" in meta:
        tile = meta["BLOCK_M"] * meta["BLOCK_K"] + (2 if glu else 1) * meta["BLOCK_K"] * meta["BLOCK_N"]
    else:
        tile = (meta["BLOCK_O"] + meta["BLOCK_D"]) * meta["BLOCK_K"]
    return meta["num_stages"] * tile * element_size


def fits(meta: dict, element_size: int, glu: bool = False) -> bool:
    return _shared_bytes(meta, element_size, glu) <= SHARED_LIMIT


def default_gemm_config(rows: int, experts: int, element_size: int, glu: bool) -> dict:
    """The config used without tuning: wide tiles when experts get many rows, narrow row tiles
    when they get few (then most of a tall tile would be masked), small K steps for fp32."""
    if element_size == 4:
        return gemm_meta(GEMM_CONFIGS[3])
    if rows <= 64 * max(experts, 1):
        return gemm_meta(GEMM_CONFIGS[2] if not glu else GEMM_CONFIGS[3])
    return gemm_meta(GEMM_CONFIGS[1] if glu else GEMM_CONFIGS[0])


def default_wgrad_config(element_size: int) -> dict:
    return wgrad_meta(WGRAD_CONFIGS[2] if element_size == 4 else WGRAD_CONFIGS[1])


def _prune(configs, named_args, **kwargs):
    """Drop configs whose operand pipeline would not fit in shared memory for these dtypes."""
    element_size = named_args["a_ptr"].element_size()
    glu = kwargs.get("ACTIVATION", "none") != "none"
    kept = [c for c in configs if fits({**c.kwargs, "num_stages": c.num_stages}, element_size, glu)]
    return kept or configs[-1:]


def _autotune(configs, key):
    options = {"configs": configs, "key": key, "prune_configs_by": {"early_config_prune": _prune}}
    # an on-disk cache of tuning results (keyed by GPU, Triton version and kernel source) where
    # this Triton has one, so a new process does not retune
    if "cache_results" in inspect.signature(triton.autotune).parameters:
        options["cache_results"] = True
    return triton.autotune(**options)


def _as_config(meta: dict):
    meta = dict(meta)
    return triton.Config(meta, num_warps=meta.pop("num_warps"), num_stages=meta.pop("num_stages"))


grouped_gemm_tuned = _autotune(
    [_as_config(gemm_meta(c)) for c in GEMM_CONFIGS],
    key=["rows_bucket", "O", "D", "GATHER", "ACTIVATION", "STORE_H"],
)(_grouped_gemm_kernel)
grouped_wgrad_tuned = _autotune(
    [_as_config(wgrad_meta(c)) for c in WGRAD_CONFIGS], key=["rows_bucket", "O", "D", "GATHER"],
)(_grouped_wgrad_kernel)


def aot_specs():
    from ._triton import AotSpec

    specs = []
    for dtype, size in (("bf16", 2), ("fp16", 2), ("fp32", 4)):
        precision = "ieee"
        # the fused variants run in the MoE layer in 16-bit dtypes; fp32 compiles the plain GEMMs
        variants = [("none", False, False), ("none", True, False), ("silu", True, True), ("silu", True, False),
                    ("gelu", True, True), ("gelu_tanh", True, True)] if size == 2 else [("none", False, False)]
        for act, gather, store_h in variants:
            for config in GEMM_CONFIGS:
                meta = gemm_meta(config)
                if not fits(meta, size, act != "none"):
                    continue
                if act.startswith("gelu") and config != GEMM_CONFIGS[1]:
                    continue  # the GELU epilogues differ from SiLU's only in elementwise math
                specs.append(AotSpec(
                    f"grouped_gemm[{dtype},{act},GATHER={int(gather)},STORE_H={int(store_h)},"
                    f"{meta['BLOCK_M']}x{meta['BLOCK_N']}x{meta['BLOCK_K']}]",
                    _grouped_gemm_kernel,
                    {"a_ptr": f"*{dtype}", "index_ptr": "*i32", "b_ptr": f"*{dtype}", "offsets_ptr": "*i64",
                     "c_ptr": f"*{dtype}", "h_ptr": f"*{dtype}",
                     "N": "i32", "O": "i32", "D": "i32", "E": "i32", "index_div": "i32", "rows_bucket": "i32",
                     "stride_am": "i64", "stride_ad": "i64", "stride_be": "i64", "stride_bo": "i64",
                     "stride_bd": "i64", "stride_cm": "i64", "stride_co": "i64", "stride_hm": "i64",
                     "stride_ho": "i64",
                     "GATHER": "constexpr", "ACTIVATION": "constexpr", "STORE_H": "constexpr",
                     "UPCAST": "constexpr", "DOT_PRECISION": "constexpr", "BLOCK_M": "constexpr",
                     "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "GROUP_M": "constexpr",
                     "EXPERT_CHUNK": "constexpr"},
                    {"GATHER": gather, "ACTIVATION": act, "STORE_H": store_h, "UPCAST": False,
                     "DOT_PRECISION": precision, "BLOCK_M": meta["BLOCK_M"], "BLOCK_N": meta["BLOCK_N"],
                     "BLOCK_K": meta["BLOCK_K"], "GROUP_M": meta["GROUP_M"], "EXPERT_CHUNK": EXPERT_CHUNK},
                    num_warps=meta["num_warps"], num_stages=meta["num_stages"]))
        for gather in ((False, True) if size == 2 else (False,)):
            for config in WGRAD_CONFIGS:
                meta = wgrad_meta(config)
                if not fits(meta, size):
                    continue
                specs.append(AotSpec(
                    f"grouped_wgrad[{dtype},GATHER={int(gather)},{meta['BLOCK_O']}x{meta['BLOCK_D']}x{meta['BLOCK_K']}]",
                    _grouped_wgrad_kernel,
                    {"dy_ptr": f"*{dtype}", "a_ptr": f"*{dtype}", "index_ptr": "*i32", "offsets_ptr": "*i64",
                     "dw_ptr": f"*{dtype}", "O": "i32", "D": "i32", "index_div": "i32", "rows_bucket": "i32",
                     "stride_dym": "i64", "stride_dyo": "i64", "stride_am": "i64", "stride_ad": "i64",
                     "stride_dwe": "i64", "stride_dwo": "i64", "stride_dwd": "i64",
                     "GATHER": "constexpr", "UPCAST": "constexpr", "DOT_PRECISION": "constexpr",
                     "BLOCK_O": "constexpr", "BLOCK_D": "constexpr", "BLOCK_K": "constexpr"},
                    {"GATHER": gather, "UPCAST": False, "DOT_PRECISION": precision, "BLOCK_O": meta["BLOCK_O"],
                     "BLOCK_D": meta["BLOCK_D"], "BLOCK_K": meta["BLOCK_K"]},
                    num_warps=meta["num_warps"], num_stages=meta["num_stages"]))
    return specs
