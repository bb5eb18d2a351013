"""What each MoE op must move through memory and compute, at least, and where a measured time
stands against the ceilings measured in the same run (the roofline).

Shape legend: T tokens, H hidden, I expert intermediate, E experts, K top-k, N = T*K routed rows.
"""
from __future__ import annotations

import harness
from shapes import MoEShape

_IDX, _ROUTE_W, _OFFSET = 4, 4, 8  # bytes of an int32 index, a float32 routing weight, an int64 offset


def cost(op: str, mode: str, s: MoEShape, T: int, experts_hit: int, a: int) -> tuple[float, float]:
    """(bytes, FLOPs) one call must move through memory and compute, at least.

    Every input read once and every output written once (`a` bytes per activation or weight
    element). Weight reads count only the experts that tokens hit (`experts_hit` distinct
    experts: at T=1 that is K of them); weight gradients are written for all E experts (an
    empty expert's gradient is zeros, still written). FLOPs count the GEMMs only (2 per
    multiply-add; the elementwise work is noise beside them), and no recomputation.
    Backward modes read what the forward kept: the gate/up output h [N, 2I] for the experts.
    """
    E, K, H, I = s.num_experts, s.top_k, s.hidden, s.intermediate
    N = T * K
    hit_w = experts_hit * 3 * H * I * a  # gate/up [2I, H] + down [H, I] of each expert hit
    parts = {"forward": (0.0, 0.0), "backward": (0.0, 0.0)}
    if op == "gating":  # logits -> weights, ids, counts
        parts["forward"] = (T * E * 4 + T * K * (_ROUTE_W + _IDX) + E * _IDX, 0.0)
        parts["backward"] = (T * K * (_ROUTE_W + _IDX) + 2 * T * E * 4, 0.0)  # read dW, logits; write dlogits
    elif op == "dispatch":  # ids -> offsets, counts, row_to_slot, slot_to_row
        parts["forward"] = (N * _IDX + (E + 1) * _OFFSET + E * _IDX + 2 * N * _IDX, 0.0)
    elif op == "permute":  # x [T, H] -> x [N, H]: each token row read once, written K times
        parts["forward"] = (T * H * a + N * H * a + N * _IDX, 0.0)
        parts["backward"] = (N * H * a + T * H * a + N * _IDX, 0.0)
    elif op == "unpermute":  # y [N, H], weights -> out [T, H]
        parts["forward"] = (N * H * a + N * (_ROUTE_W + _IDX) + T * H * a, 0.0)
        # read dout and y (for dweights), write dy and dweights
        parts["backward"] = (T * H * a + 2 * N * H * a + N * (2 * _ROUTE_W + 2 * _IDX), 0.0)
    elif op == "grouped_gemm":  # x [N, H] @ w[e] [2I, H]^T -> [N, 2I]
        w_hit = experts_hit * 2 * I * H * a
        parts["forward"] = (N * H * a + w_hit + N * 2 * I * a, 2.0 * N * H * 2 * I)
        parts["backward"] = (N * 2 * I * a + N * H * a + w_hit + N * H * a + E * 2 * I * H * a, 4.0 * N * H * 2 * I)
    elif op in ("moe_experts", "layer"):
        fwd_bytes = 2 * T * H * a + T * K * (_ROUTE_W + _IDX) + hit_w
        bwd_bytes = 3 * T * H * a + N * 2 * I * a + hit_w + E * 3 * H * I * a + T * K * _ROUTE_W
        fwd_flops, bwd_flops = 6.0 * N * H * I, 12.0 * N * H * I
        if op == "layer":  # the router: logits = x @ W_r^T, then the gating above
            fwd_bytes += E * H * a + T * E * 4
            bwd_bytes += 2 * E * H * a + T * E * 4
            fwd_flops, bwd_flops = fwd_flops + 2.0 * T * H * E, bwd_flops + 4.0 * T * H * E
        parts = {"forward": (fwd_bytes, fwd_flops), "backward": (bwd_bytes, bwd_flops)}
    if mode == "forward+backward":
        return tuple(f + b for f, b in zip(parts["forward"], parts["backward"]))
    return parts[mode]


def expected_experts_hit(s: MoEShape, T: int) -> int:
    """Distinct experts that T tokens with uniform routing hit, on average (the layer routes
    itself, so its count is not known in advance)."""
    return min(s.num_experts, round(s.num_experts * (1 - (1 - s.top_k / s.num_experts) ** T)))


def roofline(nbytes: float, flops: float, ms: float, roof: dict) -> dict:
    mem_ms = nbytes / (roof["mem_gbs"] * 1e9) * 1e3
    mma_ms = flops / (roof["matmul_tflops"] * 1e12) * 1e3
    return {
        "bytes": nbytes,
        "flops": flops,
        "gbs": harness.gbs(nbytes, ms),
        "tflops": harness.tflops(flops, ms),
        "bound": "compute" if mma_ms > mem_ms else "memory",
        "roof_fraction": max(mem_ms, mma_ms) / ms if ms > 0 else None,
        "bandwidth_fraction": mem_ms / ms if ms > 0 else None,
        "matmul_fraction": mma_ms / ms if ms > 0 else None,
    }
