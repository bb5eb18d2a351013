"""Benchmark the MoE ops and the FinTeamMoE layer against the reference and the peers, on the
roofline measured in the same run.

    python benchmarks/moe_dispatch.py                      # quick shapes on a CPU, full on a GPU
    python benchmarks/moe_dispatch.py --full --ops moe_experts --shapes mixtral-8x7b-tp2
    python benchmarks/moe_dispatch.py --providers reference,cpu,hf-eager --modes forward --tokens 1,16

Shape legend: T tokens, H hidden, I expert intermediate, E experts, K top-k, N = T*K routed rows.

Ops: gating (topk_gating), dispatch (the plan), permute, unpermute, grouped_gemm (the gate/up
GEMM: D=H, O=2I), moe_experts (the whole expert computation) and layer (FinTeamMoE, router
included). Modes: forward (under no_grad: inference), backward (the backward of one retained
forward), forward+backward. Each row gives the median time with p20-p80, the achieved GB/s
and TFLOP/s from the byte and FLOP counts below, the fraction of the roof (the larger of
bytes / measured bandwidth and FLOPs / measured matmul rate, over the time), the speed-up over
the reference and over the fastest peer in the same cell, and the peak memory of one call.
Inputs rotate through enough copies to span twice the last-level cache (within a memory
budget); a roof fraction above 100% says the data stayed in cache all the same.
Writes <out>/moe_dispatch.json (environment, ceilings, rows, skipped providers, targets),
moe_dispatch.txt (the table) and moe_dispatch.png (time against tokens).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from pathlib import Path

import torch

try:
    import finteam_kernels  # noqa: F401 - the installed package, with its compiled extension
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import harness  # noqa: E402
import providers  # noqa: E402
import shapes as shape_table  # noqa: E402
from finteam_kernels import reference  # noqa: E402
from shapes import MoEShape  # noqa: E402

OPS = ("gating", "dispatch", "permute", "unpermute", "grouped_gemm", "moe_experts", "layer")
WEIGHT_OPS = ("grouped_gemm", "moe_experts", "layer")
NO_BACKWARD = {"dispatch": "the plan is integer metadata: no gradient"}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_IDX, _ROUTE_W, _OFFSET = 4, 4, 8  # bytes of an int32 index, a float32 routing weight, an int64 offset


# --- what each op must move and compute at least (the roofline's numerators) ---


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


# --- inputs ---


class WeightBank:
    """The experts' and router's weights of each shape, made once per run and shared by every
    token count, routing and provider (random, scaled like an initialised layer)."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype, self._made = device, dtype, {}

    def get(self, s: MoEShape) -> dict[str, torch.Tensor]:
        if s.name not in self._made:
            self._made.clear()  # one shape's weights at a time: the full shapes are large
            E, H, I = s.num_experts, s.hidden, s.intermediate
            self._made[s.name] = {
                "w_gate_up_E2IH": self._random((E, 2 * I, H), H),
                "w_down_EHI": self._random((E, H, I), I),
                "router_EH": self._random((E, H), H),
            }
        return self._made[s.name]

    def _random(self, shape: tuple[int, ...], fan_in: int) -> torch.Tensor:
        return harness.random_tensor(shape, self.device, self.dtype, scale=fan_in**-0.5)


def make_inputs(op: str, s: MoEShape, T: int, routing: str, bank: WeightBank) -> providers.Inputs:
    device, dtype = bank.device, bank.dtype
    logits_TE = shape_table.router_logits(s, T, routing)
    routed = shape_table.route(s, logits_TE)
    plan = reference.dispatch(routed.ids_TK, s.num_experts)
    bias = shape_table.selection_bias(s)
    N = T * s.top_k
    inp = providers.Inputs(
        shape=s,
        logits_TE=logits_TE.to(device),
        expert_bias_E=None if bias is None else bias.to(device),
        ids_TK=routed.ids_TK.to(device),
        weights_TK=routed.weights_TK.to(device),
        plan=type(plan)(*(t.to(device) for t in plan)),
    )
    if op in ("permute", "moe_experts", "layer"):
        inp.x_TH = harness.random_tensor((T, s.hidden), device, dtype)
    if op == "unpermute":
        inp.y_NH = harness.random_tensor((N, s.hidden), device, dtype)
    if op == "grouped_gemm":
        inp.x_NH = harness.random_tensor((N, s.hidden), device, dtype)
    if op in ("grouped_gemm", "moe_experts", "layer"):
        weights = bank.get(s)
        inp.w_gate_up_E2IH = weights["w_gate_up_E2IH"]
        if op != "grouped_gemm":
            inp.w_down_EHI = weights["w_down_EHI"]
        if op == "layer":
            inp.router_EH = weights["router_EH"]
    return inp


def _clone(inp: providers.Inputs) -> providers.Inputs:
    """Another copy of the inputs at other addresses (same values), for cache rotation."""
    def copy(value):
        if isinstance(value, torch.Tensor):
            return value.clone()
        if isinstance(value, tuple) and hasattr(value, "_fields"):
            return type(value)(*(copy(v) for v in value))
        return value

    return dataclasses.replace(inp, **{f.name: copy(getattr(inp, f.name)) for f in dataclasses.fields(inp)})


def _tensor_bytes(inp: providers.Inputs) -> int:
    fields = (getattr(inp, f.name) for f in dataclasses.fields(inp))
    return sum(t.numel() * t.element_size() for t in fields if isinstance(t, torch.Tensor))


def rotation(inp: providers.Inputs, working_set: float, device: torch.device) -> list[providers.Inputs]:
    """The inputs and enough clones that rotating through them keeps calls out of the cache
    (`working_set`: the bytes one call touches), the clones within an eighth of the GPU's
    memory or 2 GiB of the host's."""
    copies = harness.rotation_copies(int(working_set), device)
    budget = torch.cuda.get_device_properties(device).total_memory // 8 if device.type == "cuda" else 2 << 30
    copies = max(1, min(copies, budget // max(1, _tensor_bytes(inp))))
    return [inp] + [_clone(inp) for _ in range(copies - 1)]


# --- timing one provider on one cell ---


def timed_function(calls: list[providers.Call], mode: str):
    """The function `measure` times for `mode`, rotating over one Call per input copy."""
    if mode == "forward":
        def forward(call: providers.Call):
            with torch.no_grad():
                return call.fn()

        return harness.cycle([lambda c=c: forward(c) for c in calls])
    if mode == "forward+backward":
        with torch.no_grad():  # the copies are clones: one output tells every gradient's shape
            grad = _grad_like(calls[0].fn())
        return harness.cycle([lambda c=c: torch.autograd.grad(c.fn(), c.grad_inputs, grad) for c in calls])
    outs = [c.fn() for c in calls]  # backward alone: one retained graph per copy
    grad = _grad_like(outs[0])
    return harness.cycle([
        lambda c=c, o=o: torch.autograd.grad(o, c.grad_inputs, grad, retain_graph=True) for c, o in zip(calls, outs)
    ])


def _grad_like(out: torch.Tensor) -> torch.Tensor:
    """A random incoming gradient (a real tensor: some peers reject stride-0 ones)."""
    return harness.random_tensor(tuple(out.shape), out.device, out.dtype)


def run_cell(provider, op, mode, copies, device, quick, memory) -> harness.Stats:
    calls = [provider.builders[op](inp, mode != "forward") for inp in copies]
    fn = timed_function(calls, mode)
    return harness.measure(fn, device, quick=quick, graph=provider.graph_safe, memory=memory)


# --- the run ---


@dataclasses.dataclass
class Plan:
    device: torch.device
    dtype: torch.dtype
    quick: bool
    ops: tuple[str, ...]
    modes: tuple[str, ...]
    shapes: dict[str, MoEShape]
    providers: set[str] | None  # None: every provider usable here
    tokens: tuple[int, ...] | None  # None: the mode's default counts
    routings: tuple[str, ...]
    memory: bool


def run(plan: Plan, roof: dict, log=print) -> tuple[list[dict], list[dict]]:
    """Measure every (op, mode, shape, T, routing) cell with every provider; rows and skips."""
    rows, skipped = [], []
    bank = WeightBank(plan.device, plan.dtype)
    itemsize = torch.empty((), dtype=plan.dtype).element_size()
    for s in plan.shapes.values():  # shape-major: each shape's weights are made once
        # Weights, their gradients and the activations of a training step: about 3x the weights.
        need = 3 * s.num_experts * s.expert_bytes(itemsize)
        for op in plan.ops:
            if op in WEIGHT_OPS and need > harness.free_memory(plan.device):
                reason = f"needs about {need / 2**30:.0f} GiB, {harness.free_memory(plan.device) / 2**30:.0f} GiB free"
                skipped.append({"op": op, "shape": s.name, "provider": "all", "reason": reason})
                continue
            usable, unusable = providers.for_op(op, plan.device, s)
            wanted = (lambda name: True) if plan.providers is None else plan.providers.__contains__
            usable = [p for p in usable if wanted(p.name)]
            skipped += [{"op": op, "shape": s.name, "provider": n, "reason": r} for n, r in unusable if wanted(n)]
            for mode in plan.modes:
                if mode != "forward" and op in NO_BACKWARD:
                    continue
                for T, routing in shape_table.cases(mode, plan.quick, plan.tokens):
                    if routing not in plan.routings or (op == "layer" and routing != "uniform"):
                        continue  # the layer routes with its own router: uniform only
                    rows += _run_cell_all(op, mode, s, T, routing, usable, bank, itemsize, roof, plan, skipped, log)
    return rows, _dedupe(skipped)


def _run_cell_all(op, mode, s, T, routing, usable, bank, itemsize, roof, plan, skipped, log) -> list[dict]:
    inp = make_inputs(op, s, T, routing, bank)
    hit = expected_experts_hit(s, T) if op == "layer" else int(torch.unique(inp.ids_TK).numel())
    nbytes, flops = cost(op, mode, s, T, hit, itemsize)
    copies = rotation(inp, cost(op, "forward", s, T, hit, itemsize)[0], plan.device)
    cell = {"op": op, "mode": mode, "shape": s.name, "routing": routing, "tokens": T, "experts_hit": hit}
    rows = []
    for provider in usable:
        if provider.forward_only and mode != "forward":
            skipped.append({"op": op, "shape": s.name, "provider": provider.name, "reason": "inference only: no backward"})
            continue
        too_slow = _too_slow(provider, op, mode, s, hit, itemsize, roof, plan.quick)
        if too_slow:
            skipped.append({**cell, "provider": provider.name, "reason": too_slow})
            continue
        try:
            stats = run_cell(provider, op, mode, copies, plan.device, plan.quick, plan.memory)
        except Exception as err:  # noqa: BLE001 - a provider that fails is reported, never fatal
            reason = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
            skipped.append({**cell, "provider": provider.name, "reason": reason})
            if plan.device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
            continue
        row = {**cell, "provider": provider.name, "kind": provider.kind, "copies": len(copies), **stats.to_dict()}
        row |= roofline(nbytes, flops, stats.median_ms, roof)
        rows.append(row)
        log(f"  {op:12s} {mode:16s} {s.name:17s} {routing:7s} T={T:<6d} {provider.name:16s} {stats.median_ms:10.3f} ms")
    _add_ratios(rows)
    return rows


def _too_slow(provider, op, mode, s, hit, itemsize, roof, quick) -> str | None:
    """Why a provider's known extra traffic would keep one call past twice the slow-call limit."""
    if provider.extra_bytes is None:
        return None
    extra = provider.extra_bytes(op, mode, s, hit, itemsize)
    seconds = extra / (roof["mem_gbs"] * 1e9)
    limit = 2 * (harness.QUICK if quick else harness.FULL)["slow_s"]
    if seconds <= limit:
        return None
    return f"not run: moves {extra / 1e9:.0f} GB more than the op needs, over {seconds:.0f} s a call at the measured bandwidth"


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


def _add_ratios(rows: list[dict]) -> None:
    """Speed-up of each row over the reference and over the fastest peer of the same cell."""
    ref = next((r["median_ms"] for r in rows if r["kind"] == "reference"), None)
    peers = [r["median_ms"] for r in rows if r["kind"] == "peer"]
    best_peer = min(peers) if peers else None
    for r in rows:
        r["vs_reference"] = ref / r["median_ms"] if ref else None
        r["vs_best_peer"] = best_peer / r["median_ms"] if best_peer else None
        r["best_peer"] = next((p["provider"] for p in rows if p["kind"] == "peer" and p["median_ms"] == best_peer), None)


def _dedupe(skipped: list[dict]) -> list[dict]:
    seen, out = set(), []
    for s in skipped:
        key = (s["op"], s["provider"], s["reason"])
        if key not in seen:
            seen.add(key)
            out.append(s)
    return out


# --- the issue's targets, judged on the rows of this run ---


@dataclasses.dataclass(frozen=True)
class Target:
    label: str
    op: str
    mode: str
    fraction: str  # "bandwidth_fraction" or "matmul_fraction"
    goal: float
    shape: str | None = None  # None: every shape, judged by the worst
    tokens: tuple[int, int] | None = None  # inclusive range; None: the largest count measured


TARGETS = (
    Target("experts, Mixtral TP-2 shard, 1 token: >= 80% of bandwidth", "moe_experts", "forward",
           "bandwidth_fraction", 0.80, "mixtral-8x7b-tp2", (1, 1)),
    Target("experts, Mixtral TP-2 shard, 1k-1.5k tokens: >= 60% of matmul", "moe_experts", "forward",
           "matmul_fraction", 0.60, "mixtral-8x7b-tp2", (1024, 1536)),
    Target("permute: >= 80% of bandwidth", "permute", "forward", "bandwidth_fraction", 0.80),
    Target("unpermute: >= 80% of bandwidth", "unpermute", "forward", "bandwidth_fraction", 0.80),
    Target("gating: >= 85% of bandwidth", "gating", "forward", "bandwidth_fraction", 0.85),
)


def _target_rows(t: Target, rows: list[dict]) -> list[dict]:
    cells = [r for r in rows if r["op"] == t.op and r["mode"] == t.mode and r["routing"] == "uniform"]
    if t.shape is not None:
        cells = [r for r in cells if r["shape"] == t.shape]
    if t.tokens is not None:
        return [r for r in cells if t.tokens[0] <= r["tokens"] <= t.tokens[1]]
    largest = {}
    for r in cells:
        largest[r["shape"]] = max(largest.get(r["shape"], 0), r["tokens"])
    return [r for r in cells if r["tokens"] == largest[r["shape"]]]


def judge_targets(rows: list[dict], on_gpu: bool) -> list[dict]:
    """For each target, the best of our backends on each cell, the worst cell over shapes, and
    (on a GPU only) whether it meets the goal; plus forward+backward against every peer."""
    results = []
    for t in TARGETS:
        cells = _target_rows(t, rows)
        by_cell: dict[tuple, dict] = {}
        for r in cells:
            key = (r["shape"], r["tokens"])
            entry = by_cell.setdefault(key, {"shape": r["shape"], "tokens": r["tokens"], "ours": None, "reference": None})
            if r["kind"] == "ours" and (entry["ours"] is None or r[t.fraction] > entry["ours"][t.fraction]):
                entry["ours"] = r
            if r["kind"] == "reference":
                entry["reference"] = r
        measured = [e for e in by_cell.values() if e["ours"] is not None]
        worst = min(measured, key=lambda e: e["ours"][t.fraction]) if measured else None
        ref_cells = [e for e in by_cell.values() if e["reference"] is not None]
        results.append({
            "target": t.label,
            "goal": t.goal,
            "ours": None if worst is None else {
                "fraction": worst["ours"][t.fraction], "provider": worst["ours"]["provider"],
                "shape": worst["shape"], "tokens": worst["tokens"], "vs_reference": worst["ours"]["vs_reference"],
            },
            "reference_fraction": min((e["reference"][t.fraction] for e in ref_cells), default=None),
            "met": (worst["ours"][t.fraction] >= t.goal) if (worst and on_gpu) else None,
        })
    results.append(_versus_peers(rows, on_gpu))
    return results


def _versus_peers(rows: list[dict], on_gpu: bool) -> dict:
    """forward+backward of the expert computation and the layer: our best against the best peer."""
    cells: dict[tuple, dict] = {}
    for r in rows:
        if r["mode"] == "forward+backward" and r["op"] in ("moe_experts", "layer") and r["kind"] in ("ours", "peer"):
            key = (r["op"], r["shape"], r["routing"], r["tokens"])
            best = cells.setdefault(key, {})
            if r["median_ms"] < best.get(r["kind"], (math.inf,))[0]:
                best[r["kind"]] = (r["median_ms"], r["provider"])
    pairs = [(k, v) for k, v in cells.items() if "ours" in v and "peer" in v]
    speedups = [v["peer"][0] / v["ours"][0] for _, v in pairs]
    return {
        "target": "forward+backward faster than every installed peer (experts and layer)",
        "goal": 1.0,
        "cells": len(pairs),
        "wins": sum(s > 1.0 for s in speedups),
        "worst_speedup": min(speedups, default=None),
        "met": (bool(pairs) and min(speedups) > 1.0) if on_gpu else None,
    }


# --- output ---


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def table(rows: list[dict], roof: dict) -> str:
    lines = [
        f"ceilings measured in this run: memory {roof['mem_gbs']:.1f} GB/s (copy {roof['copy_gbs']:.1f}, "
        f"gemv {roof['gemv_gbs']:.1f}), matmul {roof['matmul_tflops']:.2f} TFLOP/s"
    ]
    head = (f"{'shape':18s} {'routing':7s} {'T':>6s} {'provider':16s} {'median ms':>10s} {'p20-p80 ms':>19s} "
            f"{'GB/s':>7s} {'TFLOP/s':>7s} {'roof':>8s} {'x ref':>6s} {'x peer':>6s} {'peak MB':>8s}")
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["op"], r["mode"]), []).append(r)
    for (op, mode), group in groups.items():
        lines += ["", f"== {op} / {mode} ==", head]
        for r in group:
            roof_cell = f"{100 * r['roof_fraction']:.0f}% {'mma' if r['bound'] == 'compute' else 'mem'}"
            peak = None if r["peak_bytes"] is None else r["peak_bytes"] / 2**20
            lines.append(
                f"{r['shape']:18s} {r['routing']:7s} {r['tokens']:6d} {r['provider']:16s} {r['median_ms']:10.4g} "
                f"{r['p20_ms']:9.4g}-{r['p80_ms']:<9.4g} {r['gbs']:7.1f} {r['tflops']:7.3f} {roof_cell:>8s} "
                f"{_fmt(r['vs_reference'], '6.2f'):>6s} {_fmt(r['vs_best_peer'], '6.2f'):>6s} {_fmt(peak, '8.1f'):>8s}"
            )
    return "\n".join(lines)


def targets_text(results: list[dict], on_gpu: bool) -> str:
    lines = ["", "== targets " + ("(GPU: judged)" if on_gpu else "(CPU: ratios only, goals are for a GPU)") + " =="]
    for t in results:
        if "cells" in t:
            verdict = {True: "MET", False: "MISSED", None: ""}[t["met"]]
            lines.append(f"{t['target']}: {t['wins']}/{t['cells']} cells faster, worst x{_fmt(t['worst_speedup'], '.2f')} {verdict}")
            continue
        ours = t["ours"]
        ref = _fmt(t["reference_fraction"] and 100 * t["reference_fraction"], ".0f")
        if ours is None:
            lines.append(f"{t['target']}: no kernel backend measured here (reference {ref}%)")
            continue
        verdict = {True: "MET", False: "MISSED", None: ""}[t["met"]]
        lines.append(
            f"{t['target']}: {100 * ours['fraction']:.0f}% ({ours['provider']}, {ours['shape']}, T={ours['tokens']}, "
            f"x{_fmt(ours['vs_reference'], '.2f')} vs reference at {ref}%) {verdict}"
        )
    return "\n".join(lines)


def skipped_text(skipped: list[dict]) -> str:
    by_provider: dict[tuple[str, str], list[str]] = {}
    for s in skipped:
        by_provider.setdefault((s["provider"], s["reason"]), []).append(s["op"])
    lines = ["", "== skipped =="]
    lines += [f"{p:16s} {', '.join(sorted(set(ops)))}: {reason}" for (p, reason), ops in sorted(by_provider.items())]
    return "\n".join(lines)


# --- command line ---


def _csv(text: str | None, allowed=None, convert=str):
    if text is None:
        return None
    items = tuple(convert(x.strip()) for x in text.split(",") if x.strip())
    if allowed is not None:
        bad = [x for x in items if x not in allowed]
        if bad:
            raise SystemExit(f"unknown {', '.join(map(str, bad))}; choose from {', '.join(allowed)}")
    return items


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="scaled-down shapes (the default on a CPU)")
    size.add_argument("--full", action="store_true", help="the models' own shapes (the default on a GPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--ops", help=f"comma list of {', '.join(OPS)}")
    parser.add_argument("--modes", help=f"comma list of {', '.join(shape_table.MODES)}")
    parser.add_argument("--shapes", help=f"comma list of {', '.join(shape_table.SHAPES)}")
    parser.add_argument("--providers", help="comma list of provider names (default: every one usable here)")
    parser.add_argument("--tokens", help="comma list of token counts (default: per mode, see shapes.py)")
    parser.add_argument("--routings", help=f"comma list of {', '.join(shape_table.ROUTINGS)}")
    parser.add_argument("--out", type=Path, help="results folder (default: benchmarks/results/<device>-<date>/)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory call")
    parser.add_argument("--ceiling-mib", type=int, help="bytes the bandwidth ceilings stream (default: 4x the cache)")
    parser.add_argument("--no-plot", action="store_true")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    start = time.perf_counter()
    args = parse_args(argv)
    device = torch.device(args.device)
    quick = args.quick or (device.type != "cuda" and not args.full)
    names = _csv(args.shapes, tuple(shape_table.SHAPES))
    table_of_shapes = shape_table.shapes(quick)
    plan = Plan(
        device=device,
        dtype=DTYPES[args.dtype],
        quick=quick,
        ops=_csv(args.ops, OPS) or OPS,
        modes=_csv(args.modes, shape_table.MODES) or shape_table.MODES,
        shapes={n: table_of_shapes[n] for n in (names or table_of_shapes)},
        providers=set(_csv(args.providers)) if args.providers else None,
        tokens=_csv(args.tokens, convert=int),
        routings=_csv(args.routings, shape_table.ROUTINGS) or shape_table.ROUTINGS,
        memory=not args.no_memory,
    )
    env = harness.environment(device, packages=("megablocks", "grouped_gemm", "scattermoe", "vllm", "liger_kernel"))
    header = (
        f"{env['device_name']} ({device.type}, {env['cpu_threads']} threads), torch {torch.__version__}, "
        f"commit {env['git_commit']}, {env['date']}, {'quick' if quick else 'full'} shapes, {args.dtype}"
    )
    load, cores = env["load_average"], os.cpu_count() or 1
    if load is not None and load > cores:
        header += f"\nwarning: load average {load:.1f} on {cores} cores: other work shares this machine, timings are unreliable"
    print(header, flush=True)
    roof = harness.ceilings(device, quick=quick, stream_bytes=args.ceiling_mib and args.ceiling_mib << 20)
    rows, skipped = run(plan, roof, log=lambda line: print(line, file=sys.stderr, flush=True))
    on_gpu = device.type == "cuda"
    targets = judge_targets(rows, on_gpu)
    report = table(rows, roof) + "\n" + targets_text(targets, on_gpu) + "\n" + skipped_text(skipped)
    wall_s = time.perf_counter() - start
    report += f"\n\nwall time {wall_s:.0f} s"
    print(report)
    report = header + "\n" + report

    out = args.out or harness.default_out_dir(device)
    settings = {k: (sorted(v) if isinstance(v, set) else v) for k, v in dataclasses.asdict(plan).items() if k != "shapes"}
    settings |= {"device": str(device), "dtype": args.dtype, "argv": sys.argv[1:] if argv is None else list(argv)}
    payload = {
        "environment": env, "settings": settings, "shapes": {n: dataclasses.asdict(s) for n, s in plan.shapes.items()},
        "ceilings": roof, "rows": rows, "skipped": skipped, "targets": targets, "wall_s": wall_s,
    }
    written = [harness.write_results(out, "moe_dispatch", payload)]
    (out / "moe_dispatch.txt").write_text(report + "\n")
    written.append(out / "moe_dispatch.txt")
    if not args.no_plot:
        title = f"{env['device_name']}, {'quick' if quick else 'full'} shapes, {args.dtype}"
        uniform = [r for r in rows if r["routing"] == "uniform"]  # one line per provider: same routing throughout
        png = harness.plot_time_vs_tokens(uniform, out / "moe_dispatch.png", title)
        if png is not None:
            written.append(png)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
