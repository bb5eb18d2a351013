"""Every Triton kernel and config compiles for sm_80 and sm_90 (no GPU needed), and the hot
kernels do not spill registers. Runs the compiler in a subprocess, because the test session's
kernels are decorated for the interpreter."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def aot_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, "-m", "finteam_kernels.ops._aot", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=900)
    print(proc.stdout)
    assert out.exists(), proc.stderr[-4000:]
    return json.loads(out.read_text())


def test_every_kernel_compiles_for_sm80_and_sm90(aot_results):
    failed = [(r["name"], r["arch"], r["error"]) for r in aot_results if "error" in r]
    assert not failed, failed
    assert {r["arch"] for r in aot_results} == {"sm_80", "sm_90"}


def test_hot_kernels_do_not_spill(aot_results):
    from finteam_kernels.ops._aot import spills

    spilling = [(r["name"], r["arch"], r["stack"], r["local"]) for r in aot_results if r["hot"] and spills(r)]
    assert not spilling, spilling
