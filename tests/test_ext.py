"""The compiled extension itself: that it was built and loaded, that its schemas are the launcher
contract, that auto picks it, that its shape functions trace, and that a missing extension
degrades to one clear warning. (Each op's numbers are checked by the op's own test file, which
runs every backend in `backends.kernel_backends()`, `cpu` included.)

FINTEAM_ALLOW_NO_EXT=1 declares an install without a compiler: then the tests that need the
library are skipped instead of failing. So does a checkout that was never installed (plain
`pytest` in a fresh clone: nothing built the library). Otherwise a silent fallback to the
reference fails.
"""
import inspect
import io
import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import finteam_kernels
from finteam_kernels import _backend, _ext, reference
from finteam_kernels.ops import (dispatch, grouped_gemm, moe_experts, permute, router_losses, topk_gating,
                                 unpermute)
from test_moe_experts import _fp32_training_case
from tolerance import assert_close

ALLOW_NO_EXT = os.environ.get("FINTEAM_ALLOW_NO_EXT", "0") == "1"


def _built() -> bool:
    """Whether the imported finteam_kernels went through a build: setup.py writes
    _build_info.json beside the libraries whenever it runs (an install, or build_ext --inplace).
    A checkout tested without one (plain pytest in a fresh clone, whatever else is installed)
    has no library to test."""
    return os.path.exists(_ext.BUILD_INFO)

# The launcher contract (csrc/README.md): op -> (argument name, schema type) in order.
CONTRACT = {
    "topk_gating_fwd": [("logits_TE", "Tensor"), ("expert_bias_E", "Tensor?"), ("k", "int"), ("score", "str"),
                        ("renormalize", "bool"), ("num_groups", "int"), ("topk_groups", "int"), ("scaling", "float")],
    "topk_gating_bwd": [("grad_weights_TK", "Tensor"), ("logits_TE", "Tensor"), ("ids_TK", "Tensor"),
                        ("score", "str"), ("renormalize", "bool"), ("scaling", "float")],
    "router_losses_fwd": [("logits_TE", "Tensor"), ("topk_ids_TK", "Tensor"), ("num_experts", "int")],
    "router_losses_bwd": [("grad_aux", "Tensor"), ("grad_z", "Tensor"), ("logits_TE", "Tensor"),
                          ("topk_ids_TK", "Tensor"), ("num_experts", "int")],
    "dispatch_fwd": [("topk_ids_TK", "Tensor"), ("num_experts", "int")],
    "permute_fwd": [("x_TH", "Tensor"), ("row_to_slot_N", "Tensor"), ("top_k", "int")],
    "permute_bwd": [("grad_NH", "Tensor"), ("slot_to_row_N", "Tensor"), ("top_k", "int")],
    "unpermute_fwd": [("y_NH", "Tensor"), ("slot_to_row_N", "Tensor"), ("topk_weights_TK", "Tensor")],
    "unpermute_bwd": [("grad_TH", "Tensor"), ("y_NH", "Tensor"), ("row_to_slot_N", "Tensor"),
                      ("slot_to_row_N", "Tensor"), ("topk_weights_TK", "Tensor")],
    "grouped_gemm_fwd": [("x_ND", "Tensor"), ("w_EOD", "Tensor"), ("expert_offsets_E1", "Tensor")],
    "grouped_gemm_bwd": [("grad_NO", "Tensor"), ("x_ND", "Tensor"), ("w_EOD", "Tensor"),
                         ("expert_offsets_E1", "Tensor")],
    "moe_experts_fwd": [("x_TH", "Tensor"), ("topk_ids_TK", "Tensor"), ("topk_weights_TK", "Tensor"),
                        ("w_gate_up_E2IH", "Tensor"), ("w_down_EHI", "Tensor"), ("activation", "str"),
                        ("needs_grad", "bool")],
    "moe_experts_bwd": [("grad_TH", "Tensor"), ("x_TH", "Tensor"), ("topk_weights_TK", "Tensor"),
                        ("w_gate_up_E2IH", "Tensor"), ("w_down_EHI", "Tensor"), ("h_N2I", "Tensor"),
                        ("expert_offsets_E1", "Tensor"), ("row_to_slot_N", "Tensor"), ("slot_to_row_N", "Tensor"),
                        ("activation", "str")],
}
RETURNS = {"topk_gating_fwd": 3, "router_losses_fwd": 2, "dispatch_fwd": 4, "unpermute_bwd": 2, "grouped_gemm_bwd": 2,
           "moe_experts_fwd": 5, "moe_experts_bwd": 4}
LAUNCHER_MODULES = {m.__name__.rsplit(".", 1)[1]: m
                    for m in (dispatch, grouped_gemm, moe_experts, permute, router_losses, topk_gating, unpermute)}


@pytest.fixture(scope="module")
def cpu_ext():
    reason = _ext.load("cpu").problem
    if reason is not None:
        if ALLOW_NO_EXT:
            pytest.skip(f"FINTEAM_ALLOW_NO_EXT=1 and the CPU extension is not usable: {reason}")
        if not _built():
            pytest.skip(f"this finteam_kernels ({os.path.dirname(_ext.BUILD_INFO)}) was never built ({reason}); "
                        "`pip install --no-build-isolation .` builds it")
        pytest.fail(f"the compiled CPU extension did not load after a build: {reason}")
    return torch.ops.finteam


def test_cpu_extension_loaded(cpu_ext):
    # A build that silently failed would leave only the reference: the library must be there,
    # loaded, and have a CPU kernel for every op of the contract.
    assert _ext.library_path("cpu") is not None
    missing = [name for name in CONTRACT if not _ext.has_kernel("cpu", name)]
    assert not missing, f"no CPU kernel for {missing}"
    assert cpu_ext.cpu_capability().split(",")[0] in ("baseline", "avx2", "avx512", "avx512_bf16")


@pytest.mark.parametrize("name", sorted(CONTRACT))
def test_schema_is_the_launcher_contract(cpu_ext, name):
    schema = getattr(cpu_ext, name).default._schema
    got = [(a.name, str(a.type).replace("Optional[Tensor]", "Tensor?")) for a in schema.arguments]
    assert got == CONTRACT[name]
    assert len(schema.returns) == RETURNS.get(name, 1)


@pytest.mark.parametrize("name", sorted(CONTRACT))
def test_triton_launcher_has_the_same_signature(name):
    # The compiled op is a drop-in for the Triton launcher of the same name.
    module = LAUNCHER_MODULES[name.rsplit("_", 1)[0]]
    launcher = getattr(module, name)
    assert list(inspect.signature(launcher).parameters) == [arg for arg, _ in CONTRACT[name]]


def test_auto_picks_cpu_for_cpu_tensors(cpu_ext, monkeypatch):
    monkeypatch.delenv("FINTEAM_BACKEND", raising=False)
    for op in ("topk_gating", "router_losses", "dispatch", "permute", "unpermute", "grouped_gemm", "moe_experts"):
        assert _backend.pick_backend(None, torch.device("cpu"), op) == "cpu", op


def test_auto_runs_the_compiled_kernel(cpu_ext, monkeypatch):
    # Not only the choice: a public op on CPU tensors reaches the compiled kernel.
    monkeypatch.delenv("FINTEAM_BACKEND", raising=False)
    calls = []
    real = _ext.op
    monkeypatch.setattr(_ext, "op", lambda name: calls.append(name) or real(name))
    logits = torch.randn(5, 8)
    finteam_kernels.topk_gating(logits, 2)
    assert calls == ["topk_gating_fwd"]


def _small_args(name):
    """Arguments for one call of each op: a few tokens, with an empty expert (E=4, K=2)."""
    T, E, K, H, I = 3, 4, 2, 8, 6
    logits = torch.randn(T, E)
    ids = torch.tensor([[0, 1], [1, 0], [2, 1]], dtype=torch.int32)
    weights = torch.rand(T, K)
    offsets, _, r2s, s2r = torch.ops.finteam.dispatch_fwd(ids, E)
    x, y = torch.randn(T, H), torch.randn(T * K, H)
    wgu, wd = torch.randn(E, 2 * I, H), torch.randn(E, H, I)
    h = torch.ops.finteam.moe_experts_fwd(x, ids, weights, wgu, wd, "silu", True)[1]
    return {
        "topk_gating_fwd": (logits, torch.randn(E), K, "softmax", True, 2, 1, 1.5),
        "topk_gating_bwd": (weights, logits, ids, "sigmoid", True, 1.5),
        "router_losses_fwd": (logits, ids, E),
        "router_losses_bwd": (torch.tensor(1.0), torch.tensor(0.5), logits, ids, E),
        "dispatch_fwd": (ids, E),
        "permute_fwd": (x, r2s, K),
        "permute_bwd": (y, s2r, K),
        "unpermute_fwd": (y, s2r, weights),
        "unpermute_bwd": (x, y, r2s, s2r, weights),
        "grouped_gemm_fwd": (y, wd.transpose(1, 2).contiguous(), offsets),
        "grouped_gemm_bwd": (torch.randn(T * K, I), y, wd.transpose(1, 2).contiguous(), offsets),
        "moe_experts_fwd": (x, ids, weights, wgu, wd, "gelu", True),
        "moe_experts_bwd": (x, x, weights, wgu, wd, h, offsets, r2s, s2r, "silu"),
    }[name]


@pytest.mark.parametrize("name", sorted(CONTRACT))
def test_shape_functions_match_the_kernels(cpu_ext, name):
    # The Meta implementations (what torch.compile and FakeTensor trace) give the shapes, dtypes
    # and strides of the real outputs, for a schema that claims no aliasing or mutation.
    torch.library.opcheck(getattr(cpu_ext, name).default, _small_args(name),
                          test_utils=("test_schema", "test_faketensor"))


def test_results_do_not_depend_on_the_thread_count(cpu_ext):
    # Blocked reductions (dispatch counts, router losses, combines) are reduced in a fixed order.
    ids = torch.randint(0, 7, (20000, 2))
    logits = torch.randn(20000, 7)
    y = torch.randn(40000, 16)  # fp32: no rounding to bf16 hides another order of the combine's sums
    y_bf16 = y.bfloat16()
    weights = torch.rand(20000, 2)

    def run():
        plan = cpu_ext.dispatch_fwd(ids, 7)
        return (*plan, *cpu_ext.router_losses_fwd(logits, ids, 7), cpu_ext.unpermute_fwd(y, plan[3], weights),
                cpu_ext.unpermute_fwd(y_bf16, plan[3], weights))

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = run()
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(single, run()):
        assert torch.equal(a, b)


def _moe_decode_args():
    torch.manual_seed(0)
    return [torch.randn(3, 64, dtype=torch.bfloat16),
            torch.tensor([[0, 2], [2, 1], [0, 1]]),  # two rows per expert: every expert is streamed
            torch.rand(3, 2), torch.randn(3, 96, 64, dtype=torch.bfloat16) / 8,
            torch.randn(3, 64, 48, dtype=torch.bfloat16) / 7]


# Each way a decode-sized bf16 batch can run: ATen's GEMM (FINTEAM_CPU_STREAMING=none, as on a
# CPU without AVX2), and every weight-streaming kernel where the CPU has it.
STREAMING_VARIANTS = {
    "none (ATen GEMM)": {"FINTEAM_CPU_STREAMING": "none"},
    "avx2": {"FINTEAM_CPU_STREAMING": "avx2"},
    "fma": {"FINTEAM_CPU_STREAMING": "fma"},
    "vdpbf16ps": {"FINTEAM_CPU_STREAMING": "vdpbf16ps"},
}


def _moe_experts_fwd_in_children(args_function: str, activation: str, variants: dict) -> dict:
    """{variant: (cpu_capability, output)} of moe_experts_fwd (no grad) on test_ext.<args_function>()
    in one child process per variant, with that variant's environment: the kernels are chosen
    once per process. The children import the same finteam_kernels as this process."""
    code = f"""
        import json, torch
        from finteam_kernels import _ext
        from test_ext import {args_function}
        assert _ext.load("cpu").usable
        out = torch.ops.finteam.moe_experts_fwd(*{args_function}(), "{activation}", False)[0]
        print(torch.ops.finteam.cpu_capability())
        print(json.dumps(out.float().tolist()))
    """
    children = {name: _start_child(code, env) for name, env in variants.items()}
    results = {}
    for name, child in children.items():
        capability, values = _last_two_lines(child)
        results[name] = capability, torch.tensor(json.loads(values))
    return results


def _start_child(code: str, env: dict) -> subprocess.Popen:
    """A Python child running `code` (dedented) with `env` added, importing the same
    finteam_kernels as this process and this directory's test modules."""
    path = [os.path.dirname(os.path.dirname(finteam_kernels.__file__)), os.path.dirname(__file__)]
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **env, "PYTHONPATH": os.pathsep.join(path)})


def _last_two_lines(child: subprocess.Popen) -> list:
    stdout, stderr = child.communicate(timeout=120)
    assert child.returncode == 0, stderr
    return stdout.strip().splitlines()[-2:]


def _run_child(code: str, env: dict) -> list:
    """The last two lines `code` printed in a child process (see _start_child)."""
    return _last_two_lines(_start_child(code, env))


def test_every_bf16_streaming_path_meets_the_tolerance(cpu_ext):
    args = _moe_decode_args()
    expected = reference.moe_experts(*[a.float() if a.is_floating_point() else a for a in args])
    baseline = reference.moe_experts(*args)
    assert_close(cpu_ext.moe_experts_fwd(*args, "silu", False)[0], expected, baseline=baseline)
    ran = []
    for name, (capability, out) in _moe_experts_fwd_in_children("_moe_decode_args", "silu",
                                                                  STREAMING_VARIANTS).items():
        if not capability.endswith(f"streaming: {name}"):
            continue  # this CPU cannot run that kernel
        ran.append(name)
        assert_close(out.to(torch.bfloat16), expected, baseline=baseline, name=name)
    assert "none (ATen GEMM)" in ran
    if cpu_ext.cpu_capability().startswith(("avx2", "avx512")):
        assert "avx2" in ran
    if cpu_ext.cpu_capability().startswith("avx512"):
        assert "fma" in ran


def _moe_fp32_inference_args():
    g = torch.Generator().manual_seed(0)
    T, E, H, I = 150, 3, 45, 38  # 96-104 rows an expert: past the small-row GEMM, two tiles each
    return [torch.randn(T, H, generator=g), torch.stack([torch.arange(T) % E, (torch.arange(T) + 1) % E], 1),
            torch.rand(T, 2, generator=g), torch.randn(E, 2 * I, H, generator=g) / 7,
            torch.randn(E, H, I, generator=g) / 6]


def test_every_fp32_inference_path_meets_the_tolerance(cpu_ext):
    # fp32 experts with many rows, without grad: the tiled forward (AVX-512 where the CPU has it,
    # else AVX2, also forced on an AVX-512 CPU by lowering the ISA), or ATen's GEMMs with
    # FINTEAM_CPU_F32_TILES=0 (as on CPUs without AVX2).
    variants = {"this CPU's": {}, "avx2": {"FINTEAM_CPU_ISA": "avx2"}, "off": {"FINTEAM_CPU_F32_TILES": "0"}}
    args = _moe_fp32_inference_args()
    expected = reference.moe_experts(*[a.double() if a.is_floating_point() else a for a in args], "gelu").float()
    tiles = {}
    for name, (capability, out) in _moe_experts_fwd_in_children("_moe_fp32_inference_args", "gelu", variants).items():
        tiles[name] = capability.split("fp32 tiles: ")[1].split(", bf16")[0]
        assert_close(out, expected, name=f"{name} ({tiles[name]})")
    isa = cpu_ext.cpu_capability().split(",")[0]
    none = "none (ATen GEMM)"
    assert tiles["off"] == none
    assert tiles["this CPU's"] == ("avx512" if isa.startswith("avx512") else "avx2" if isa == "avx2" else none)
    assert tiles["avx2"] == ("avx2" if isa.startswith(("avx2", "avx512")) else none)


def test_every_fp32_training_path_meets_the_tolerance(cpu_ext):
    # fp32 experts with grad, each way in a child process (the choices are read once), the output
    # and all four gradients against the fp64 reference. Forward: the tiled forward writing h
    # (tile_f32.h; AVX-512, or AVX2 by lowering the ISA) where the CPU has it, else the chunked one
    # (chunks_f32.h; FINTEAM_CPU_F32_TILES=0), else ATen's GEMMs (both off). Backward: the chunks
    # where the torch build exports the BLAS, their GEMMs on AVX-512 registers (gemm_f32.h) where
    # MKL runs AVX2 code (AMD) or in the BLAS (FINTEAM_CPU_GEMM_F32=0), else ATen's GEMMs
    # (FINTEAM_CPU_CHUNKS=0).
    code = """
        import json, torch
        from finteam_kernels import _ext, moe_experts
        from test_moe_experts import _fp32_training_case
        assert _ext.load("cpu").usable
        x, ids, weights, w_gate_up, w_down, grad_out = _fp32_training_case(torch.Generator().manual_seed(0))
        leaves = [t.requires_grad_() for t in (x, weights, w_gate_up, w_down)]
        out = moe_experts(leaves[0], ids, *leaves[1:], "silu", backend="cpu")
        out.backward(grad_out)
        print(torch.ops.finteam.cpu_capability())
        print(json.dumps([t.tolist() for t in (out.detach(), *(t.grad for t in leaves))]))
    """
    x, ids, weights, w_gate_up, w_down, grad_out = _fp32_training_case(torch.Generator().manual_seed(0))
    leaves = [t.double().requires_grad_() for t in (x, weights, w_gate_up, w_down)]
    out = reference.moe_experts(leaves[0], ids, *leaves[1:], "silu")
    out.backward(grad_out.double())
    expected = [out.detach(), *(t.grad for t in leaves)]
    variants = {"this build's": {}, "chunks off": {"FINTEAM_CPU_CHUNKS": "0"},
                "tiles off": {"FINTEAM_CPU_F32_TILES": "0"}, "avx2 tiles": {"FINTEAM_CPU_ISA": "avx2"},
                "both off": {"FINTEAM_CPU_F32_TILES": "0", "FINTEAM_CPU_CHUNKS": "0"},
                "BLAS backward": {"FINTEAM_CPU_GEMM_F32": "0"}}
    children = {name: _start_child(code, env) for name, env in variants.items()}
    chunks, tiles = {}, {}
    for name, child in children.items():
        capability, values = _last_two_lines(child)
        chunks[name] = capability.split("fp32 training chunks: ")[1].split(", fp32 tiles")[0]
        tiles[name] = capability.split("fp32 tiles: ")[1].split(", bf16")[0]
        for what, a, e in zip(("out", "x", "weights", "w_gate_up", "w_down"), json.loads(values), expected):
            assert_close(torch.tensor(a), e.float(), name=f"{name} (chunks {chunks[name]}, tiles {tiles[name]}): {what}")
    assert chunks["chunks off"] == chunks["both off"] == "none (ATen GEMM)"
    assert tiles["tiles off"] == tiles["both off"] == "none (ATen GEMM)"
    isa = cpu_ext.cpu_capability().split(",")[0]
    assert tiles["this build's"] == ("avx512" if isa.startswith("avx512") else "avx2" if isa == "avx2" else
                                     "none (ATen GEMM)")
    assert tiles["avx2 tiles"] == ("avx2" if isa.startswith(("avx2", "avx512")) else "none (ATen GEMM)")
    # torch builds with MKL (the x86 wheels) export its sgemm_, so the chunks run there.
    if torch.backends.mkl.is_available():
        assert chunks["BLAS backward"] == "BLAS"
        assert chunks["this build's"] == chunks["tiles off"] in ("BLAS", "BLAS + AVX-512 backward GEMMs")
        if sys.platform.startswith("linux"):
            with open("/proc/cpuinfo") as f:
                intel = "GenuineIntel" in f.read()
            assert (chunks["this build's"] == "BLAS + AVX-512 backward GEMMs") == (isa.startswith("avx512") and not intel)


def _gated_unit_case(dtype):
    """moe_experts inputs whose gated unit takes every special case: 112-113 rows an expert (past
    the bf16 streaming kernels, so the forward's gated unit is its own pass), I=38 (two whole
    vectors of 16 and a ragged tail), gate pre-activations from 0 to +-200 (past exp's clamps),
    x with a row stride."""
    g = torch.Generator().manual_seed(0)
    T, E, H, I = 169, 3, 24, 38
    x = (torch.randn(T, H + 2, generator=g) * torch.logspace(-2, 1, T)[:, None])[:, 2:]
    ids = torch.stack([torch.arange(T) % E, (torch.arange(T) + 1) % E], 1)
    w_gate_up = torch.randn(E, 2 * I, H, generator=g) * torch.logspace(-2, 0.5, 2 * I)[:, None]
    return [x.to(dtype), ids, torch.rand(T, 2, generator=g), w_gate_up.to(dtype),
            (torch.randn(E, H, I, generator=g) / 6).to(dtype)]


@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh"])
def test_the_avx512_gated_unit_loops_match_the_portable_ones(cpu_ext, activation):
    # vmath512.h repeats vmath.h's arithmetic step for step, so the hand-written AVX-512 loops of
    # the gated unit (forward and the backward's rows) and the compiler-vectorised ones give the
    # same results up to a rounding; the latter run when the ISA is lowered to AVX2.
    if not cpu_ext.cpu_capability().startswith("avx512"):
        pytest.skip("this CPU has no AVX-512: only the portable loops run")
    code = f"""
        import json, torch
        from finteam_kernels import _ext, moe_experts
        from test_ext import _gated_unit_case
        assert _ext.load("cpu").usable
        results = []
        for dtype in (torch.bfloat16, torch.float32):
            x, ids, weights, w_gate_up, w_down = _gated_unit_case(dtype)
            leaves = [t.requires_grad_() for t in (x, weights, w_gate_up, w_down)]
            out = moe_experts(leaves[0], ids, *leaves[1:], "{activation}", backend="cpu")
            out.backward(torch.ones_like(out))
            results += [t.float().tolist() for t in (out.detach(), *(t.grad for t in leaves))]
        print(torch.ops.finteam.cpu_capability())
        print(json.dumps(results))
    """
    (wide_isa, wide), (low_isa, low) = [_run_child(code, env) for env in ({}, {"FINTEAM_CPU_ISA": "avx2"})]
    assert wide_isa.startswith("avx512") and low_isa.startswith("avx2,")
    names = [f"{dtype} {what}" for dtype in ("bf16", "fp32") for what in ("out", "x", "weights", "w_gate_up", "w_down")]
    for name, a, b in zip(names, json.loads(wide), json.loads(low)):
        a, b = torch.tensor(a), torch.tensor(b)
        assert torch.isfinite(a).all() and torch.isfinite(b).all(), name
        # two roundings of the result's dtype at the tensor's scale (bf16 entries hold bf16 values):
        # the bf16 GEMMs of the AVX2 child run on widened operands, so their sums round apart too
        eps = torch.finfo(torch.bfloat16 if name.startswith("bf16") else torch.float32).eps
        err, scale = float((a - b).abs().max()), float(b.abs().max())
        assert err <= 2 * eps * scale, f"{activation} {name}: AVX-512 and AVX2 loops differ by {err:.3e} (scale {scale:.3e})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("E, K, options", [
    (3, 2, dict(score="softmax", renormalize=True)),  # the team's router
    (1, 1, dict(score="softmax", renormalize=True)),
    (8, 8, dict(score="sigmoid", renormalize=False)),  # K = E
    (7, 3, dict(score="sigmoid", renormalize=True, bias=True)),
    (16, 4, dict(score="softmax", renormalize=False, bias=True)),  # the widest lane path
])
def test_few_experts_gate_as_many_do(cpu_ext, dtype, E, K, options):
    # Up to 16 experts the gating runs one token per vector lane, beyond it one row at a time.
    # Both must give the same bits: the same logits padded with 5 experts of logit -inf (score
    # 0, never picked, adding 0 to every sum) take the row path and must agree exactly, forward
    # and gradient, on dead rows, NaN and inf, ties and a partial last block of 16 tokens too.
    score, renormalize = options["score"], options["renormalize"]
    g = torch.Generator().manual_seed(E)
    T = 53
    x_TE = (torch.randn(T, E, generator=g) * 3).to(dtype)
    x_TE[4] = float("-inf")  # a dead row
    x_TE[5, 0], x_TE[6, -1], x_TE[7, 0] = float("nan"), float("inf"), float("-inf")
    x_TE[8] = 0.5  # every expert tied
    bias = torch.randn(E, generator=g) * 0.3 if options.get("bias") else None
    wide_TE = torch.cat([x_TE, torch.full((T, 5), float("-inf"), dtype=dtype)], dim=1)
    # a padding expert's choice value is its score 0 plus its bias: a bias of -1e30 keeps it last
    wide_bias = torch.cat([bias, torch.full((5,), -1e30)]) if bias is not None else None
    narrow = cpu_ext.topk_gating_fwd(x_TE, bias, K, score, renormalize, 1, 1, 1.5)
    wide = cpu_ext.topk_gating_fwd(wide_TE, wide_bias, K, score, renormalize, 1, 1, 1.5)
    for name, a, b in zip(("weights", "ids", "counts"), narrow, wide):
        if name == "counts":
            b = b[:E]
        assert torch.equal(a, b), f"{name}: the lane path and the row path differ"
    grad_TK = torch.randn(T, K, generator=g)
    dx_narrow = cpu_ext.topk_gating_bwd(grad_TK, x_TE, narrow[1], score, renormalize, 1.5)
    dx_wide = cpu_ext.topk_gating_bwd(grad_TK, wide_TE, wide[1], score, renormalize, 1.5)
    assert torch.equal(dx_narrow, dx_wide[:, :E]) and not dx_wide[:, E:].any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_streamed_token_does_not_depend_on_its_batch(cpu_ext, dtype):
    # Each output of the weight-streaming kernels is one sum in a fixed order, whether the
    # expert's batch goes row by row, in tiles of weight rows or as leftovers: a token decodes to
    # the same bits alone as among up to 32 others (beyond, an expert may go to another GEMM).
    # Odd widths: tails of a vector in both projections, leftover rows after whole tiles.
    kernel = cpu_ext.cpu_capability().rpartition("streaming: ")[2] if dtype == torch.bfloat16 else "small_gemm_f32"
    if kernel.startswith("none"):
        pytest.skip("this CPU has no bf16 weight-streaming kernel")
    outputs = _one_token_in_batches(dtype)
    for T, out in outputs.items():
        assert torch.equal(out, outputs[1].expand_as(out)), f"{kernel}: a token's output changed in a batch of {T}"


STREAMED_BATCHES = (1, 2, 3, 4, 5, 6, 7, 8, 13, 32)


def _one_token_in_batches(dtype: torch.dtype) -> dict:
    """{T: the CPU experts' output for one token repeated T times}, odd widths: tails of a vector
    in both projections, leftover rows after whole tiles. In bf16 the gate/up projection is one
    that shows the order of its sums (_order_revealing_gate_up); fp32 outputs show it anyway."""
    g = torch.Generator().manual_seed(0)
    H, I, E = (112, 72, 3) if dtype == torch.bfloat16 else (45, 23, 3)
    w_down = (torch.randn(E, H, I, generator=g) / 7).to(dtype)
    if dtype == torch.bfloat16:
        x_1H, w_gate_up = _order_revealing_gate_up(H, 2 * I, E, g)
    else:
        x_1H, w_gate_up = torch.randn(1, H, generator=g), torch.randn(E, 2 * I, H, generator=g) / 8
    weights_1K = torch.tensor([[0.7, 0.3]])
    return {T: torch.ops.finteam.moe_experts_fwd(x_1H.expand(T, H).contiguous(), torch.tensor([[2, 0]]).expand(T, 2),
                                                 weights_1K.expand(T, 2), w_gate_up, w_down, "silu", False)[0]
            for T in STREAMED_BATCHES}


# A child process's capability line and its _one_token_in_batches(bf16) outputs: the kernels are
# chosen once per process, so each forced choice runs in its own.
_BATCHES_IN_A_CHILD = """
    import json, torch
    from finteam_kernels import _ext
    from test_ext import _one_token_in_batches
    assert _ext.load("cpu").usable
    print(torch.ops.finteam.cpu_capability())
    print(json.dumps({T: out.float().tolist() for T, out in _one_token_in_batches(torch.bfloat16).items()}))
"""


@pytest.mark.parametrize("kernel", ["avx2", "fma", "vdpbf16ps"])
def test_every_streaming_kernel_gives_a_token_the_same_bits_in_any_batch(cpu_ext, kernel):
    # test_a_streamed_token_does_not_depend_on_its_batch runs the kernel this CPU picks; each
    # kernel it can run besides (forced in a child process, as it is chosen once) splits a batch
    # its own way: the AVX2 tiles take 2 batch rows a pass, the fma ones 4, vdpbf16ps 6. Each
    # output must still be one sum in one order.
    capability, values = _run_child(_BATCHES_IN_A_CHILD, {"FINTEAM_CPU_STREAMING": kernel})
    if not capability.endswith(f"streaming: {kernel}"):
        pytest.skip(f"this CPU cannot run the {kernel} kernel ({capability})")
    outputs = {int(T): torch.tensor(out) for T, out in json.loads(values).items()}
    for T, out in outputs.items():
        assert torch.equal(out, outputs[1].expand_as(out)), f"{kernel}: a token's output changed in a batch of {T}"


def _order_revealing_gate_up(H: int, O: int, E: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """x_1H and w_EOH in bf16 whose products a kernel cannot add in another order without other
    bf16 bits in the output: with random values a change of order moves a sum by an fp32 ulp,
    which the output's rounding to bf16 hides almost always.
    Even elements: products of exactly +-2**14, of one sign within a SIMD lane (elements 2j and
    2j+1 share lane j of every 16 x 2 or 8 x 2 elements in each streaming kernel) and of
    alternating sign across lanes, so they cancel exactly in the total but make the partial
    sums large. Odd elements: small random products, rounded into those large partials at their
    precision, so that each order of adding gives its own result. A deliberate fault (another
    order for one batch row's final reduction in every tile) changed the output in each of five
    seeds, for each kernel; with random values, in none."""
    d = torch.arange(H)
    even = d % 2 == 0
    lane_sign = torch.where((d // 2) % 2 == 0, 1.0, -1.0)
    x_1H = torch.where(even, 128.0 * lane_sign, torch.randn(H, generator=g))[None]
    w_EOH = torch.where(even, torch.tensor(128.0), torch.randn(E, O, H, generator=g))
    return x_1H.to(torch.bfloat16), w_EOH.to(torch.bfloat16)


def test_every_row_by_row_limit_gives_the_same_bits(cpu_ext):
    # The vdpbf16ps kernel reads batches of up to 3 or 5 rows (per CPU) one weight row at a time,
    # larger ones in tiles: with the limit forced to each value in a child process (it is read
    # once), a token decodes to the same bits alone and in every batch, under every limit.
    if not cpu_ext.cpu_capability().endswith("streaming: vdpbf16ps"):
        pytest.skip("this CPU does not stream bf16 weights with vdpbf16ps")
    limits = range(6)
    children = {limit: _start_child(_BATCHES_IN_A_CHILD, {"FINTEAM_CPU_ROW_BY_ROW": str(limit)}) for limit in limits}
    alone = _one_token_in_batches(torch.bfloat16)[1].float()
    for limit, child in children.items():
        capability, values = _last_two_lines(child)
        rows = f"batches of up to {limit} rows streamed one weight row at a time"
        assert (rows in capability) == (limit > 0), capability
        for T, out in json.loads(values).items():
            assert torch.equal(torch.tensor(out), alone.expand(int(T), -1)), f"limit {limit}: batch of {T} changed"
    bad = _run_child("import torch; from finteam_kernels import _ext; _ext.load('cpu')\n"
                     "try:\n    torch.ops.finteam.cpu_capability()\nexcept RuntimeError as e:\n    print(e)\nprint()",
                     {"FINTEAM_CPU_ROW_BY_ROW": "6"})
    assert "FINTEAM_CPU_ROW_BY_ROW must be an integer in [0, 5]; got '6'" in bad[0]


def _lane_order_gemm(w_OD: torch.Tensor, x_MD: torch.Tensor) -> torch.Tensor:
    """x_MD @ w_OD^T in fp32, summed in small_gemm_f32's order (csrc/cpu/dot_f32.cpp): lane j of
    16 sums x[d] * w[d] for d = j, j + 16, ... by FMA, the d past the last whole 16 go into lane
    0, then the lanes are added to 0 one after the other. An FMA is emulated in fp64 (the product
    exact, the sum rounded to fp64, then to fp32), which rounds twice where the fp64 sum lands on
    an fp32 midpoint: about once in 2**28 steps, never on this test's inputs."""
    M, D = x_MD.shape
    D16 = D - D % 16
    x, w = x_MD.double()[:, None, :], w_OD.double()[None, :, :]
    acc_MO16 = torch.zeros(M, w_OD.shape[0], 16)
    for d in range(0, D16, 16):
        acc_MO16 = (x[..., d:d + 16] * w[..., d:d + 16] + acc_MO16.double()).float()
    for d in range(D16, D):
        acc_MO16[..., 0] = (x[..., d] * w[..., d] + acc_MO16[..., 0].double()).float()
    sum_MO = torch.zeros(acc_MO16.shape[:2]) + acc_MO16[..., 0]
    for k in range(1, 16):
        sum_MO = sum_MO + acc_MO16[..., k]
    return sum_MO


@pytest.mark.parametrize("H", [128, 45])
def test_the_avx512_small_batch_gemm_sums_in_its_order(cpu_ext, H):
    # small_gemm_f32 (fp32 experts with few rows: decode) on AVX-512 transposes tiles of 16 dot
    # products to add their lanes 16 outputs at a time, in the portable loop's order; its gate/up
    # products (h_N2I, kept for the backward) must be that order's sums to the bit, for 1 to 9
    # and 32 rows (every tile form and its leftovers), I = 23 (a tile of 16 outputs, a group of
    # 4 and 3 single ones in each half), H = 128 (the tiny team) and 45 (a tail of 13).
    if not cpu_ext.cpu_capability().startswith("avx512"):
        pytest.skip("this CPU has no AVX-512: small_gemm_f32 runs the compiler-vectorised loop")
    g = torch.Generator().manual_seed(H)
    I = 23
    w_gate_up = torch.randn(1, 2 * I, H, generator=g) * torch.logspace(-2, 2, H)
    w_down = torch.randn(1, H, I, generator=g)
    for T in (*range(1, 10), 32):
        x_TH = torch.randn(T, H, generator=g)
        h_N2I = cpu_ext.moe_experts_fwd(x_TH, torch.zeros(T, 1, dtype=torch.int64), torch.ones(T, 1), w_gate_up,
                                        w_down, "silu", True)[1]
        expected = _lane_order_gemm(w_gate_up[0], x_TH)
        assert torch.equal(h_N2I, expected), f"T={T}: {int((h_N2I != expected).sum())} of {h_N2I.numel()} sums differ"


def test_the_fp32_tiles_give_a_row_the_same_bits_in_any_tiling(cpu_ext):
    # The tiled fp32 forward (more than 32 rows an expert) cuts an expert's rows by the thread
    # count (tiles of 64 rows, more and smaller ones while there are fewer tiles than threads,
    # split evenly when each thread has at most one) and ends a tile on a one-register block
    # where its rows allow: 1, 2 and 4 threads tile these experts differently (33 rows: one tile
    # of 33, then 32 + 1, then 16 + 16 + 1), and every output and kept pre-activation must agree.
    if not cpu_ext.cpu_capability().split("fp32 tiles: ")[1].startswith(("avx512", "avx2")):
        pytest.skip("this CPU runs no tiled fp32 forward (ATen's GEMMs instead)")
    g = torch.Generator().manual_seed(0)
    H, I = 45, 38
    w_gate_up = torch.randn(2, 2 * I, H, generator=g) / 7
    w_down = torch.randn(2, H, I, generator=g) / 6
    threads = torch.get_num_threads()
    try:
        for T in (42, 47, 64, 65, 96, 97, 121, 160):
            x_TH = torch.randn(T, H, generator=g)
            # expert 0 gets 33 to 128 rows (tiled), expert 1 the other fifth (small_gemm_f32)
            ids_TK = (torch.arange(T) % 5 == 0).long()[:, None]
            weights_TK = torch.rand(T, 1, generator=g)
            results = {}
            for n in (1, 2, 4):
                torch.set_num_threads(n)
                out_TH, h_N2I = cpu_ext.moe_experts_fwd(x_TH, ids_TK, weights_TK, w_gate_up, w_down, "silu", True)[:2]
                results[n] = (out_TH, h_N2I)
            for n in (2, 4):
                assert torch.equal(results[n][0], results[1][0]), f"T={T}: the output moved with {n} threads"
                assert torch.equal(results[n][1], results[1][1]), f"T={T}: h_N2I moved with {n} threads"
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype, H", [(torch.bfloat16, 1024), (torch.float32, 520), (torch.float32, 1027)])
def test_a_large_permute_copies_every_row_exactly(cpu_ext, dtype, H):
    # 16 MB of output and more, from the block cache (alloc.h), rows 16-byte aligned (bf16 1024
    # and fp32 520 columns) and not (fp32 1027), gathered from all over the input, every token twice.
    T, K = 4096, 2
    g = torch.Generator().manual_seed(H)
    x_TH = torch.randn(T, H, generator=g).to(dtype)
    row_to_slot_N = torch.randperm(T * K, generator=g).to(torch.int32)
    x_NH = cpu_ext.permute_fwd(x_TH, row_to_slot_N, K)
    assert x_NH.numel() * x_NH.element_size() >= 16 << 20
    assert torch.equal(x_NH, x_TH[row_to_slot_N.long() // K])


def _experts_training_inputs(T, K, E, H, I, seed):
    """fp32 moe_experts inputs that require grad, each token routed to K distinct experts, and
    an incoming gradient: (x_TH, ids_TK, weights_TK, w_gate_up, w_down, grad_TH)."""
    g = torch.Generator().manual_seed(seed)
    x_TH = torch.randn(T, H, generator=g, requires_grad=True)
    ids_TK = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).to(torch.int32)
    weights_TK = torch.rand(T, K, generator=g, requires_grad=True)
    w_gate_up = (torch.randn(E, 2 * I, H, generator=g) / H**0.5).requires_grad_()
    w_down = (torch.randn(E, H, I, generator=g) / I**0.5).requires_grad_()
    return x_TH, ids_TK, weights_TK, w_gate_up, w_down, torch.randn(T, H, generator=g)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts page faults with getrusage (Linux)")
def test_training_buffers_do_not_fault_in_again(cpu_ext):
    # The tiny team's experts (fp32, 2048 routed rows: h, dh, g and the rows of 0.5-4 MiB) took
    # 190-650 page faults a step from glibc's heap; from the block cache, none after the first.
    import resource

    x_TH, ids_TK, weights_TK, w_gate_up, w_down, grad_TH = _experts_training_inputs(1024, 2, 3, 128, 256, seed=5)
    inputs = (x_TH, weights_TK, w_gate_up, w_down)

    def step():
        out = finteam_kernels.moe_experts(x_TH, ids_TK, weights_TK, w_gate_up, w_down, backend="cpu")
        return torch.autograd.grad(out, inputs, grad_TH)

    for _ in range(3):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        step()
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10
    assert faults < 16, f"{faults:.0f} page faults per forward and backward after warm-up"


def test_large_outputs_come_from_the_block_cache(cpu_ext):
    # Outputs of 256 KiB or more come from the library's cache of blocks (csrc/cpu/alloc.h):
    # the experts' weight gradients here are 64 and 32 MiB. A second backward gets the blocks the
    # first one freed, and its values match the reference as the first one's did; the profiler
    # sees the blocks; and they resize, change in place and pickle like any tensor.
    from torch.profiler import ProfilerActivity, profile

    T, K, E, H, I = 64, 2, 4, 1024, 2048
    x_TH, ids_TK, weights_TK, w_gate_up, w_down, grad_TH = _experts_training_inputs(T, K, E, H, I, seed=3)
    inputs = (x_TH, weights_TK, w_gate_up, w_down)
    expected = torch.autograd.grad(reference.moe_experts(x_TH, ids_TK, weights_TK, w_gate_up, w_down), inputs, grad_TH)

    def backward():
        out = finteam_kernels.moe_experts(x_TH, ids_TK, weights_TK, w_gate_up, w_down, backend="cpu")
        grads = torch.autograd.grad(out, inputs, grad_TH)
        for name, a, b in zip(("x", "weights", "w_gate_up", "w_down"), grads, expected):
            assert_close(a, b, name=f"grad {name}")
        return grads

    first = backward()
    assert first[2].nbytes >= 32 << 20 and first[3].nbytes >= 32 << 20
    pointers = {first[2].data_ptr(), first[3].data_ptr()}
    first[2].fill_(float("nan"))  # stale values in a reused block must not show through
    del first
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        second = backward()
    assert {second[2].data_ptr(), second[3].data_ptr()} == pointers
    sizes = [e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    assert second[2].nbytes in sizes and second[3].nbytes in sizes, "the profiler did not see the cached blocks"
    grad_w_down = second[3]
    kept = grad_w_down.clone()
    grad_w_down.resize_(E + 1, H, I)  # grows through the same allocator, keeping the values
    assert torch.equal(grad_w_down[:E], kept)
    second[2].add_(1.0)
    buffer = io.BytesIO()
    torch.save(second[2], buffer)
    buffer.seek(0)
    assert torch.equal(torch.load(buffer), second[2])
    # An expert that gets no rows must get a weight gradient of exact zeros, not what its part
    # of a reused block held before.
    for grad in second:
        grad.fill_(float("nan"))
    del second, grad_w_down
    ids_TK = torch.where(ids_TK == 1, 2, ids_TK)
    out = finteam_kernels.moe_experts(x_TH, ids_TK, weights_TK, w_gate_up, w_down, backend="cpu")
    third = torch.autograd.grad(out, inputs, grad_TH)
    expected = torch.autograd.grad(reference.moe_experts(x_TH, ids_TK, weights_TK, w_gate_up, w_down), inputs, grad_TH)
    assert third[2].data_ptr() in pointers or third[3].data_ptr() in pointers, "no block was reused"
    assert not third[2][1].any() and not third[3][1].any(), "the empty expert's weight gradient is not zero"
    for name, a, b in zip(("x", "weights", "w_gate_up", "w_down"), third, expected):
        assert_close(a, b, name=f"grad {name}, expert 1 empty")


@pytest.mark.parametrize("case, cause", [
    ("recorded", "no C++ compiler found"),  # the build recorded why it could not compile
    ("absent", "was not built"),  # no library and no record (e.g. installed without the build step)
    ("broken", "failed to load"),  # a library that is there but cannot be loaded
])
def test_no_extension_gives_one_warning_naming_the_cause(case, cause, tmp_path, monkeypatch):
    # The package as it is without a usable library (pointed at an empty folder): ops still run,
    # on the reference, and the first use warns once with the cause.
    monkeypatch.delenv("FINTEAM_BACKEND", raising=False)
    if case == "recorded":
        (tmp_path / "_build_info.json").write_text(json.dumps(
            {"torch": torch.__version__, "not_built": {"cpu": "no C++ compiler found (c++: not found)"}}))
    if case == "broken":
        (tmp_path / "_C_cpu.cpython-311-x86_64-linux-gnu.so").write_text("not a library")
    monkeypatch.setattr(_ext, "_HERE", str(tmp_path))
    monkeypatch.setattr(_ext, "BUILD_INFO", str(tmp_path / "_build_info.json"))
    _ext.load.cache_clear()
    _ext.why_missing.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            logits = torch.randn(6, 8)
            for _ in range(3):
                routing = finteam_kernels.topk_gating(logits, 2)
                plan = finteam_kernels.dispatch(routing.ids_TK, 8)
                finteam_kernels.permute(torch.randn(6, 4), plan)
            assert _backend.pick_backend(None, torch.device("cpu"), "permute") == "reference"
    finally:
        _ext.load.cache_clear()
        _ext.why_missing.cache_clear()
    ours = [str(w.message) for w in caught if "finteam" in str(w.message)]
    assert len(ours) == 1, ours
    assert cause in ours[0]
