"""Every Triton kernel and config compiles for sm_80 and sm_90 (no GPU needed), and the
compiler's own output shows what a GPU run would suffer from: register spills in hot kernels,
shared memory over the architecture's limit, a GEMM pipeline shallower than its num_stages asks
for, 16-bit or TF32 dots not on wgmma on sm_90, and approximate exp or division in the kernels
that must round like PyTorch (gating's selection). Runs the compiler in a subprocess, because
the test session's kernels are decorated for the interpreter."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")


def _compiler_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    return env


@pytest.fixture(scope="module")
def aot_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "aot.json"
    proc = subprocess.run([sys.executable, "-m", "finteam_kernels.ops._aot", "--json", str(out)],
                          env=_compiler_env(), capture_output=True, text=True, timeout=1500)
    print(proc.stdout)
    assert out.exists(), proc.stderr[-4000:]
    return json.loads(out.read_text())


def _findings(results, which):
    return [(r["name"], r["arch"], p) for r in results for p in _problems(r) if which(p)]


def _problems(result):
    from finteam_kernels.ops._aot import problems

    return problems(result)


def test_every_kernel_compiles_for_sm80_and_sm90(aot_results):
    failed = [(r["name"], r["arch"], r["error"]) for r in aot_results if "error" in r]
    assert not failed, failed
    assert {r["arch"] for r in aot_results} == {"sm_80", "sm_90"}


def test_hot_kernels_do_not_spill(aot_results):
    assert not _findings(aot_results, lambda p: p.startswith("spills"))


def test_shared_memory_within_the_architecture_limit(aot_results):
    assert not _findings(aot_results, lambda p: "shared memory" in p)


def test_gemm_pipelines_keep_their_depth(aot_results):
    """Every GEMM config gets the buffers its num_stages asks for and keeps loads in flight
    during the dot: the gathered weight gradient lost both once (2 of 3 buffers on sm_90)."""
    gemms = [r for r in aot_results if r.get("dots")]
    assert {r["name"].split("[")[0] for r in gemms} == {"grouped_gemm", "grouped_wgrad"}
    assert not _findings(aot_results, lambda p: "pipeline" in p or "in flight" in p)


def test_tensor_core_dots_use_wgmma_on_sm90(aot_results):
    """bf16, fp16 and TF32 dots are warp-group MMAs on sm_90 and mma.sync on sm_80."""
    tensor_core = [r for r in aot_results if r.get("tensor_core") and r.get("dots")]
    assert any("tf32" in r["name"] for r in tensor_core) and any("bf16" in r["name"] for r in tensor_core)
    assert not _findings(aot_results, lambda p: p.startswith("dots lowered"))
    assert all(set(r["dots"]) == {"wgmma"} for r in tensor_core if r["arch"] == "sm_90")


def test_gating_selection_has_no_approximate_math(aot_results):
    """Compiled tl.exp is ex2.approx and fp32 `/` is div.full; the selection uses libdevice's
    expf and div_rn instead, so that near-ties pick the reference's experts."""
    exact = [r for r in aot_results if r.get("exact")]
    assert {r["name"].split("[")[0] for r in exact} == {"topk_gating_fwd"}
    assert not _findings(aot_results, lambda p: p.startswith("approximate math"))


_REGRESSIONS = '''
import json, sys
import triton
import triton.language as tl
from finteam_kernels.ops._aot import compile_spec, problems
from finteam_kernels.ops._triton import AotSpec


@triton.jit
def wgrad_gathered_in_loop(dy_ptr, a_ptr, index_ptr, dw_ptr, rows_total, D,
                           BLOCK_O: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
    # the weight gradient as it was: the gathered rows' index loaded in the step that uses it
    o = tl.arange(0, BLOCK_O)
    d = tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_O, BLOCK_D), tl.float32)
    for r0 in range(0, rows_total, BLOCK_K):
        rows = r0 + tl.arange(0, BLOCK_K)
        src = tl.load(index_ptr + rows, mask=rows < rows_total, other=0)
        dy_t = tl.load(dy_ptr + rows[None, :] * BLOCK_O + o[:, None], mask=(rows < rows_total)[None, :], other=0.0)
        a = tl.load(a_ptr + src[:, None] * D + d[None, :], mask=(rows < rows_total)[:, None], other=0.0)
        acc = tl.dot(dy_t, a, acc)
    tl.store(dw_ptr + o[:, None] * BLOCK_D + d[None, :], acc)


@triton.jit
def fast_softmax(x_ptr, y_ptr, BLOCK: tl.constexpr):
    x = tl.load(x_ptr + tl.arange(0, BLOCK))
    e = tl.exp(x - tl.max(x, 0))
    tl.store(y_ptr + tl.arange(0, BLOCK), e / tl.sum(e, 0))


specs = [
    AotSpec("wgrad_gathered_in_loop", wgrad_gathered_in_loop,
            {"dy_ptr": "*bf16", "a_ptr": "*bf16", "index_ptr": "*i32", "dw_ptr": "*fp32", "rows_total": "i32",
             "D": "i32", "BLOCK_O": "constexpr", "BLOCK_D": "constexpr", "BLOCK_K": "constexpr"},
            {"BLOCK_O": 128, "BLOCK_D": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3,
            aligned=("dy_ptr", "a_ptr", "index_ptr", "dw_ptr", "D"), tensor_core=True),
    AotSpec("fast_softmax", fast_softmax, {"x_ptr": "*fp32", "y_ptr": "*fp32", "BLOCK": "constexpr"},
            {"BLOCK": 256}, exact=True),
]
json.dump({spec.name: problems(compile_spec(spec, 90)) for spec in specs}, sys.stdout)
'''


def test_the_checks_catch_known_regressions(tmp_path):
    """The checks above fail on what they guard against: a weight gradient whose gathered index
    is loaded in the step that uses it (the pipeliner keeps 2 of 3 buffers and drains every
    load), and a softmax with Triton's fast exp and division."""
    script = tmp_path / "regressions.py"
    script.write_text(textwrap.dedent(_REGRESSIONS))
    proc = subprocess.run([sys.executable, str(script)], env=_compiler_env(), capture_output=True, text=True,
                          timeout=600, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr[-4000:]
    found = json.loads(proc.stdout)
    assert any("2 pipeline buffers for num_stages=3, expected 3" in p for p in found["wgrad_gathered_in_loop"]), found
    assert any("waits for every load" in p for p in found["wgrad_gathered_in_loop"]), found
    assert any(p.startswith("approximate math") for p in found["fast_softmax"]), found
