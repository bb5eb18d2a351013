"""Running the benchmark: every (op, mode, shape, tokens, routing) cell with every provider,
timed by the harness, with the speed-ups of each cell and the providers skipped (and why).

Shape legend: T tokens, H hidden, I expert intermediate, E experts, K top-k, N = T*K routed rows.
"""
from __future__ import annotations

import dataclasses

import torch

import harness
import providers
import shapes as shape_table
from roofline import cost, expected_experts_hit, roofline
from shapes import MoEShape
from workload import WeightBank, make_inputs, rotation

OPS = ("gating", "dispatch", "permute", "unpermute", "grouped_gemm", "moe_experts", "layer")
WEIGHT_OPS = ("grouped_gemm", "moe_experts", "layer")
NO_BACKWARD = {"dispatch": "the plan is integer metadata: no gradient"}


def timed_function(calls: list[providers.Call], mode: str, start: int = 0):
    """The function `measure` times for `mode`, rotating over one Call per input copy from
    calls[start]."""
    start %= len(calls)
    if mode == "forward":
        def forward(call: providers.Call):
            with torch.no_grad():
                return call.fn()

        return harness.cycle([lambda c=c: forward(c) for c in calls], start)
    if mode == "forward+backward":
        with torch.no_grad():  # the copies are clones: one output tells every gradient's shape
            grad = _grad_like(calls[0].fn())
        return harness.cycle([lambda c=c: torch.autograd.grad(c.fn(), c.grad_inputs, grad) for c in calls], start)
    outs = [c.fn() for c in calls]  # backward alone: one retained graph per copy
    grad = _grad_like(outs[0])
    return harness.cycle([
        lambda c=c, o=o: torch.autograd.grad(o, c.grad_inputs, grad, retain_graph=True) for c, o in zip(calls, outs)
    ], start)


def _grad_like(out: torch.Tensor) -> torch.Tensor:
    """A random incoming gradient (a real tensor: some peers reject stride-0 ones)."""
    return harness.random_tensor(tuple(out.shape), out.device, out.dtype)


def run_cell(provider, op, mode, copies, device, quick, memory) -> harness.Stats:
    calls = [provider.builders[op](inp, mode != "forward") for inp in copies]
    fn = timed_function(calls, mode)
    return harness.measure(fn, device, quick=quick, graph=provider.graph_safe, memory=memory)


def run_cell_interleaved(runnable, op, mode, copies, device, quick, memory) -> tuple[dict, dict]:
    """Every provider of a cell timed in alternating rounds (harness.interleaved): on a CPU the
    memory bandwidth drifts by tens of percent within seconds, and providers timed one after
    the other were measured 0.49x and then 1.06x the reference in the same cell. Provider p
    starts at copy p * len(copies) // providers, so that no provider reads a copy another one
    has just brought into the cache. Returns ({name: Stats}, {name: why it failed})."""
    fns, failed = {}, {}
    stride = max(1, len(copies) // max(1, len(runnable)))
    for p, provider in enumerate(runnable):
        try:
            calls = [provider.builders[op](inp, mode != "forward") for inp in copies]
            fn = timed_function(calls, mode, start=p * stride)
            fn()  # fails here, alone, rather than inside the rounds
        except Exception as err:  # noqa: BLE001 - a provider that fails is reported, never fatal
            failed[provider.name] = _failure(err)
            continue
        fns[provider.name] = fn
    stats = harness.interleaved(fns, quick) if fns else {}
    if memory:
        for name, fn in fns.items():
            stats[name].peak_bytes = harness.peak_memory(fn, device)
    return stats, failed


def _failure(err: Exception) -> str:
    return f"failed: {type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"


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
    runnable = []
    for provider in usable:
        if provider.forward_only and mode != "forward":
            skipped.append({"op": op, "shape": s.name, "provider": provider.name, "reason": "inference only: no backward"})
            continue
        if provider.training_only and mode == "forward":
            skipped.append({"op": op, "shape": s.name, "provider": provider.name,
                            "reason": "a yardstick of training GEMMs: backward modes only"})
            continue
        too_slow = _too_slow(provider, op, mode, s, hit, itemsize, roof, plan.quick)
        if too_slow:
            skipped.append({**cell, "provider": provider.name, "reason": too_slow})
            continue
        runnable.append(provider)
    if plan.device.type == "cpu":
        results, failed = run_cell_interleaved(runnable, op, mode, copies, plan.device, plan.quick, plan.memory)
    else:  # a GPU's rate holds still: each provider alone, CUDA graphs where they are safe
        results, failed = {}, {}
        for provider in runnable:
            try:
                results[provider.name] = run_cell(provider, op, mode, copies, plan.device, plan.quick, plan.memory)
            except Exception as err:  # noqa: BLE001 - a provider that fails is reported, never fatal
                failed[provider.name] = _failure(err)
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
    skipped += [{**cell, "provider": name, "reason": reason} for name, reason in failed.items()]
    rows = []
    for provider in runnable:
        if provider.name not in results:
            continue
        stats = results[provider.name]
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
