"""Triton kernels of top-k gating: score, select, weight and count in one pass over the logits,
and the backward that recomputes the scores from the logits.

Shape legend: T tokens, E experts, K top-k.

A program holds a [BLOCK_T, BLOCK_E] tile of whole rows in registers (BLOCK_E = E rounded up to
a power of two, BLOCK_T rows so that each thread holds about 8 elements), so every row reduction
stays on chip and the logits are read once. Selection is K rounds of one int64 max per row over
a key that packs the fp32 value (order-preserving bits) above the inverted expert index: the
largest key is the largest value, and among equal values the lowest index, which is the
reference's stable-sort tie rule. Row indices are int64 before they multiply a stride.

The forward's scores are rounded as PyTorch rounds them on a GPU, so that near-ties pick the
reference's experts: exp is CUDA's expf (libdevice, as `torch.softmax`/`torch.sigmoid` call it)
and divisions round to nearest (`div_rn`). Compiled, Triton's own `tl.exp` is `ex2.approx` and
its fp32 `/` is `div.full`, each a few ulps off; the interpreter computes both exactly, which is
why only compiled code could disagree. Under the interpreter (no libdevice) exp is numpy's. The
backward, which selects nothing, keeps the fast forms (libdevice's expf costs it registers:
a stack frame at BLOCK_E=2048 on sm_90).
"""
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ._jit import store
from ._triton import AotSpec, interpreting, next_pow2

MAX_EXPERTS = 4096
_ELEMENTS_PER_THREAD = 8
# The interpreter runs programs one after another through numpy: bigger tiles, fewer programs.
_INTERPRETER_TILE = 65536

_FLT_MAX = tl.constexpr(3.4028234663852886e38)
_FLT_TINY = tl.constexpr(1.1754943508222875e-38)
_NONE = tl.constexpr(-(2**63))  # below every key: a lane that may not be picked


def _gpu_tile(block_e: int) -> tuple[int, int]:
    """(BLOCK_T, num_warps) on a GPU for rows of BLOCK_E lanes: about 8 elements per thread, so
    the tile, its int64 keys and ranks stay in registers."""
    # 16 warps at 4096 lanes spill on sm_80 (ptxas caps the registers); 32 warps do not
    num_warps = max(4, block_e // 256) if block_e < 4096 else 32
    return max(1, num_warps * 32 * _ELEMENTS_PER_THREAD // block_e), num_warps


def gpu_tiles() -> list[tuple[int, int, int]]:
    """Every (BLOCK_T, BLOCK_E, num_warps) that `row_tile` can pick on a GPU."""
    tiles = []
    for n in range(3, MAX_EXPERTS.bit_length()):
        block_t, num_warps = _gpu_tile(1 << n)
        tiles.append((block_t, 1 << n, num_warps))
    return tiles


def row_tile(num_experts: int, op: str) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_E, num_warps) of the row kernels of `op` for E experts."""
    if num_experts > MAX_EXPERTS:
        raise ValueError(f"{op}: the triton backend handles at most {MAX_EXPERTS} experts; got E={num_experts} "
                         "(use backend='reference')")
    block_e = max(8, next_pow2(num_experts))
    block_t, num_warps = _gpu_tile(block_e)
    if interpreting():
        block_t = max(1, _INTERPRETER_TILE // block_e)
    return block_t, block_e, num_warps


@triton.jit
def _nan_to_num(x):
    """torch.nan_to_num(x, nan=-inf): NaN becomes -inf and +-inf the largest finite +-float."""
    x = tl.where(x == float("inf"), _FLT_MAX, x)
    x = tl.where(x == -float("inf"), -_FLT_MAX, x)
    return tl.where(x != x, -float("inf"), x)


@triton.jit
def _sort_key(value, index):
    """An int64 per lane, largest for the largest fp32 `value` (never NaN) and, among equal values,
    for the lowest `index` (< 2**31). -0.0 is made +0.0 first, since the two compare equal."""
    bits = tl.where(value == 0.0, 0, value.to(tl.int32, bitcast=True))
    bits = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return (bits.to(tl.int64) << 32) | (0x7FFFFFFF - index).to(tl.int64)


@triton.jit
def _key_value(key):
    """The fp32 value a `_sort_key` was made from."""
    bits = (key >> 32).to(tl.int32)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.float32, bitcast=True)


@triton.jit
def _exp(x, AS_TORCH: tl.constexpr):
    """e**x; AS_TORCH (compiled only): rounded as CUDA's expf, the libdevice function, not
    Triton's ex2.approx."""
    if AS_TORCH:
        return libdevice.exp(x)
    return tl.exp(x)


@triton.jit
def _div(a, b, AS_TORCH: tl.constexpr):
    """a / b, b broadcast to a's shape; AS_TORCH: rounded to nearest, as IEEE division, not
    div.full."""
    if AS_TORCH:
        return tl.math.div_rn(a, tl.broadcast_to(b, a.shape))
    return a / b


@triton.jit
def _scores(x, lane_ok, sigmoid, AS_TORCH: tl.constexpr):
    """Scores of a tile of fp32 logits as `reference.topk_gating` defines them.

    NaN counts as -inf and +-inf as the largest finite +-float; a row with no finite logit is
    dead and scores 0 everywhere, as do lanes outside E (`lane_ok` False). Returns (scores,
    alive per row, finite per element): the backward needs the last two for its masks.
    AS_TORCH (compiled only): exp and division rounded as PyTorch's CUDA kernels round them.
    """
    finite = (tl.abs(x) < float("inf")) & lane_ok
    alive = tl.max(finite.to(tl.int32), axis=1) > 0
    x = tl.where(lane_ok, _nan_to_num(x), -float("inf"))
    if sigmoid:
        scores = _div(tl.full(x.shape, 1.0, tl.float32), 1.0 + _exp(-x, AS_TORCH), AS_TORCH)
    else:
        # A dead row's max may be -inf or the largest float: shifting by 0 keeps it NaN-free.
        row_max = tl.where(alive, tl.max(x, axis=1), 0.0)
        exps = _exp(x - row_max[:, None], AS_TORCH)
        scores = _div(exps, tl.where(alive, tl.sum(exps, axis=1), 1.0)[:, None], AS_TORCH)
    return tl.where(alive[:, None] & lane_ok, scores, 0.0), alive, finite


@triton.jit
def _keep_best_groups(choice, lanes, lane_ok, E, group_size, topk_groups):
    """DeepSeek-V3 group-limited routing on a tile of selection values: each group of
    `group_size` consecutive experts is rated by the sum of its two best values (its one value
    when groups have one expert), the `topk_groups` best groups are kept (lowest group first
    among equals), and the other experts become unselectable (-inf).

    Costs two row reductions per group and one per kept group, on top of the K of the
    selection: DeepSeek-V3's 8 groups of 32 cost about 3x the ungrouped selection.
    """
    if group_size == 1:
        rating = choice
    else:
        key = tl.where(lane_ok, _sort_key(choice, lanes), _NONE)
        rating = tl.zeros_like(choice)
        for start in range(0, E, group_size):
            in_group = (lanes >= start) & (lanes < start + group_size)
            best = tl.max(tl.where(in_group, key, _NONE), axis=1)
            second = tl.max(tl.where(in_group & (key != best[:, None]), key, _NONE), axis=1)
            rating = tl.where(in_group, (_key_value(best) + _key_value(second))[:, None], rating)
    # Lanes of one group share their key, so each round takes a whole group.
    group_key = tl.where(lane_ok, _sort_key(rating, lanes // group_size), _NONE)
    for _ in range(topk_groups):
        best = tl.max(group_key, axis=1)
        group_key = tl.where(group_key == best[:, None], _NONE, group_key)
    # Kept groups are the lanes whose key was taken (lanes outside E too: they are never picked).
    return tl.where(group_key == _NONE, choice, -float("inf"))


@triton.jit
def _topk_gating_fwd_kernel(
    logits_ptr, bias_ptr, weights_ptr, ids_ptr, counts_ptr,
    T, E, K, group_size, topk_groups, scaling,
    stride_lt, stride_le,
    sigmoid, has_bias, renormalize,
    INTERPRETED: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """weights[t, j], ids[t, j] = the j-th pick of token t; counts[e] += how many picked e.

    logits [T, E] in any float dtype and strides; bias contiguous fp32 [E] (read if has_bias);
    weights fp32 and ids int32, contiguous [T, K]; counts int32 [E], zeroed by the caller.
    One program per BLOCK_T rows; K <= E, and K <= topk_groups * group_size when grouped.
    Scores, selection values and weights in fp32. The counts are int32 atomics, one per expert
    picked in the tile: exact, so their order does not matter.

    Cost: one read of the logits, K*8 bytes written per token; compute is K row reductions
    (plus the group rating when group_size < E), small next to the read for E <= 512, K <= 8.
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    lanes = tl.arange(0, BLOCK_E)
    row_ok = rows < T
    lane_ok = (lanes < E)[None, :]
    x = tl.load(logits_ptr + rows[:, None] * stride_lt + lanes[None, :].to(tl.int64) * stride_le,
                mask=row_ok[:, None] & lane_ok, other=0.0).to(tl.float32)
    if INTERPRETED:  # no libdevice: numpy's exp and division, which round exactly
        scores, alive, _ = _scores(x, lane_ok, sigmoid, False)
    else:
        scores, alive, _ = _scores(x, lane_ok, sigmoid, True)

    bias = tl.zeros([BLOCK_E], tl.float32)
    if has_bias:
        bias = tl.load(bias_ptr + lanes, mask=lanes < E, other=0.0)
    choice = tl.where(alive[:, None], _nan_to_num(scores + bias[None, :]), 0.0)
    if group_size < E:
        choice = _keep_best_groups(choice, lanes[None, :], lane_ok, E, group_size, topk_groups)

    key = tl.where(lane_ok, _sort_key(choice, lanes[None, :]), _NONE)
    rank = tl.full([BLOCK_T, BLOCK_E], -1, tl.int32)
    for j in range(K):
        best = tl.max(key, axis=1)
        picked = key == best[:, None]
        rank = tl.where(picked, j, rank)
        key = tl.where(picked, _NONE, key)

    chosen = (rank >= 0) & row_ok[:, None]
    weights = tl.where(chosen, scores, 0.0)
    if renormalize:
        weights = _div(weights, tl.maximum(tl.sum(weights, axis=1), _FLT_TINY)[:, None], not INTERPRETED)
    weights = weights * scaling
    out = rows[:, None] * K + rank
    tl.store(weights_ptr + out, weights, mask=chosen)
    tl.store(ids_ptr + out, lanes[None, :], mask=chosen)
    counts = tl.sum(chosen.to(tl.int32), axis=0)
    tl.atomic_add(counts_ptr + lanes, counts, mask=(lanes < E) & (counts > 0), sem="relaxed")


@triton.jit
def _topk_gating_bwd_kernel(
    grad_weights_ptr, logits_ptr, ids_ptr, grad_logits_ptr,
    T, E, K, scaling,
    stride_gt, stride_gk, stride_lt, stride_le, stride_it, stride_ik,
    sigmoid, renormalize,
    INTERPRETED: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """grad_logits[t, :] from grad_weights[t, :] through the weighting, the gather at ids and the
    score function, recomputing the scores from the logits (nothing [T, E] is kept from the
    forward).

    grad_weights [T, K] any float dtype and strides (stride 0 too); logits [T, E] any strides;
    ids [T, K] int32/int64, distinct per row; grad_logits contiguous [T, E] in its own dtype,
    rounded once (INTERPRETED: see `_jit.store`).
    Non-finite logits and dead rows get zero gradient, as in the reference. The renormalisation's
    denominator is clamped at the smallest normal float; below it no gradient flows through the
    denominator (clamp_min's rule).

    Cost: one read of the logits, one write of their gradient, K*12 bytes read per token.
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    lanes = tl.arange(0, BLOCK_E)
    row_ok = rows < T
    lane_ok = (lanes < E)[None, :]
    x = tl.load(logits_ptr + rows[:, None] * stride_lt + lanes[None, :].to(tl.int64) * stride_le,
                mask=row_ok[:, None] & lane_ok, other=0.0).to(tl.float32)
    scores, alive, finite = _scores(x, lane_ok, sigmoid, False)

    grad = tl.zeros([BLOCK_T, BLOCK_E], tl.float32)
    chosen = tl.zeros([BLOCK_T, BLOCK_E], tl.int32)
    for j in range(K):
        expert = tl.load(ids_ptr + rows * stride_it + j * stride_ik, mask=row_ok, other=-1)
        grad_j = tl.load(grad_weights_ptr + rows * stride_gt + j * stride_gk, mask=row_ok, other=0.0)
        hit = lanes[None, :] == expert[:, None]
        grad = tl.where(hit, grad_j.to(tl.float32)[:, None], grad)
        chosen = tl.where(hit, 1, chosen)
    # With renormalisation the gradient to the scores is grad / denom: the division is taken on the
    # scores' side (ratio = scores / denom <= 1 on picked lanes), so that a row whose picked scores
    # underflow (denom clamped to the smallest normal) stays finite where the math is.
    grad = grad * scaling
    ratio = scores
    if renormalize:
        total = tl.sum(tl.where(chosen != 0, scores, 0.0), axis=1)
        ratio = scores / tl.maximum(total, _FLT_TINY)[:, None]
        through_total = tl.where(total >= _FLT_TINY, tl.sum(grad * ratio, axis=1), 0.0)
        grad = tl.where(chosen != 0, grad - through_total[:, None], 0.0)
    if sigmoid:
        grad = grad * ratio * (1.0 - scores)
    else:
        grad = grad * ratio - scores * tl.sum(grad * ratio, axis=1)[:, None]
    grad = tl.where(alive[:, None] & finite, grad, 0.0)
    store(grad_logits_ptr + rows[:, None] * E + lanes[None, :], grad, row_ok[:, None] & lane_ok, INTERPRETED)


def aot_specs():
    """Every tile `row_tile` can pick (E from 1 to MAX_EXPERTS), with fp32 and bf16 logits (fp16
    compiles to the same code as bf16 but for the conversion of the load)."""
    specs = []
    for block_t, block_e, num_warps in gpu_tiles():
        tile = {"BLOCK_T": block_t, "BLOCK_E": block_e}
        for dtype in ("fp32", "bf16"):
            specs.append(AotSpec(
                f"topk_gating_fwd[{dtype},BLOCK_T={block_t},BLOCK_E={block_e}]", _topk_gating_fwd_kernel,
                {"logits_ptr": f"*{dtype}", "bias_ptr": "*fp32", "weights_ptr": "*fp32", "ids_ptr": "*i32",
                 "counts_ptr": "*i32", "T": "i32", "E": "i32", "K": "i32", "group_size": "i32",
                 "topk_groups": "i32", "scaling": "fp32", "stride_lt": "i64", "stride_le": "i64",
                 "sigmoid": "i32", "has_bias": "i32", "renormalize": "i32",
                 "INTERPRETED": "constexpr", "BLOCK_T": "constexpr", "BLOCK_E": "constexpr"},
                {"INTERPRETED": False, **tile}, num_warps=num_warps, exact=True))
            specs.append(AotSpec(
                f"topk_gating_bwd[{dtype},BLOCK_T={block_t},BLOCK_E={block_e}]", _topk_gating_bwd_kernel,
                {"grad_weights_ptr": "*fp32", "logits_ptr": f"*{dtype}", "ids_ptr": "*i32",
                 "grad_logits_ptr": f"*{dtype}", "T": "i32", "E": "i32", "K": "i32", "scaling": "fp32",
                 "stride_gt": "i64", "stride_gk": "i64", "stride_lt": "i64", "stride_le": "i64",
                 "stride_it": "i64", "stride_ik": "i64", "sigmoid": "i32", "renormalize": "i32",
                 "INTERPRETED": "constexpr", "BLOCK_T": "constexpr", "BLOCK_E": "constexpr"},
                {"INTERPRETED": False, **tile}, num_warps=num_warps))
    return specs
