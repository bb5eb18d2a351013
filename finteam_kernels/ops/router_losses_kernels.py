"""Triton kernels of the router losses: per-program partial sums over the tokens, a one-program
fixed-order reduction of those partials, and the backward to the logits.

Shape legend: T tokens, E experts, K top-k, P partial-sum programs.
Float sums are never accumulated with atomics: each of the P programs sums its own rows, and
the finishing program adds the P partials in order, so the losses are the same on every run.
Expert counts are int32 atomics (exact, so their order does not matter). Rows are held as
[BLOCK_T, BLOCK_E] register tiles, as in `topk_gating_kernels` (same tile table).
"""
import triton
import triton.language as tl

from ._jit import store
from ._triton import AotSpec
from .topk_gating_kernels import gpu_tiles

FINISH_BLOCK_P = 32
FINISH_BLOCK_E = 128


@triton.jit
def _softmax_lse(x, row_ok):
    """Row softmax and logsumexp of a [BLOCK_T, BLOCK_E] fp32 tile (lanes outside E hold -inf),
    with torch's rules for a row whose max is +-inf: NaN probabilities, and the max as its
    logsumexp. Rows outside the tensor (row_ok False) give zeros."""
    row_max = tl.where(row_ok, tl.max(x, axis=1), 0.0)
    exps = tl.exp(x - row_max[:, None])
    total = tl.where(row_ok, tl.sum(exps, axis=1), 1.0)
    lse = tl.where(tl.abs(row_max) == float("inf"), row_max, row_max + tl.log(total))
    return exps / total[:, None], lse


@triton.jit
def _load_rows(logits_ptr, rows, lanes, T, E, stride_lt, stride_le):
    """fp32 tile of the logits at int64 `rows`; lanes outside E read -inf (no probability)."""
    ok = (rows < T)[:, None] & (lanes < E)[None, :]
    x = tl.load(logits_ptr + rows[:, None] * stride_lt + lanes[None, :].to(tl.int64) * stride_le,
                mask=ok, other=0.0).to(tl.float32)
    return tl.where((lanes < E)[None, :], x, -float("inf"))


@triton.jit
def _router_partials_kernel(
    logits_ptr, ids_ptr, prob_sums_ptr, lse_sq_sums_ptr, counts_ptr,
    T, E, K, stride_lt, stride_le, stride_it, stride_ik,
    WITH_PROBS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """Program p of P sums over row blocks p, p + P, p + 2P, ...:
      prob_sums[p, e]  = sum of softmax(logits[t])[e]     (fp32 [P, E], when WITH_PROBS)
      lse_sq_sums[p]   = sum of logsumexp(logits[t])^2    (fp32 [P], when WITH_PROBS)
      counts[e]       += how many of its ids[t, :] are e  (int32 [E], zeroed by the caller)
    logits [T, E] any float dtype and strides; ids [T, K] int32/int64 in [0, E).

    Cost: one read of the logits and the ids, P * (E + 1) floats written: memory-bound.
    """
    pid = tl.program_id(0)
    lanes = tl.arange(0, BLOCK_E)
    prob_sum = tl.zeros([BLOCK_T, BLOCK_E], tl.float32)
    lse_sq_sum = tl.zeros([BLOCK_T], tl.float32)
    count = tl.zeros([BLOCK_T, BLOCK_E], tl.int32)
    for start in range(pid * BLOCK_T, T, tl.num_programs(0) * BLOCK_T):
        rows = start + tl.arange(0, BLOCK_T).to(tl.int64)
        row_ok = rows < T
        if WITH_PROBS:
            probs, lse = _softmax_lse(_load_rows(logits_ptr, rows, lanes, T, E, stride_lt, stride_le), row_ok)
            prob_sum += tl.where(row_ok[:, None], probs, 0.0)
            lse_sq_sum += tl.where(row_ok, lse * lse, 0.0)
        for j in range(K):
            expert = tl.load(ids_ptr + rows * stride_it + j * stride_ik, mask=row_ok, other=-1)
            count += (lanes[None, :] == expert[:, None]).to(tl.int32)
    if WITH_PROBS:
        tl.store(prob_sums_ptr + pid * E + lanes, tl.sum(prob_sum, axis=0), mask=lanes < E)
        tl.store(lse_sq_sums_ptr + pid, tl.sum(lse_sq_sum, axis=0))
    counts = tl.sum(count, axis=0)
    tl.atomic_add(counts_ptr + lanes, counts, mask=(lanes < E) & (counts > 0), sem="relaxed")


@triton.jit
def _router_losses_finish_kernel(
    prob_sums_ptr, lse_sq_sums_ptr, counts_ptr, aux_ptr, z_ptr,
    P, T, E,
    BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """aux = E * sum_e (counts[e] / T) * (sum_p prob_sums[p, e] / T) and z = sum_p lse_sq_sums[p] / T,
    as the reference computes them, by one program in a fixed order (T >= 1).

    Cost: P * (E + 1) floats read by one program: a few microseconds for P = 512, E = 256.
    """
    aux = tl.zeros([BLOCK_E], tl.float32)
    for e0 in range(0, E, BLOCK_E):
        lanes = e0 + tl.arange(0, BLOCK_E)
        prob = tl.zeros([BLOCK_P, BLOCK_E], tl.float32)
        for p0 in range(0, P, BLOCK_P):
            parts = p0 + tl.arange(0, BLOCK_P)
            prob += tl.load(prob_sums_ptr + parts[:, None] * E + lanes[None, :],
                            mask=(parts < P)[:, None] & (lanes < E)[None, :], other=0.0)
        fraction = tl.load(counts_ptr + lanes, mask=lanes < E, other=0).to(tl.float32) / T
        aux += fraction * (tl.sum(prob, axis=0) / T)
    lse_sq = tl.zeros([BLOCK_P], tl.float32)
    for p0 in range(0, P, BLOCK_P):
        parts = p0 + tl.arange(0, BLOCK_P)
        lse_sq += tl.load(lse_sq_sums_ptr + parts, mask=parts < P, other=0.0)
    tl.store(aux_ptr, E * tl.sum(aux, axis=0))
    tl.store(z_ptr, tl.sum(lse_sq, axis=0) / T)


@triton.jit
def _router_losses_bwd_kernel(
    grad_aux_ptr, grad_z_ptr, logits_ptr, counts_ptr, grad_logits_ptr,
    T, E, stride_lt, stride_le,
    INTERPRETED: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """grad_logits[t, :] = softmax-backward of grad_aux * E * counts / T^2 (the aux loss through
    P_e; the counts carry no gradient) + grad_z * 2 * lse_t / T * softmax(logits[t]).

    grad_aux, grad_z 0-d fp32 (read on the device: no host sync); counts int32 [E] from the
    partials kernel; grad_logits contiguous [T, E] in its own dtype, rounded once (INTERPRETED: see
    `_jit.store`).
    Cost: one read of the logits, one write of their gradient: memory-bound.
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    lanes = tl.arange(0, BLOCK_E)
    row_ok = rows < T
    probs, lse = _softmax_lse(_load_rows(logits_ptr, rows, lanes, T, E, stride_lt, stride_le), row_ok)
    grad_aux = tl.load(grad_aux_ptr).to(tl.float32)
    grad_z = tl.load(grad_z_ptr).to(tl.float32)
    fraction = tl.load(counts_ptr + lanes, mask=lanes < E, other=0).to(tl.float32) / T
    grad_probs = (grad_aux * E * fraction / T)[None, :]
    grad = probs * (grad_probs - tl.sum(probs * grad_probs, axis=1)[:, None])
    grad += probs * (grad_z * 2.0 * lse / T)[:, None]
    store(grad_logits_ptr + rows[:, None] * E + lanes[None, :], grad, row_ok[:, None] & (lanes < E)[None, :],
          INTERPRETED)


def aot_specs():
    """Every tile of the shared tile table with fp32 and bf16 logits (fp16 compiles to the same
    code as bf16 but for the conversion of the load), the counts-only variant, the finisher."""
    specs = []
    for block_t, block_e, num_warps in gpu_tiles():
        tile = {"BLOCK_T": block_t, "BLOCK_E": block_e}
        for dtype, with_probs in (("fp32", True), ("bf16", True), ("fp32", False)):
            specs.append(AotSpec(
                f"router_partials[{dtype},WITH_PROBS={int(with_probs)},BLOCK_T={block_t},BLOCK_E={block_e}]",
                _router_partials_kernel,
                {"logits_ptr": f"*{dtype}", "ids_ptr": "*i32", "prob_sums_ptr": "*fp32", "lse_sq_sums_ptr": "*fp32",
                 "counts_ptr": "*i32", "T": "i32", "E": "i32", "K": "i32", "stride_lt": "i64", "stride_le": "i64",
                 "stride_it": "i64", "stride_ik": "i64",
                 "WITH_PROBS": "constexpr", "BLOCK_T": "constexpr", "BLOCK_E": "constexpr"},
                {"WITH_PROBS": with_probs, **tile}, num_warps=num_warps))
            if not with_probs:
                continue
            specs.append(AotSpec(
                f"router_losses_bwd[{dtype},BLOCK_T={block_t},BLOCK_E={block_e}]", _router_losses_bwd_kernel,
                {"grad_aux_ptr": "*fp32", "grad_z_ptr": "*fp32", "logits_ptr": f"*{dtype}", "counts_ptr": "*i32",
                 "grad_logits_ptr": f"*{dtype}", "T": "i32", "E": "i32", "stride_lt": "i64", "stride_le": "i64",
                 "INTERPRETED": "constexpr", "BLOCK_T": "constexpr", "BLOCK_E": "constexpr"},
                {"INTERPRETED": False, **tile}, num_warps=num_warps))
    specs.append(AotSpec(
        "router_losses_finish", _router_losses_finish_kernel,
        {"prob_sums_ptr": "*fp32", "lse_sq_sums_ptr": "*fp32", "counts_ptr": "*i32", "aux_ptr": "*fp32",
         "z_ptr": "*fp32", "P": "i32", "T": "i32", "E": "i32", "BLOCK_P": "constexpr", "BLOCK_E": "constexpr"},
        {"BLOCK_P": FINISH_BLOCK_P, "BLOCK_E": FINISH_BLOCK_E}))
    return specs
