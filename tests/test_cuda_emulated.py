"""The CUDA kernel bodies (csrc/cuda/*.cu) run on the CPU through a stand-in for the CUDA
execution model (tests/cuda_emu/emu.h: a thread per CUDA thread, barriers, warp exchange,
WMMA by its documented semantics), compiled with the host C++ compiler, and are compared with
the reference. This is how the CUDA kernels' indexing, masking, tiling, tie-breaking and
reductions are checked on machines without a GPU; tests/test_cuda.py checks the same and more
(the torch glue, real concurrency, speed) on a GPU.

Shape legend: T tokens, H hidden, I expert intermediate, E experts, K top-k, N = T*K routed rows;
D and O are a GEMM's input and output widths.

Shapes are small (each CUDA thread is an OS thread) but chosen to break the kernels: partial
tiles, odd widths (the per-element paths), aligned widths (the 16-byte paths), empty experts.
"""
import ctypes
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from finteam_kernels import reference
from tolerance import assert_close

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_DIR = os.path.join(ROOT, "csrc", "cuda")
EMU_DIR = os.path.join(ROOT, "tests", "cuda_emu")
DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
LOW = (torch.float16, torch.bfloat16)
ACTS = {"silu": 0, "gelu": 1, "gelu_tanh": 2}


def rewrite_launches(src: str) -> str:
    """`kernel<...><<<cfg>>>(args)` -> `finteam_emu::launch(kernel<...>, finteam_emu::Config(cfg))(args)`,
    and `extern __shared__ T name[];` -> a pointer to the block's dynamic shared memory."""
    src = re.sub(r"extern __shared__ (\w+) (\w+)\[\];",
                 r"\1* \2 = static_cast<\1*>(finteam_emu::dynamic_shared());", src)
    out, i = [], 0
    while (j := src.find("<<<", i)) >= 0:
        k, depth = j, 0
        while src[k - 1].isspace():  # a formatter may break the line before <<<
            k -= 1
        while k > 0:  # back over the kernel's name and template arguments
            ch = src[k - 1]
            if ch == ">":
                depth += 1
            elif ch == "<":
                depth -= 1
            elif depth == 0 and not (ch.isalnum() or ch in "_:"):
                break
            k -= 1
        end = src.index(">>>", j)
        q, depth = end + 3, 0
        while True:  # to the parenthesis that closes the argument list
            depth += {"(": 1, ")": -1}.get(src[q], 0)
            if depth == 0 and src[q] == ")":
                break
            q += 1
        kernel = src[k:j].strip()
        out.append(f"{src[i:k]}finteam_emu::launch({kernel}, finteam_emu::Config({src[j + 3:end]})){src[end + 3:q + 1]}")
        i = q + 1
    out.append(src[i:])
    return "".join(out)


def cuda_include() -> str | None:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    dry = subprocess.run([nvcc, "-dryrun", "-c", "-x", "cu", os.devnull], capture_output=True, text=True)
    top = re.search(r"^#\$ TOP=(.+)$", dry.stdout + dry.stderr, re.MULTILINE)
    return os.path.join(os.path.realpath(top.group(1).strip()), "include") if top else None


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    include, cxx = cuda_include(), shutil.which("g++")
    if include is None or cxx is None:
        pytest.skip("needs the CUDA toolkit's headers (nvcc on PATH) and g++")
    out = tmp_path_factory.mktemp("cuda_emu")
    sources = []
    for name in sorted(f for f in os.listdir(CUDA_DIR) if f.endswith(".cu")):
        with open(os.path.join(CUDA_DIR, name)) as f:
            path = out / (name + ".cpp")
            path.write_text(rewrite_launches(f.read()))
            sources.append(str(path))
    sources.append(os.path.join(EMU_DIR, "runtime.cpp"))
    flags = ["-std=c++20", "-O1", "-fPIC", "-pthread", "-w", "-include", os.path.join(EMU_DIR, "emu.h"),
             "-I", CUDA_DIR, "-I", include]

    def compile_one(src):
        obj = str(out / (os.path.basename(src) + ".o"))
        proc = subprocess.run([cxx, *flags, "-c", src, "-o", obj], capture_output=True, text=True)
        assert proc.returncode == 0, f"{src}:\n{proc.stderr[-4000:]}"
        return obj

    with ThreadPoolExecutor(2) as pool:
        objects = list(pool.map(compile_one, sources))
    lib = str(out / "libfinteam_cuda_emu.so")
    proc = subprocess.run([cxx, "-shared", "-pthread", *objects, "-o", lib], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return ctypes.CDLL(lib)


def ptr(t: torch.Tensor | None):
    return ctypes.c_void_p(t.data_ptr() if t is not None else 0)


def call(emu, name: str, *args) -> None:
    """emu.<name>(*args): tensors go as pointers, ints as int64 (c_int as int), floats as float;
    must return 0 (cudaSuccess)."""
    converted = []
    for a in args:
        if isinstance(a, ctypes.c_int):
            converted.append(a)
        elif isinstance(a, torch.Tensor) or a is None:
            converted.append(ptr(a))
        elif isinstance(a, bool):
            converted.append(ctypes.c_int(int(a)))
        elif isinstance(a, float):
            converted.append(ctypes.c_float(a))
        else:
            converted.append(ctypes.c_int64(a))
    fn = getattr(emu, name)
    fn.restype = ctypes.c_int
    assert fn(*converted) == 0, f"{name} failed"


def int32(x: int) -> ctypes.c_int:
    return ctypes.c_int(x)


# ---- gating ----

def gating(emu, logits, k, *, score="softmax", renormalize=True, expert_bias=None, num_groups=1, topk_groups=1,
           scaling=1.0):
    T, E = logits.shape
    w = torch.empty(T, k)
    ids = torch.empty(T, k, dtype=torch.int32)
    counts = torch.empty(E, dtype=torch.int32)
    call(emu, "emu_topk_gating_fwd", logits, int32(DTYPES[logits.dtype]), logits.stride(0), logits.stride(1),
         expert_bias, T, E, k, int32(score == "sigmoid"), renormalize, num_groups, topk_groups, float(scaling), w, ids,
         counts)
    return w, ids, counts


def gating_grad(emu, grad, logits, ids, *, score="softmax", renormalize=True, scaling=1.0):
    T, E = logits.shape
    out = torch.empty(T, E, dtype=logits.dtype)
    call(emu, "emu_topk_gating_bwd", grad, grad.stride(0), grad.stride(1), logits, int32(DTYPES[logits.dtype]),
         logits.stride(0), logits.stride(1), ids, T, E, ids.shape[1], int32(score == "sigmoid"), renormalize,
         float(scaling), out)
    return out


def check_gating(emu, logits, k, **options):
    w, ids, counts = gating(emu, logits, k, **options)
    x32 = logits.detach().float().requires_grad_()
    want = reference.topk_gating(x32, k, **options)
    assert_close(ids, want.ids_TK, name="ids")
    assert_close(counts, want.tokens_per_expert_E, name="counts")
    assert_close(w, want.weights_TK.detach(), name="weights")
    grad = torch.randn(logits.shape[0], k)
    (want_grad,) = torch.autograd.grad(want.weights_TK, x32, grad)
    score = options.get("score", "softmax")
    got_grad = gating_grad(emu, grad, logits, ids, score=score, renormalize=options.get("renormalize", True),
                           scaling=options.get("scaling", 1.0))
    base = None
    if logits.dtype in LOW:
        xlow = logits.detach().requires_grad_()
        (base,) = torch.autograd.grad(reference.topk_gating(xlow, k, **options).weights_TK, xlow, grad)
    assert_close(got_grad, want_grad, baseline=base, name="grad_logits")


inf, nan = float("inf"), float("nan")


@pytest.mark.parametrize("T, E, K, options", [
    (0, 8, 2, {}),  # no tokens: counts zeroed, nothing launched
    (5, 1, 1, {}),  # one expert
    (6, 7, 7, dict(score="sigmoid")),  # K = E, prime E, a block with two of its four warps idle
    (9, 70, 3, dict(expert_bias="randn", scaling=2.5)),  # E past two warp widths; bias steers selection only
    (5, 64, 8, dict(score="sigmoid", expert_bias="randn", num_groups=8, topk_groups=4, renormalize=True)),  # DSv3
    (4, 8, 4, dict(num_groups=4, topk_groups=2)),  # groups of two, K = all of the kept groups
    (3, 7, 3, dict(score="sigmoid", num_groups=7, topk_groups=3, renormalize=False)),  # groups of one
    (2, 4096, 4, dict(num_groups=8, topk_groups=2)),  # a row of 4096 in shared memory: two warps a block
    (2, 512, 512, {}),  # K = E = 512: every pick, the whole tie order of the arg-max passes
])
def test_gating(emu, T, E, K, options):
    options = dict(options)
    if options.get("expert_bias") == "randn":
        options["expert_bias"] = 0.1 * torch.randn(E)
    check_gating(emu, torch.randn(T, E) * 2, K, **options)


def test_gating_nan_inf_ties_and_strides(emu):
    x = torch.tensor([
        [nan] * 8, [-inf] * 8, [inf] * 8,  # dead rows: experts 0..K-1, zero weights, zero gradient
        [nan, 1.0, -inf, 2.0, nan, 0.5, -inf, 3.0],  # NaN and -inf lose to every finite logit
        [0.0, inf, 1.0, 2.0, inf, 3.0, -1.0, nan],  # +inf is the largest float
        [0.0] * 8, [1.0, 0.0] * 4, [1.0, 2.0, 2.0, 1.0, 2.0, 0.0, 0.0, 0.0],  # ties to the lowest index
    ])
    for k in (1, 3):
        check_gating(emu, x, k)
        check_gating(emu, x, k, score="sigmoid", num_groups=4, topk_groups=2, scaling=2.0)
    check_gating(emu, torch.randn(11, 9).t(), 3)  # transposed logits: stride_e = 9 ... = T
    check_gating(emu, (torch.randint(-2, 3, (33, 8)) * 0.5).to(torch.bfloat16), 3)  # bf16, ties everywhere


# ---- router losses ----

@pytest.mark.parametrize("T, E, K, dtype", [
    (0, 4, 2, torch.float32),  # no tokens: both losses 0
    (3, 7, 2, torch.float32),  # one partial tile
    (70, 9, 3, torch.bfloat16),  # two tiles, the second partial
])
@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
def test_router_losses(emu, T, E, K, dtype, ids_dtype):
    logits = (torch.randn(T, E) * 3).to(dtype)
    ids = torch.rand(T, E).argsort(1)[:, :K].to(ids_dtype).contiguous()  # the glue passes ids contiguous
    scratch = torch.empty(emu_int(emu, "emu_router_losses_scratch_bytes", T, E), dtype=torch.uint8)
    aux, z = torch.empty(()), torch.empty(())
    call(emu, "emu_router_losses_fwd", logits, int32(DTYPES[dtype]), logits.stride(0), logits.stride(1), ids,
         int32(ids_dtype == torch.int64), T, E, K, scratch, aux, z)
    x32 = logits.float().requires_grad_()
    want = reference.router_losses(x32, ids, E)
    assert_close(aux, want.aux_loss.detach(), name="aux")
    assert_close(z, want.z_loss.detach(), name="z")
    if T == 0:
        return
    ga, gz = torch.randn(()), torch.randn(())
    grad = torch.empty(T, E, dtype=dtype)
    call(emu, "emu_router_losses_bwd", ga, gz, logits, int32(DTYPES[dtype]), logits.stride(0), logits.stride(1), ids,
         int32(ids_dtype == torch.int64), T, E, K, scratch, grad)
    (want_grad,) = torch.autograd.grad(ga * want.aux_loss + gz * want.z_loss, x32)
    base = None
    if dtype in LOW:
        xlow = logits.detach().requires_grad_()
        b = reference.router_losses(xlow, ids, E)
        (base,) = torch.autograd.grad(ga * b.aux_loss + gz * b.z_loss, xlow)
    assert_close(grad, want_grad, baseline=base, name="grad_logits")


def emu_int(emu, name, *args) -> int:
    fn = getattr(emu, name)
    fn.restype = ctypes.c_int64
    return fn(*[ctypes.c_int64(a) for a in args])


# ---- dispatch ----

def dispatch(emu, ids, E):
    N = ids.numel()
    scratch = torch.empty(emu_int(emu, "emu_dispatch_scratch_bytes", N, E), dtype=torch.uint8)
    offsets = torch.empty(E + 1, dtype=torch.int64)
    counts = torch.empty(E, dtype=torch.int32)
    r2s, s2r = torch.empty(N, dtype=torch.int32), torch.empty(N, dtype=torch.int32)
    call(emu, "emu_dispatch_fwd", ids.contiguous(), int32(ids.dtype == torch.int64), N, E, scratch, offsets, counts,
         r2s, s2r)
    return offsets, counts, r2s, s2r


@pytest.mark.parametrize("T, K, E, experts", [
    (0, 2, 8, None),  # no slots: offsets all zero
    (3, 2, 7, None),  # less than a warp's round
    (300, 2, 8, None),  # 600 slots: two tiles of 512, repeats inside every 32-slot round
    (400, 2, 5, [3]),  # every slot on one expert, across tiles
    (260, 3, 40, [0, 17, 39]),  # most experts empty, at both ends
    (300, 2, 512, None),  # E = 512: more experts than slots in a tile
])
@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
def test_dispatch(emu, T, K, E, experts, ids_dtype):
    pool = torch.arange(E) if experts is None else torch.tensor(experts)
    ids = pool[torch.rand(T, len(pool)).argsort(1)[:, :K]].to(ids_dtype)
    for name, got, want in zip(("offsets", "counts", "row_to_slot", "slot_to_row"), dispatch(emu, ids, E),
                               reference.dispatch(ids, E)):
        assert_close(got, want, name=name)


# ---- rows ----

def plan_for(T, K, E):
    return reference.dispatch(torch.rand(T, E).argsort(1)[:, :K].to(torch.int32), E)


def layout(rows, H, dtype, kind):
    if kind == "transposed":
        return torch.randn(H, rows).to(dtype).t()
    if kind == "offset":  # unit stride, misaligned by one element
        return torch.randn(rows, H + 1).to(dtype)[:, 1:]
    return torch.randn(rows, H).to(dtype)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("kind", ["contiguous", "transposed", "offset"])
# odd H; H of whole vectors, past 256 threads; K = 8 sources per combined row
@pytest.mark.parametrize("T, K, E, H", [(3, 2, 5, 33), (4, 3, 6, 264), (2, 8, 9, 40)])
def test_rows(emu, T, K, E, H, dtype, kind):
    plan = plan_for(T, K, E)
    N = T * K
    x = layout(T, H, dtype, kind)
    code = int32(DTYPES[dtype])
    # gather (permute) and its scaled form (unpermute's backward)
    x_NH = torch.empty(N, H, dtype=dtype)
    call(emu, "emu_gather_rows", x, code, x.stride(0), x.stride(1), plan.row_to_slot_N, K, None, N, H, x_NH)
    assert torch.equal(x_NH, reference.permute(x, plan))
    w = torch.rand(T, K)
    scaled = torch.empty(N, H, dtype=dtype)
    call(emu, "emu_gather_rows", x, code, x.stride(0), x.stride(1), plan.row_to_slot_N, K, w, N, H, scaled)
    want = (x.float()[plan.row_to_slot_N.long() // K] * w.reshape(-1)[plan.row_to_slot_N.long(), None]).to(dtype)
    assert_close(scaled.float(), want.float(), computed_in=torch.float32)
    # combine (unpermute), weighted and not (permute's backward)
    y = layout(N, H, dtype, kind)
    for weights in (w, None):
        out = torch.empty(T, H, dtype=dtype)
        call(emu, "emu_combine_rows", y, code, y.stride(0), y.stride(1), plan.slot_to_row_N, weights, T, K, H, out)
        wt = weights if weights is not None else torch.ones(T, K)
        expected = reference.unpermute(y.double() if dtype == torch.float32 else y.float(), plan, wt.double())
        baseline = reference.unpermute(y, plan, wt) if dtype in LOW else None
        assert_close(out, expected, baseline=baseline, name="combine")
    # row dots (the routing weights' gradient), with a stride-0 left operand
    g = torch.randn(1, 1).to(dtype).expand(T, H)
    dots = torch.empty(T, K)
    call(emu, "emu_row_dots", g, g.stride(0), g.stride(1), y, y.stride(0), y.stride(1), code, plan.slot_to_row_N, T, K,
         H, dots)
    want_dots = (g.double()[:, None, :] * y.double()[plan.slot_to_row_N.long()].view(T, K, H)).sum(-1)
    assert_close(dots, want_dots.float(), name="row dots", computed_in=torch.float32)


def test_rows_and_gating_read_rows_past_2_pow_31_elements(emu):
    # Inputs whose rows lie 2**31 - 2**20 elements apart (row 2 past 2**32, in a lazily mapped
    # buffer): a kernel that forms a row's offset in 32 bits reads a wrong row, or outside the
    # buffer, instead of failing quietly in the small shapes above.
    from test_addressing_64bit import far_rows

    H, E = 40, 5
    x = far_rows(3, H, torch.bfloat16)
    code = int32(DTYPES[torch.bfloat16])
    plan = plan_for(3, 2, E)  # 3 tokens, 6 routed rows
    x_NH = torch.empty(6, H, dtype=x.dtype)
    call(emu, "emu_gather_rows", x, code, x.stride(0), x.stride(1), plan.row_to_slot_N, 2, None, 6, H, x_NH)
    assert torch.equal(x_NH, reference.permute(x.contiguous(), plan)), "gather from far rows"
    one = plan_for(1, 3, E)  # 1 token on 3 experts: the 3 routed rows to combine are the far ones
    w = torch.rand(1, 3)
    out = torch.empty(1, H, dtype=x.dtype)
    call(emu, "emu_combine_rows", x, code, x.stride(0), x.stride(1), one.slot_to_row_N, w, 1, 3, H, out)
    want = reference.unpermute(x.contiguous().float(), one, w)
    assert_close(out, want, baseline=reference.unpermute(x.contiguous(), one, w), name="combine from far rows")
    logits = far_rows(3, 70, torch.float32)
    w_got, ids_got, _ = gating(emu, logits, 3)
    want_gating = reference.topk_gating(logits.contiguous(), 3)
    assert torch.equal(ids_got.long(), want_gating.ids_TK.long()), "gating of far rows"
    assert_close(w_got, want_gating.weights_TK, name="gating weights of far rows")


# ---- grouped GEMM ----

def offsets_from(counts):
    return torch.tensor([0] + list(counts)).cumsum(0)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("counts, D, O", [
    ([0, 3, 0, 130, 0], 33, 17),  # empty experts around a group past one tile; odd D and O: per-element loads
    ([129, 1, 64], 64, 136),  # groups around tile edges, O past a 128-column tile, vector loads, two K steps
    ([0, 0], 16, 8),  # no rows: dW exactly zero
])
def test_grouped_gemm(emu, counts, D, O, dtype):
    offsets = offsets_from(counts)
    N, E = sum(counts), len(counts)
    x = torch.randn(N + 3, D).to(dtype)  # three rows past offsets[E]: written as zeros
    w = (torch.randn(E, O, D) / D**0.5).to(dtype)
    code = int32(DTYPES[dtype])
    wide = torch.float64 if dtype == torch.float32 else torch.float32
    y = torch.empty(N + 3, O, dtype=dtype)
    call(emu, "emu_grouped_gemm_fwd", x, w, offsets, code, N + 3, D, O, E, y)
    base = reference.grouped_gemm(x[:N], w, offsets) if dtype in LOW else None
    assert_close(y[:N], reference.grouped_gemm(x[:N].to(wide), w.to(wide), offsets), baseline=base, name="y")
    assert torch.equal(y[N:], torch.zeros(3, O, dtype=dtype)), "rows past the last expert must be zeros"

    grad = torch.randn(N, O).to(dtype)
    x_, w_ = x[:N].to(wide).requires_grad_(), w.to(wide).requires_grad_()
    want_dx, want_dw = torch.autograd.grad(reference.grouped_gemm(x_, w_, offsets), (x_, w_), grad.to(wide))
    base_dx = base_dw = None
    if dtype in LOW:
        xl, wl = x[:N].clone().requires_grad_(), w.clone().requires_grad_()
        base_dx, base_dw = torch.autograd.grad(reference.grouped_gemm(xl, wl, offsets), (xl, wl), grad)
    for out_f32 in (False, True):
        dx = torch.empty(N, D, dtype=torch.float32 if out_f32 else dtype)
        call(emu, "emu_grouped_gemm_dx", grad, w, offsets, code, N, D, O, E, out_f32, dx)
        assert_close(dx, want_dx, baseline=base_dx, name="dx", computed_in=dtype if dtype in LOW else None)
    dw = torch.full((E, O, D), float("nan"), dtype=dtype)
    call(emu, "emu_grouped_gemm_dw", grad, x, offsets, code, N, D, O, E, dw)
    assert_close(dw, want_dw, baseline=base_dw, name="dw")
    for e, n in enumerate(counts):
        if n == 0:
            assert torch.equal(dw[e], torch.zeros(O, D, dtype=dtype)), f"expert {e} is empty: dW must be exact zeros"


# ---- GLU and the expert backward it serves ----

@pytest.mark.parametrize("activation", list(ACTS))
@pytest.mark.parametrize("dtype, I", [(torch.float32, 12), (torch.bfloat16, 16), (torch.float16, 7)])
def test_glu(emu, activation, dtype, I):
    N, T, K = 6, 3, 2
    h = torch.randn(N, 2 * I).to(dtype)
    r2s = torch.randperm(N).to(torch.int32)
    w = torch.rand(T * K)
    code, act = int32(DTYPES[dtype]), int32(ACTS[activation])
    wide = torch.float64 if dtype == torch.float32 else torch.float32
    a = torch.empty(N, I, dtype=dtype)
    call(emu, "emu_glu_fwd", h, code, N, I, act, None, None, a)
    base = reference.glu(h, activation) if dtype in LOW else None
    assert_close(a, reference.glu(h.to(wide), activation), baseline=base, name="glu")

    # Backward: dh = w * d(glu)/dh . da and grad_w = <da, glu(h)>, row r taking slot r2s[r].
    da = torch.randn(N, I)
    dh = torch.empty(N, 2 * I, dtype=dtype)
    gw = torch.empty(T * K)
    call(emu, "emu_glu_bwd", da, h, code, N, I, act, w, r2s, dh, gw)
    hw = h.to(wide).requires_grad_()
    ww = w.to(wide)[r2s.long()].requires_grad_()
    out = reference.glu(hw, activation) * ww[:, None]
    want_dh, want_w = torch.autograd.grad(out, (hw, ww), da.to(wide))
    base_dh = None
    if dtype in LOW:
        hl = h.clone().requires_grad_()
        (base_dh,) = torch.autograd.grad(reference.glu(hl, activation) * w[r2s.long()][:, None].to(dtype), hl,
                                         da.to(dtype))
    assert_close(dh, want_dh, baseline=base_dh, name="dh")
    # grad_w reads h exactly and sums in fp32, whatever h's dtype: tight in every case.
    assert_close(gw[r2s.long()], want_w.float(), name="grad_w")


# ---- the expert computation, composed as csrc/cuda/ops_cuda.cpp composes it ----

def moe_experts(emu, x, ids, w, gate_up, down, activation):
    """Forward and backward (for grad_out) through the emulated kernels, in the order and with the
    buffers of moe_experts_fwd/bwd in ops_cuda.cpp: this checks that composition, in particular the
    backward that never forms the down projection's output."""
    T, H = x.shape
    K, E, I = ids.shape[1], gate_up.shape[0], down.shape[2]
    N, code, act = T * K, int32(DTYPES[x.dtype]), int32(ACTS[activation])
    offsets, _, r2s, s2r = dispatch(emu, ids, E)
    w = w.float().contiguous().reshape(-1)

    def gemm(kind, a, b, rows_dtype=x.dtype, out_f32=False, D=None, O=None):
        if kind == "fwd":
            out = torch.empty(N, O, dtype=rows_dtype)
            call(emu, "emu_grouped_gemm_fwd", a, b, offsets, code, N, D, O, E, out)
        elif kind == "dx":
            out = torch.empty(N, D, dtype=torch.float32 if out_f32 else rows_dtype)
            call(emu, "emu_grouped_gemm_dx", a, b, offsets, code, N, D, O, E, out_f32, out)
        else:
            out = torch.empty(E, O, D, dtype=rows_dtype)
            call(emu, "emu_grouped_gemm_dw", a, b, offsets, code, N, D, O, E, out)
        return out

    def gather(src, scale=None):
        out = torch.empty(N, src.shape[1], dtype=src.dtype)
        call(emu, "emu_gather_rows", src, code, src.stride(0), src.stride(1), r2s, K, scale, N, src.shape[1], out)
        return out

    def combine(src, weight=None):
        out = torch.empty(T, src.shape[1], dtype=src.dtype)
        call(emu, "emu_combine_rows", src, code, src.stride(0), src.stride(1), s2r, weight, T, K, src.shape[1], out)
        return out

    x_NH = gather(x)
    h = gemm("fwd", x_NH, gate_up, D=H, O=2 * I)
    a = torch.empty(N, I, dtype=x.dtype)
    call(emu, "emu_glu_fwd", h, code, N, I, act, None, None, a)
    out = combine(gemm("fwd", a, down, D=I, O=H), w)

    grad = torch.randn(T, H).to(x.dtype)
    g_NH = gather(grad)
    wa = torch.empty(N, I, dtype=x.dtype)
    call(emu, "emu_glu_fwd", h, code, N, I, act, w, r2s, wa)
    grad_down = gemm("dw", g_NH, wa, D=I, O=H)
    da = gemm("dx", g_NH, down, out_f32=True, D=I, O=H)
    dh = torch.empty(N, 2 * I, dtype=x.dtype)
    grad_w = torch.empty(N)
    call(emu, "emu_glu_bwd", da, h, code, N, I, act, w, r2s, dh, grad_w)
    grad_gate_up = gemm("dw", dh, x_NH, D=H, O=2 * I)
    grad_x = combine(gemm("dx", dh, gate_up, D=H, O=2 * I))
    return out, grad, (grad_x, grad_w.view(T, K), grad_gate_up, grad_down)


@pytest.mark.parametrize("activation", list(ACTS))
@pytest.mark.parametrize("dtype, T, K, E, H, I", [
    (torch.float32, 5, 2, 4, 24, 16),  # vectors everywhere
    (torch.float32, 3, 2, 5, 9, 7),  # odd widths: per-element loads
    (torch.bfloat16, 6, 2, 3, 32, 16),  # tensor-core tiles
])
def test_moe_experts_composition(emu, activation, dtype, T, K, E, H, I):
    ids = torch.rand(T, E).argsort(1)[:, :K].to(torch.int64).contiguous()
    x = torch.randn(T, H).to(dtype)
    w = torch.rand(T, K)
    gate_up = (torch.randn(E, 2 * I, H) / H**0.5).to(dtype)
    down = (torch.randn(E, H, I) / I**0.5).to(dtype)
    out, grad, grads = moe_experts(emu, x, ids, w, gate_up, down, activation)

    wide = torch.float64 if dtype == torch.float32 else torch.float32
    leaves = [t.to(wide).requires_grad_() for t in (x, w, gate_up, down)]
    want = reference.moe_experts(leaves[0], ids, leaves[1], leaves[2], leaves[3], activation)
    want_grads = torch.autograd.grad(want, leaves, grad.to(wide))
    base, base_grads = None, [None] * 4
    if dtype in LOW:
        low = [x.clone().requires_grad_(), w.clone().requires_grad_(), gate_up.clone().requires_grad_(),
               down.clone().requires_grad_()]
        base = reference.moe_experts(low[0], ids, low[1], low[2], low[3], activation)
        base_grads = torch.autograd.grad(base, low, grad)
    computed_in = dtype if dtype in LOW else None
    assert_close(out, want.detach(), baseline=None if base is None else base.detach(), name="out")
    for name, got, expected, b in zip(("x", "weights", "w_gate_up", "w_down"), grads, want_grads, base_grads):
        assert_close(got, expected, baseline=b, name=f"grad {name}", computed_in=computed_in)


# ---- memory safety: indices out of range are masked, never followed ----
# The Python ops refuse such inputs before launching (tests/test_memory_safety.py); here the
# kernels get them anyway, as a direct caller of the library could pass them: they must stay
# inside their tensors (on a GPU they also raise a device-side assertion, not emulated here).

@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
def test_dispatch_masks_ids_out_of_range(emu, ids_dtype):
    T, K, E = 300, 2, 5
    ids = torch.rand(T, E).argsort(1)[:, :K].to(ids_dtype)
    bad = {(7, 0): E, (150, 1): -3, (299, 1): 2**40 + 1 if ids_dtype == torch.int64 else 10**6}
    for (t, j), value in bad.items():
        ids[t, j] = value
    offsets, counts, r2s, s2r = dispatch(emu, ids, E)
    good = ids.reshape(-1)[(ids.reshape(-1) >= 0) & (ids.reshape(-1) < E)]
    assert torch.equal(counts, torch.bincount(good.long(), minlength=E).int())  # counted nowhere
    assert int(offsets[-1]) == T * K - len(bad)
    slots = torch.tensor([t * K + j for t, j in bad])
    assert torch.equal(s2r[slots], torch.full((len(bad),), -1, dtype=torch.int32))  # placed nowhere
    placed = torch.ones(T * K, dtype=torch.bool)
    placed[slots] = False
    assert torch.equal(r2s[s2r[placed].long()], torch.arange(T * K)[placed].int())


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_rows_mask_indices_out_of_range(emu, dtype):
    T, K, E, H = 4, 2, 3, 40
    N = T * K
    plan = plan_for(T, K, E)
    code = int32(DTYPES[dtype])
    x, y, w = torch.randn(T, H).to(dtype), torch.randn(N, H).to(dtype), torch.rand(T, K)
    r2s, s2r = plan.row_to_slot_N.clone(), plan.slot_to_row_N.clone()
    r2s[1], r2s[5], s2r[2], s2r[6] = N, -1, 10**8, -7
    x_NH = torch.empty(N, H, dtype=dtype)
    call(emu, "emu_gather_rows", x, code, x.stride(0), x.stride(1), r2s, K, w, N, H, x_NH)
    assert torch.equal(x_NH[[1, 5]], torch.zeros(2, H, dtype=dtype))
    out = torch.empty(T, H, dtype=dtype)
    call(emu, "emu_combine_rows", y, code, y.stride(0), y.stride(1), s2r, w, T, K, H, out)
    kept = w.clone()
    kept.view(-1)[[2, 6]] = 0  # the slots whose rows are out of range add nothing
    fixed = plan._replace(slot_to_row_N=torch.where((s2r >= 0) & (s2r < N), s2r, 0))
    assert_close(out, reference.unpermute(y.float(), fixed, kept), baseline=reference.unpermute(y, fixed, kept)
                 if dtype in LOW else None, name="combine")
    dots = torch.full((T, K), float("nan"))
    call(emu, "emu_row_dots", x, x.stride(0), x.stride(1), y, y.stride(0), y.stride(1), code, s2r, T, K, H, dots)
    assert torch.equal(dots.view(-1)[[2, 6]], torch.zeros(2))


def test_gating_backward_and_counts_mask_ids_out_of_range(emu):
    T, E, K = 5, 6, 2
    logits = torch.randn(T, E)
    ids = torch.rand(T, E).argsort(1)[:, :K].to(torch.int32)
    ids[3, 1] = E + 100
    grad = gating_grad(emu, torch.randn(T, K), logits, ids, score="softmax", renormalize=True, scaling=1.0)
    assert torch.equal(grad[3], torch.zeros(E))  # the token with a bad id gets no gradient
    assert torch.isfinite(grad).all()
    scratch = torch.empty(emu_int(emu, "emu_router_losses_scratch_bytes", T, E), dtype=torch.uint8)
    aux, z = torch.empty(()), torch.empty(())
    call(emu, "emu_router_losses_fwd", logits, int32(0), logits.stride(0), logits.stride(1), ids, int32(0), T, E, K,
         scratch, aux, z)
    assert torch.isfinite(aux) and torch.isfinite(z)


def test_grouped_gemm_clamps_offsets_out_of_range(emu):
    N, D, O, E = 9, 16, 8, 3
    x, w = torch.randn(N, D), torch.randn(E, O, D)
    y = torch.full((N, O), float("nan"))
    call(emu, "emu_grouped_gemm_fwd", x, w, torch.tensor([0, 4, 10**6, 9]), int32(0), N, D, O, E, y)
    assert torch.isfinite(y).all()  # rows 4.. go to expert 1 as far as the rows go; nothing outside x or y
