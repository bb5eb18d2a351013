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
  - row gather: row r reads `a[index[r] // index_div]` (the permute of tokens into expert order
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
import logging

import triton
import triton.language as tl

from ._jit import dot_operand, store

# Experts scanned per step when a program looks for its row tile (any E works; this is the chunk).
EXPERT_CHUNK = 128

# Config families, each a few (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) that compile
# with their pipeline intact, without register spills and, on sm_90, to wgmma (see aot_specs and
# tests/test_aot_compile.py): "plain" 16-bit GEMMs, "glu" (the gate/up GEMM, which holds two
# accumulators), "tf32" and "tf32_glu" (fp32 operands where PyTorch allows TF32: wgmma needs
# BLOCK_M >= 64, and a K step of 32 fp32 is the 16-bit families' 128 bytes), and "fp32" (exact
# fp32, FMA: no tensor core computes it).
GEMM_CONFIGS = {
    "plain": ((128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 3), (64, 64, 64, 4, 4)),
    "glu": ((128, 64, 32, 8, 4), (64, 128, 64, 8, 3), (64, 64, 32, 4, 4)),
    "tf32": ((128, 128, 32, 8, 3), (64, 128, 32, 4, 3), (64, 64, 32, 4, 4)),
    "tf32_glu": ((128, 64, 32, 8, 3), (64, 64, 32, 4, 4)),
    "fp32": ((32, 64, 32, 4, 3),),
}
# (BLOCK_O, BLOCK_D, BLOCK_K, num_warps, num_stages) of the weight gradient; BLOCK_K runs over rows.
WGRAD_CONFIGS = {
    "plain": ((128, 128, 64, 8, 3), (64, 128, 64, 4, 3), (64, 64, 64, 4, 4)),
    "tf32": ((128, 128, 32, 8, 3), (64, 64, 32, 4, 4)),
    "fp32": ((32, 64, 32, 4, 3),),
}


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
    GATHER: tl.constexpr, ACTIVATION: tl.constexpr, STORE_H: tl.constexpr, INTERPRETED: tl.constexpr,
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
    - INTERPRETED (set only under the interpreter) works around its bf16 traps: see `_jit`.
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
        a = dot_operand(tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0), INTERPRETED)
        b = dot_operand(tl.load(b_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0), INTERPRETED)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        if ACTIVATION != "none":
            b_up = tl.load(b_ptrs + up_shift, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
            acc_up = tl.dot(a, dot_operand(b_up, INTERPRETED), acc_up, input_precision=DOT_PRECISION)
        a_ptrs += a_step
        b_ptrs += b_step

    mask = row_mask[:, None] & col_mask[None, :]
    if ACTIVATION != "none":
        if STORE_H:
            h_ptrs = h_ptr + rows[:, None] * stride_hm + cols[None, :] * stride_ho
            store(h_ptrs, acc, mask, INTERPRETED)
            store(h_ptrs + tl.full([], O, tl.int64) * stride_ho, acc_up, mask, INTERPRETED)
        act, _ = activation(acc, ACTIVATION)
        acc = act * acc_up
    c_ptrs = c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_co
    store(c_ptrs, acc, mask, INTERPRETED)


@triton.jit
def _grouped_wgrad_kernel(
    dy_ptr, a_ptr, index_ptr, offsets_ptr, dw_ptr,
    O, D, E, index_div, rows_bucket,
    stride_dym, stride_dyo, stride_am, stride_ad, stride_dwe, stride_dwo, stride_dwd,
    GATHER: tl.constexpr, INTERPRETED: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dw[e, :O, :D] = dy[rows of e, :O]^T @ a[src(rows of e), :D] for every expert e.

    - grid (cdiv(O, BLOCK_O) * cdiv(D, BLOCK_D), E); the expert's rows, from the int64 offsets,
      are the reduction dimension, walked BLOCK_K at a time (each program owns its tile: no
      atomics, the same result on every run).
    - src(r) = index[r] // index_div if GATHER else r. An expert with no rows writes zeros.
      The index of the next row block is loaded one step ahead and carried through the loop:
      loaded in the step that uses it, it would make a gathered load depend on a load of the
      same step, and Triton's pipeliner then keeps fewer buffers (2 of 3 on sm_90, 1 of 2 on
      sm_80) and waits for every load at the top of the loop.
    - dw may be a strided view (e.g. the transpose of the weight it is the gradient of).
    - INTERPRETED and `rows_bucket` as in `_grouped_gemm_kernel`; E (the grid's second
      dimension) is only the autotune key.
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
    ks = tl.arange(0, BLOCK_K).to(tl.int64)
    if GATHER:
        src_next = tl.load(index_ptr + row_start + ks, mask=row_start + ks < row_end, other=0)
    for r0 in range(row_start, row_end, BLOCK_K):
        rows = r0 + ks
        row_mask = rows < row_end
        if GATHER:
            src = src_next.to(tl.int64) // index_div
            src_next = tl.load(index_ptr + rows + BLOCK_K, mask=rows + BLOCK_K < row_end, other=0)
        else:
            src = rows
        dy_t = tl.load(dy_ptr + rows[None, :] * stride_dym + o_idx[:, None] * stride_dyo,
                       mask=o_mask[:, None] & row_mask[None, :], other=0.0)
        a = tl.load(a_ptr + src[:, None] * stride_am + d_idx[None, :] * stride_ad,
                    mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        acc = tl.dot(dot_operand(dy_t, INTERPRETED), dot_operand(a, INTERPRETED), acc, input_precision=DOT_PRECISION)
    dw_ptrs = dw_ptr + expert * stride_dwe + o_idx[:, None] * stride_dwo + d_idx[None, :] * stride_dwd
    store(dw_ptrs, acc, o_mask[:, None] & d_mask[None, :], INTERPRETED)


def family(element_size: int, glu: bool = False, precision: str = "ieee") -> str:
    """The config family of a GEMM on operands of `element_size` bytes (see GEMM_CONFIGS)."""
    if element_size == 4:
        return ("tf32_glu" if glu else "tf32") if precision == "tf32" else "fp32"
    return "glu" if glu else "plain"


def gemm_meta(config) -> dict:
    block_m, block_n, block_k, num_warps, num_stages = config
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8,
            "num_warps": num_warps, "num_stages": num_stages}


def wgrad_meta(config) -> dict:
    block_o, block_d, block_k, num_warps, num_stages = config
    return {"BLOCK_O": block_o, "BLOCK_D": block_d, "BLOCK_K": block_k,
            "num_warps": num_warps, "num_stages": num_stages}


def default_gemm_config(name: str, rows: int, experts: int) -> dict:
    """The config used without tuning: tall row tiles when experts get many rows, short ones when
    they get few (then most of a tall tile would be masked)."""
    configs = GEMM_CONFIGS[name]
    few = rows <= 64 * max(experts, 1)
    if name == "plain":
        return gemm_meta(configs[2] if few else configs[0])
    if name in ("glu", "tf32", "tf32_glu"):
        return gemm_meta(configs[1] if few else configs[0])
    return gemm_meta(configs[0])


def default_wgrad_config(name: str, rows: int, experts: int) -> dict:
    """Wide tiles when each expert has enough rows to amortise them."""
    configs = WGRAD_CONFIGS[name]
    return wgrad_meta(configs[0] if len(configs) == 1 or rows >= 256 * max(experts, 1) else configs[1])


def _autotune(configs, key):
    options = {"configs": configs, "key": key}
    # an on-disk cache of tuning results (keyed by GPU, Triton version and kernel source) where
    # this Triton has one, so a new process does not retune
    if "cache_results" in inspect.signature(triton.autotune).parameters:
        options["cache_results"] = True
    return triton.autotune(**options)


def _as_config(meta: dict):
    meta = dict(meta)
    return triton.Config(meta, num_warps=meta.pop("num_warps"), num_stages=meta.pop("num_stages"))


# Run-time tuning, for shapes the tables lack. The keys cover what changes the best config: rows
# (bucketed), widths, E, the fused gather and epilogue, and the layout (a transposed operand's
# stride in its reduction dimension is not 1); the autotuner adds the dtypes.
GEMM_TUNED = {
    name: _autotune([_as_config(gemm_meta(c)) for c in configs],
                    key=["rows_bucket", "O", "D", "E", "GATHER", "ACTIVATION", "STORE_H", "stride_ad", "stride_bd",
                         "DOT_PRECISION"])(_grouped_gemm_kernel)
    for name, configs in GEMM_CONFIGS.items()
}
WGRAD_TUNED = {
    name: _autotune([_as_config(wgrad_meta(c)) for c in configs],
                    key=["rows_bucket", "O", "D", "E", "GATHER", "stride_dyo", "stride_ad", "stride_dwd",
                         "DOT_PRECISION"])(_grouped_wgrad_kernel)
    for name, configs in WGRAD_CONFIGS.items()
}


def _layout(*tensors_and_dims) -> str:
    """'.' per operand whose given dimension has unit stride (as stored), 't' otherwise."""
    return "".join("." if t.stride(dim) == 1 else "t" for t, dim in tensors_and_dims)


def gemm_problem(family_name: str, a, w_EOD, N: int, O: int, D: int, E: int, flags: dict) -> str:
    """The tables' key of one forward-kernel launch (see finteam_kernels.configs)."""
    from .. import configs

    return configs.problem_key(family=family_name, dtype=str(a.dtype).removeprefix("torch."), E=E, O=O, D=D,
                               layout=_layout((a, 1), (w_EOD, 2)), gather=flags["GATHER"], act=flags["ACTIVATION"],
                               h=flags["STORE_H"])


def wgrad_problem(family_name: str, dy, a, dw, O: int, D: int, E: int, flags: dict) -> str:
    """The tables' key of one weight-gradient launch."""
    from .. import configs

    return configs.problem_key(family=family_name, dtype=str(a.dtype).removeprefix("torch."), E=E, O=O, D=D,
                               layout=_layout((dy, 1), (a, 1), (dw, 2)), gather=flags["GATHER"])


# (kind, family, problem, rows bucket) -> the config run-time tuning chose in this process
_TUNED_HERE = {}

_log = logging.getLogger("finteam_kernels")


def _say_tuning(kind: str, family_name: str, problem: str, rows_bucket: int) -> None:
    """Run-time tuning times every config of a family, seconds for a new shape: say so, so that
    a first step that takes long does not look like a hang. Once a process as a warning, then at
    info level."""
    message = (f"finteam_kernels: tuning the grouped GEMM ({kind}, {family_name}) for {problem}, rows up to "
               f"{rows_bucket}: once per shape and row bucket, cached on disk where Triton can; "
               "FINTEAM_AUTOTUNE=0 takes the heuristic configs instead")
    if not _TUNED_HERE:
        _log.warning(message)
    else:
        _log.info(message)


def launch_config(kind: str, family_name: str, problem: str, rows: int, experts: int, device) -> dict | None:
    """The config of one launch of kernel `kind` ("gemm" or "wgrad"): the tuned table's entry
    for this GPU and problem; else what run-time tuning chose for it earlier in this process;
    else None, meaning "tune now", when tuning is on (FINTEAM_AUTOTUNE, not under the
    interpreter) and the stream is not capturing a CUDA graph (tuning runs and synchronises);
    else the family's heuristic. So a graph captured after an eager warm-up replays the configs
    of that warm-up."""
    import torch

    from .. import configs
    from ._triton import autotune_enabled, next_pow2

    meta = gemm_meta if kind == "gemm" else wgrad_meta
    tuned = configs.lookup(kind, device, problem, rows)
    if tuned is not None:
        return meta(tuned)
    earlier = _TUNED_HERE.get((kind, family_name, problem, next_pow2(rows)))
    if earlier is not None:
        return earlier
    if autotune_enabled() and not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return None
    if kind == "gemm":
        return default_gemm_config(family_name, rows, experts)
    return default_wgrad_config(family_name, rows, experts)


def launch(kind: str, family_name: str, problem: str, rows: int, experts: int, grid, args: tuple, flags: dict,
           device) -> None:
    """Launch `_grouped_gemm_kernel` (kind "gemm") or `_grouped_wgrad_kernel` ("wgrad") with
    the config `launch_config` picks, tuning it first when that says so."""
    from ._triton import next_pow2

    meta = launch_config(kind, family_name, problem, rows, experts, device)
    if meta is None:
        bucket = next_pow2(rows)
        _say_tuning(kind, family_name, problem, bucket)
        tuned = (GEMM_TUNED if kind == "gemm" else WGRAD_TUNED)[family_name]
        tuned[grid](*args, **flags)
        best = tuned.best_config
        _TUNED_HERE[(kind, family_name, problem, bucket)] = {
            **best.kwargs, "num_warps": best.num_warps, "num_stages": best.num_stages}
    else:
        kernel = _grouped_gemm_kernel if kind == "gemm" else _grouped_wgrad_kernel
        kernel[grid(meta)](*args, **flags, **meta)

_GEMM_SIGNATURE = {
    "a_ptr": "*{t}", "index_ptr": "*i32", "b_ptr": "*{t}", "offsets_ptr": "*i64", "c_ptr": "*{t}", "h_ptr": "*{t}",
    "N": "i32", "O": "i32", "D": "i32", "E": "i32", "index_div": "i32", "rows_bucket": "i32",
    "stride_am": "i64", "stride_ad": "i64", "stride_be": "i64", "stride_bo": "i64", "stride_bd": "i64",
    "stride_cm": "i64", "stride_co": "i64", "stride_hm": "i64", "stride_ho": "i64",
}
_WGRAD_SIGNATURE = {
    "dy_ptr": "*{t}", "a_ptr": "*{t}", "index_ptr": "*i32", "offsets_ptr": "*i64", "dw_ptr": "*{t}",
    "O": "i32", "D": "i32", "E": "i32", "index_div": "i32", "rows_bucket": "i32",
    "stride_dym": "i64", "stride_dyo": "i64", "stride_am": "i64", "stride_ad": "i64",
    "stride_dwe": "i64", "stride_dwo": "i64", "stride_dwd": "i64",
}
_UNALIGNED = ("N", "E", "index_div", "rows_bucket")  # row and expert counts: any value


def aot_spec(tags, fn, signature, dtype, unit_strides, constexprs, meta):
    """An AotSpec as a real launch compiles it: the unit strides become constexpr 1, pointers and
    the other sizes and strides are multiples of 16 (model widths are)."""
    from ._triton import AotSpec

    meta = dict(meta)
    num_warps, num_stages = meta.pop("num_warps"), meta.pop("num_stages")
    sig = {name: kind.format(t=dtype) for name, kind in signature.items()}
    sig.update({name: "constexpr" for name in (*unit_strides, *constexprs, *meta)})
    aligned = tuple(name for name, kind in sig.items() if kind != "constexpr" and name not in _UNALIGNED)
    blocks = "x".join(str(v) for k, v in meta.items() if k.startswith("BLOCK"))
    name = f"{fn.__name__.strip('_').removesuffix('_kernel')}[{tags},{dtype},{blocks},w{num_warps}s{num_stages}]"
    tensor_core = dtype != "fp32" or constexprs.get("DOT_PRECISION") == "tf32"
    return AotSpec(name, fn, sig,
                   {**{name: 1 for name in unit_strides}, **constexprs, **meta},
                   num_warps=num_warps, num_stages=num_stages, aligned=aligned, tensor_core=tensor_core)


def aot_specs():
    """Every config of every family, compiled for the variant that needs the most registers;
    the other variants (layouts, epilogues, dtypes) with the family's default config.

    The layouts are those the ops launch: x contiguous; w as stored ([E, O, D], "w") or
    transposed for the backward's dx = dy @ w[e] ("w^T"); the weight gradient written as stored
    or, for the down projection, transposed ("dw^T")."""
    b_layouts = {"w": ("stride_ad", "stride_bd", "stride_co", "stride_ho"),
                 "w^T": ("stride_ad", "stride_bo", "stride_co", "stride_ho")}
    dw_layouts = {"dw": ("stride_dyo", "stride_ad", "stride_dwd"), "dw^T": ("stride_dyo", "stride_ad", "stride_dwo")}
    # (family, dtype, dot precision, activation, GATHER, STORE_H, layout, every config?)
    gemms = [
        ("plain", "bf16", "ieee", "none", True, False, "w^T", True),  # moe backward: grad_out gathered @ W_down
        ("plain", "bf16", "ieee", "none", False, False, "w", False),
        ("plain", "bf16", "ieee", "none", False, False, "w^T", False),
        ("plain", "fp16", "ieee", "none", False, False, "w", False),
        ("glu", "bf16", "ieee", "silu", True, True, "w", True),
        ("glu", "bf16", "ieee", "silu", True, False, "w", False),
        ("glu", "bf16", "ieee", "gelu", True, True, "w", False),
        ("glu", "bf16", "ieee", "gelu_tanh", True, True, "w", False),
        ("glu", "fp16", "ieee", "silu", True, True, "w", False),
        ("fp32", "fp32", "ieee", "none", False, False, "w", False),
        ("fp32", "fp32", "ieee", "none", True, False, "w^T", False),
        ("fp32", "fp32", "ieee", "silu", True, True, "w", False),
        ("tf32", "fp32", "tf32", "none", True, False, "w^T", True),
        ("tf32", "fp32", "tf32", "none", False, False, "w", False),
        ("tf32_glu", "fp32", "tf32", "silu", True, True, "w", True),
    ]
    specs = []
    for name, dtype, precision, act, gather, store_h, layout, every in gemms:
        configs = GEMM_CONFIGS[name] if every else (GEMM_CONFIGS[name][0],)
        for config in configs:
            constexprs = {"GATHER": gather, "ACTIVATION": act, "STORE_H": store_h, "INTERPRETED": False,
                          "DOT_PRECISION": precision, "EXPERT_CHUNK": EXPERT_CHUNK}
            tags = f"{act},{layout}{',gather' if gather else ''}{',h' if store_h else ''},{precision}"
            specs.append(aot_spec(tags, _grouped_gemm_kernel, _GEMM_SIGNATURE, dtype, b_layouts[layout], constexprs,
                               gemm_meta(config)))
    # (family, dtype, GATHER, layout, every config?)
    wgrads = [
        ("plain", "bf16", True, "dw^T", True),  # moe backward: dW_down^T = (w*a)^T @ grad_out gathered
        ("plain", "bf16", True, "dw", False),
        ("plain", "bf16", False, "dw", False),
        ("plain", "fp16", False, "dw", False),
        ("fp32", "fp32", True, "dw", False),
        ("tf32", "fp32", True, "dw^T", True),
        ("tf32", "fp32", True, "dw", False),
    ]
    for name, dtype, gather, layout, every in wgrads:
        configs = WGRAD_CONFIGS[name] if every else (WGRAD_CONFIGS[name][0],)
        for config in configs:
            constexprs = {"GATHER": gather, "INTERPRETED": False, "DOT_PRECISION": "tf32" if name == "tf32" else "ieee"}
            tags = f"{layout}{',gather' if gather else ''},{constexprs['DOT_PRECISION']}"
            specs.append(aot_spec(tags, _grouped_wgrad_kernel, _WGRAD_SIGNATURE, dtype, dw_layouts[layout], constexprs,
                               wgrad_meta(config)))
    return specs
