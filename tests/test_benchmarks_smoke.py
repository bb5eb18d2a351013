"""The benchmark script runs end to end on a tiny subset, and its harness counts what it claims.

`benchmarks/moe_dispatch.py` is what users and the GPU check run to get numbers; a broken
script is found here, not on a rented GPU. The subset is small (one quick shape, two token
counts, three ops) so that the run stays well under a minute on a 2-core CPU.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import harness  # benchmarks/ is on the tests' path (pyproject.toml: pythonpath)
import providers
import shapes
from roofline import cost
from workload import WeightBank, make_inputs

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def test_script_writes_table_json_and_plot(tmp_path):
    import matplotlib  # noqa: F401  (the script plots; missing, the test is reported as a missing dependency)
    import transformers  # noqa: F401  (its hf-eager provider)

    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the script times real backends, never the interpreter
    # One thread: on a shared 2-core machine, two OpenMP threads per process turn every
    # parallel region into a wait for a descheduled thread; this test checks output, not speed.
    env["OMP_NUM_THREADS"] = "1"
    cmd = [
        sys.executable, str(BENCH / "moe_dispatch.py"), "--quick",
        "--ops", "gating,permute,moe_experts", "--shapes", "team-llama3-8b",
        "--modes", "forward,forward+backward", "--tokens", "1,16", "--routings", "uniform",
        "--providers", "reference,hf-eager,megablocks,vllm,aten-gemms",
        # fp32: bf16 GEMMs are emulated, and ~50x slower, on a CPU without AVX-512; this test
        # checks what the script writes, not the speed of one dtype.
        "--dtype", "fp32", "--ceiling-mib", "64", "--out", str(tmp_path),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=BENCH.parent)
    assert done.returncode == 0, done.stderr[-3000:]

    # The table: a block per (op, mode), with the reference and the transformers peer in it.
    out = done.stdout
    for block in ("== gating / forward ==", "== permute / forward+backward ==", "== moe_experts / forward+backward =="):
        assert block in out
    assert "ceilings measured in this run" in out
    assert "== targets" in out and "== skipped ==" in out

    payload = json.loads((tmp_path / "moe_dispatch.json").read_text())
    assert payload["environment"]["versions"]["torch"] == torch.__version__
    assert payload["ceilings"]["mem_gbs"] > 0 and payload["ceilings"]["matmul_tflops"] > 0
    rows = payload["rows"]
    cells = {(r["op"], r["mode"], r["tokens"], r["provider"]) for r in rows}
    assert ("moe_experts", "forward+backward", 16, "reference") in cells
    assert ("moe_experts", "forward", 1, "hf-eager") in cells
    # the GEMM yardstick times the training modes only, and its line is in the targets
    assert ("moe_experts", "forward+backward", 16, "aten-gemms") in cells
    assert ("moe_experts", "forward", 16, "aten-gemms") not in cells
    assert "time over the same GEMMs alone (aten-gemms)" in out
    for r in rows:
        assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["gbs"] > 0 and r["roof_fraction"] > 0
    # Peers that are not installed here are listed with a reason, never an error.
    skipped = {s["provider"]: s["reason"] for s in payload["skipped"]}
    for peer in ("megablocks", "vllm"):
        if not harness.has_module(peer):
            assert "not installed" in skipped[peer]
    assert not [s for s in payload["skipped"] if s["reason"].startswith("failed")]

    png = (tmp_path / "moe_dispatch.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_gemm_yardstick_runs_the_six_expert_gemms_and_nothing_else():
    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls.append(str(func.overloadpacket.__name__))
            return func(*args, **(kwargs or {}))

    s = shapes.QUICK_SHAPES["olmoe-1b-7b"]
    inp = make_inputs("moe_experts", s, 16, "empty", WeightBank(torch.device("cpu"), torch.float32))
    yardstick = next(p for p in providers.all_providers() if p.name == "aten-gemms")
    call = yardstick.builders["moe_experts"](inp, True)
    with Ops() as ops:
        y_NH = call.fn()
        grads = torch.autograd.grad(y_NH, call.grad_inputs, torch.ones_like(y_NH))
    gemms = [c for c in ops.calls if c == "mm"]
    assert len(gemms) == 6 * s.num_experts  # two forward and four backward per expert, empty ones too
    views_and_allocations = {"empty", "new_empty", "empty_like", "ones_like", "slice", "select", "t", "transpose", "detach"}
    assert set(ops.calls) - {"mm"} <= views_and_allocations, ops.calls
    assert [g.shape for g in grads] == [c.shape for c in call.grad_inputs]
    # an expert without rows gets zero weight gradients (the "empty" routing leaves most of them so)
    hit = torch.unique(inp.ids_TK).tolist()
    idle = [e for e in range(s.num_experts) if e not in hit]
    assert idle and all(grads[1][e].abs().sum() == 0 and grads[2][e].abs().sum() == 0 for e in idle)


def test_expert_weights_counted_only_for_experts_hit():
    # At one token the expert computation reads K experts' weights, not E: the byte count must
    # say so, or the 1-token bandwidth target would be judged against the wrong number.
    s = shapes.SHAPES["mixtral-8x7b-tp2"]
    one_token, _ = cost("moe_experts", "forward", s, 1, experts_hit=2, a=2)
    weights = 2 * s.expert_bytes()
    assert weights <= one_token < weights * 1.01
    _, flops = cost("moe_experts", "forward", s, 1024, experts_hit=8, a=2)
    assert flops == 6 * 1024 * s.top_k * s.hidden * s.intermediate


def test_training_costs_add_forward_and_backward():
    s = shapes.QUICK_SHAPES["team-llama3-8b"]
    for op in ("gating", "permute", "unpermute", "grouped_gemm", "moe_experts", "layer"):
        fwd = cost(op, "forward", s, 64, s.num_experts, 2)
        bwd = cost(op, "backward", s, 64, s.num_experts, 2)
        both = cost(op, "forward+backward", s, 64, s.num_experts, 2)
        assert both == pytest.approx((fwd[0] + bwd[0], fwd[1] + bwd[1]))
        assert bwd[0] > 0


def test_measure_orders_percentiles_and_counts_memory():
    x = torch.randn(256, 256)
    stats = harness.measure(lambda: x @ x, "cpu", budget={"warmup_s": 0.0, "min_time_s": 0.01, "min_reps": 5, "max_reps": 50})
    assert stats.reps >= 5 and stats.method == "wall-clock"
    assert stats.p20_ms <= stats.median_ms <= stats.p80_ms
    if stats.peak_bytes is not None:  # the output alone is 256 KiB
        assert stats.peak_bytes >= 256 * 256 * 4


def test_interleaved_providers_never_read_a_copy_another_just_read(monkeypatch):
    # Providers timed in rounds on shared input copies: between two reads of one copy, at least
    # twice the cache of other copies is read, whichever providers read them.
    monkeypatch.setattr(harness, "cache_bytes", lambda device: 32 << 20)
    nbytes, providers = 44 << 20, 4
    copies, stride = harness.interleaved_copies(nbytes, providers, "cpu")
    reads = []  # copy indices in the order harness.interleaved calls them
    harness.interleaved({p: harness.cycle([lambda c=c: reads.append(c) for c in range(copies)], start=p * stride)
                         for p in range(providers)})
    assert len(reads) > 2 * copies
    last = {}
    for i, c in enumerate(reads):
        if c in last:
            assert (i - last[c] - 1) * nbytes >= 2 * (32 << 20), f"copy {c} read again after {i - last[c] - 1} others"
        last[c] = i


@pytest.mark.parametrize("routing", shapes.ROUTINGS)
def test_routings_have_their_shape(routing):
    s = shapes.QUICK_SHAPES["olmoe-1b-7b"]
    ids = shapes.route(s, shapes.router_logits(s, 512, routing)).ids_TK
    counts = torch.bincount(ids.flatten().long(), minlength=s.num_experts)
    if routing == "empty":  # only the first E/4 experts may win
        assert counts[s.num_experts // 4 :].sum() == 0
    elif routing == "skewed":  # expert 0 is the most popular, far above the mean
        assert counts.argmax() == 0 and counts[0] > 3 * counts.float().mean()
    else:  # every expert gets some of the 4096 assignments
        assert (counts > 0).all()


def test_tiny_mixtral_script_compares_eager_and_finteam(tmp_path):
    import transformers  # noqa: F401  (the script builds transformers' Mixtral)

    # The model-level numbers of the layer's documentation come from this script: it must run,
    # time both providers and find the two models' logits equal in fp32.
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, str(BENCH / "tiny_mixtral.py"), "--batch", "1", "--seq", "16", "--out", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=BENCH.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "finteam / eager" in done.stdout
    payload = json.loads((tmp_path / "tiny_mixtral_float32.json").read_text())
    assert payload["max_logit_diff"]["finteam vs eager"] < 1e-4
    timed = {(r["mode"], r["provider"]) for r in payload["rows"] if "median_ms" in r}
    assert timed == {(m, p) for m in ("forward", "forward+backward") for p in ("eager", "finteam")}
