"""pytest-benchmark tests over a few quick shapes, so that regressions show up in
`pytest --benchmark-compare`. The numbers users read come from `moe_dispatch.py`; these are
its cells, small enough to rerun on every change.

They are not part of the test suite's time budget, so they are skipped unless asked for:

    pytest tests/test_benchmarks.py --benchmark-enable --benchmark-autosave   # a baseline
    pytest tests/test_benchmarks.py --benchmark-enable --benchmark-compare    # later: the diff

(`--benchmark-only` or FINTEAM_BENCHMARKS=1 also opt in.) Each test times one op in one mode
on one quick shape with one provider: our kernel backends usable here and the reference.
"""
import os

import pytest
import torch

import harness  # benchmarks/ is on the tests' path (pyproject.toml: pythonpath)
import providers
import shapes
from roofline import cost, expected_experts_hit
from runner import timed_function
from workload import WeightBank, make_inputs

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

CASES = [  # (op, mode, quick shape, T): one cell per op, at a size that is neither trivial nor slow
    ("gating", "forward", "olmoe-1b-7b", 1024),
    ("gating", "forward+backward", "deepseek-v3", 1024),  # sigmoid, bias, group-limited
    ("dispatch", "forward", "olmoe-1b-7b", 1024),
    ("permute", "forward+backward", "olmoe-1b-7b", 1024),
    ("unpermute", "forward+backward", "olmoe-1b-7b", 1024),
    ("grouped_gemm", "forward", "mixtral-8x7b", 256),
    ("moe_experts", "forward", "mixtral-8x7b", 1),  # decoding: weight streaming
    ("moe_experts", "forward", "mixtral-8x7b", 256),
    ("moe_experts", "forward+backward", "team-llama3-8b", 256),
    ("layer", "forward+backward", "team-llama3-8b", 256),
]


def _params():
    for op, mode, shape, T in CASES:
        usable, _ = providers.for_op(op, DEVICE, shapes.QUICK_SHAPES[shape])
        for provider in usable:
            if provider.kind in ("ours", "reference"):
                yield pytest.param(op, mode, shape, T, provider, id=f"{op}-{mode}-{shape}-T{T}-{provider.name}")


@pytest.fixture(autouse=True)
def _opt_in(request):
    config = request.config
    asked = os.environ.get("FINTEAM_BENCHMARKS") == "1"
    asked = asked or config.getoption("benchmark_enable", False) or config.getoption("benchmark_only", False)
    if not asked:
        pytest.skip("benchmarks run on request: --benchmark-enable, --benchmark-only or FINTEAM_BENCHMARKS=1")


@pytest.fixture(scope="module")
def bank():
    return WeightBank(DEVICE, torch.bfloat16)


@pytest.mark.parametrize("op, mode, shape_name, T, provider", list(_params()))
def test_cell(benchmark, bank, op, mode, shape_name, T, provider):
    s = shapes.QUICK_SHAPES[shape_name]
    inp = make_inputs(op, s, T, "uniform", bank)
    fn = timed_function([provider.builders[op](inp, mode != "forward")], mode)
    if DEVICE.type == "cuda":
        def timed():
            fn()
            torch.cuda.synchronize()
    else:
        timed = fn
    benchmark.group = f"{op} {mode} {shape_name} T={T}"
    benchmark(timed)

    hit = expected_experts_hit(s, T) if op == "layer" else int(torch.unique(inp.ids_TK).numel())
    nbytes, flops = cost(op, mode, s, T, hit, 2)
    if benchmark.stats is not None:  # None under --benchmark-disable
        ms = benchmark.stats.stats.median * 1e3
        benchmark.extra_info.update(
            bytes=nbytes, flops=flops, gbs=harness.gbs(nbytes, ms), tflops=harness.tflops(flops, ms), device=str(DEVICE)
        )
