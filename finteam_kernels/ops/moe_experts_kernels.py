"""Triton kernel of the MoE experts' backward between its GEMMs: the gated unit's gradient.

Shape legend: T tokens, I expert intermediate, K top-k, N = T*K routed rows (grouped by expert).

The forward kept h = [gate | up] (the gate/up GEMM's output) and nothing after it; this kernel
recomputes a = act(gate) * up from h (cheaper than keeping a), and with
g_r = grad_out[token(r)] @ W_down[e(r)] (the gradient of the unweighted expert output, from the
backward's first GEMM) and w_r the routing weight of row r's slot:
    d out / d w_slot = <grad_out[token], W_down[e] a_r> = <g_r, a_r>   (so y = W_down a is never kept)
    d a_r = w_r * g_r,  d gate = d a_r * up * act'(gate),  d up = d a_r * act(gate)
    W_down's gradient is grad_out^T @ (w * a): the kernel writes w_r * a_r for it.
"""
import triton
import triton.language as tl

from ._jit import store
from .grouped_gemm_kernels import activation


@triton.jit
def _glu_backward_kernel(
    h_ptr, g_ptr, slot_ptr, weights_ptr, dh_ptr, wa_ptr, grad_weights_ptr,
    N, I, stride_hm, stride_hi, stride_gm, stride_gi, stride_dhm, stride_wam,
    ACTIVATION: tl.constexpr, INTERPRETED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr,
):
    """For routed row r, with s = slot[r], w = weights[s], gate = h[r, :I], up = h[r, I:]:
        a = act(gate) * up,  dh[r] = [w*g*up*act'(gate) | w*g*act(gate)],  wa[r] = w * a,
        grad_weights[s] = sum_i g[r, i] * a_i.
    - One program per BLOCK_R rows walks I in BLOCK_I chunks and reduces its rows' dot products
      itself: no atomics. `slot` is a permutation of [0, N), so each grad_weights entry is
      written exactly once.
    - weights and grad_weights are contiguous [N] (indexed by slot); dh and wa have unit column
      stride. wa may be g itself: each element of g is read before the same program overwrites it.
    - fp32 math, every output rounded once to its dtype (INTERPRETED: see `_jit.store`).
    Cost: memory-bound, one read of h and g, one write of dh and wa (6*N*I elements).
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < N
    slots = tl.load(slot_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    weight = tl.load(weights_ptr + slots, mask=row_mask, other=0.0).to(tl.float32)[:, None]
    up_shift = tl.full([], I, tl.int64) * stride_hi
    dot = tl.full([BLOCK_R, BLOCK_I], 0.0, tl.float32)
    for i0 in range(0, I, BLOCK_I):
        cols = i0 + tl.arange(0, BLOCK_I).to(tl.int64)
        mask = row_mask[:, None] & (cols < I)[None, :]
        h_ptrs = h_ptr + rows[:, None] * stride_hm + cols[None, :] * stride_hi
        gate = tl.load(h_ptrs, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(h_ptrs + up_shift, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + rows[:, None] * stride_gm + cols[None, :] * stride_gi, mask=mask, other=0.0)
        g = g.to(tl.float32)
        act, act_grad = activation(gate, ACTIVATION)
        a = act * up
        dot += g * a
        da = weight * g
        dh_ptrs = dh_ptr + rows[:, None] * stride_dhm + cols[None, :]
        store(dh_ptrs, da * up * act_grad, mask, INTERPRETED)
        store(dh_ptrs + I, da * act, mask, INTERPRETED)
        store(wa_ptr + rows[:, None] * stride_wam + cols[None, :], weight * a, mask, INTERPRETED)
    store(grad_weights_ptr + slots, tl.sum(dot, 1), row_mask, INTERPRETED)


def launch_config(I: int) -> dict:
    """About 2048 elements per program and step (8 per thread): whole rows when I is small,
    512-wide steps along I otherwise."""
    block_i = min(512, max(16, 1 << (I - 1).bit_length()))
    return {"BLOCK_R": 2048 // block_i, "BLOCK_I": block_i, "num_warps": 8, "num_stages": 1}


def aot_specs():
    from .grouped_gemm_kernels import aot_spec

    signature = {
        "h_ptr": "*{t}", "g_ptr": "*{t}", "slot_ptr": "*i32", "weights_ptr": "*fp32", "dh_ptr": "*{t}",
        "wa_ptr": "*{t}", "grad_weights_ptr": "*fp32", "N": "i32", "I": "i32", "stride_hm": "i64",
        "stride_hi": "i64", "stride_gm": "i64", "stride_gi": "i64", "stride_dhm": "i64", "stride_wam": "i64",
    }
    specs = []
    # (dtype, routing weights' dtype, activation): every activation in bf16, then the other dtypes
    for dtype, weights, act in (("bf16", "fp32", "silu"), ("bf16", "fp32", "gelu"), ("bf16", "fp32", "gelu_tanh"),
                                ("bf16", "bf16", "silu"), ("fp16", "fp32", "silu"), ("fp32", "fp32", "silu")):
        sig = {**signature, "weights_ptr": f"*{weights}", "grad_weights_ptr": f"*{weights}"}
        specs.append(aot_spec(f"{act},weights {weights}", _glu_backward_kernel, sig, dtype, ("stride_hi", "stride_gi"),
                              {"ACTIVATION": act, "INTERPRETED": False},
                              launch_config(4096)))
    return specs
