"""What only a GPU run of the compiled kernels can show, on both GPU backends (the compiled
Triton kernels and the CUDA library): the ops under torch.compile (inductor), the inference path
captured in a CUDA graph (with run-time tuning on: none may happen during capture), no host
synchronisation, gating that picks the reference's experts on near-ties, the TF32 path, and
the tuned-config machinery. Marked `cuda`: run by `FINTEAM_GPU_TESTS=1 pytest`, skipped without
a GPU.

Shape legend: T tokens, H hidden, I expert intermediate, E experts, K top-k.
"""
import json

import pytest
import torch
from routing import routed
from tolerance import assert_close

from finteam_kernels import _ext, configs, moe_experts, reference, router_losses, topk_gating
from finteam_kernels._backend import triton_interpreting

pytestmark = pytest.mark.cuda


@pytest.fixture(params=["triton", "cuda"])
def backend(request):
    if request.param == "cuda":
        reason = _ext.why_missing("cuda", "moe_experts")
        assert reason is None, f"on a GPU machine the CUDA extension must load: {reason}"
    else:
        assert not triton_interpreting(), "the GPU suite runs compiled Triton kernels: unset TRITON_INTERPRET"
    return request.param


def moe_inputs(T, K, E, H, I, dtype, requires_grad=False):
    g = torch.Generator(device="cuda").manual_seed(T * 1000 + E)
    x = torch.randn(T, H, device="cuda", generator=g).to(dtype)
    logits = torch.randn(T, E, device="cuda", generator=g)
    gate_up = (torch.randn(E, 2 * I, H, device="cuda", generator=g) / H**0.5).to(dtype)
    down = (torch.randn(E, H, I, device="cuda", generator=g) / I**0.5).to(dtype)
    return [t.requires_grad_(requires_grad) for t in (x, logits, gate_up, down)]


def moe_block(x, logits, gate_up, down, K, backend):
    routing = topk_gating(logits, K, backend=backend)
    return moe_experts(x, routing.ids_TK, routing.weights_TK, gate_up, down, backend=backend)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_moe_block_under_torch_compile(backend, dtype):
    """Gating, experts and router losses compiled by inductor in one graph (fullgraph: no
    breaks), forward and backward, against the reference (fp32 tight against fp64; bf16 at
    most twice plain PyTorch's own bf16 error)."""
    T, K, E, H, I = 96, 2, 8, 64, 48
    inputs = moe_inputs(T, K, E, H, I, dtype)

    def step(backend, x, logits, gate_up, down):
        routing = topk_gating(logits, K, backend=backend)
        out = moe_experts(x, routing.ids_TK, routing.weights_TK, gate_up, down, backend=backend)
        losses = router_losses(logits, routing.ids_TK, E, backend=backend)
        return out, losses.aux_loss + losses.z_loss

    def grads(fn, backend, tensors):
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        out, loss = fn(backend, *leaves)
        return [out.detach(), *torch.autograd.grad(out.float().square().mean() + loss, leaves)]

    def reference_step(_, x, logits, gate_up, down):
        routing = reference.topk_gating(logits, K)
        out = reference.moe_experts(x, routing.ids_TK, routing.weights_TK, gate_up, down)
        losses = reference.router_losses(logits, routing.ids_TK, E)
        return out, losses.aux_loss + losses.z_loss

    torch._dynamo.reset()
    got = grads(torch.compile(step, fullgraph=True), backend, inputs)
    wide = torch.float64 if dtype == torch.float32 else torch.float32
    # the logits stay fp32 (the routing math is fp32 in every backend), so the picks agree
    want = grads(reference_step, None, [t if i == 1 else t.to(wide) for i, t in enumerate(inputs)])
    base = grads(reference_step, None, inputs) if dtype != torch.float32 else [None] * len(want)
    for name, g, w, b in zip(["out", "dx", "dlogits", "dgate_up", "ddown"], got, want, base):
        computed_in = dtype if name == "dlogits" and dtype != torch.float32 else None
        assert_close(g, w, baseline=b, name=f"compiled {name}", computed_in=computed_in)


def test_inference_path_captures_in_a_cuda_graph_without_tuning(backend, monkeypatch):
    """Gating and experts under no_grad captured in a CUDA graph on a shape never run before,
    run-time tuning on (FINTEAM_AUTOTUNE=1), no table: the capture must take the heuristic
    configs (tuning synchronises and would break the capture). The replay matches the reference;
    a second capture after an eager warm-up replays the warm-up's configs bit for bit."""
    from finteam_kernels.ops import grouped_gemm_kernels as kernels

    monkeypatch.setenv("FINTEAM_AUTOTUNE", "1")
    monkeypatch.setenv("FINTEAM_CONFIG_DIR", "/nonexistent")
    monkeypatch.setattr(kernels, "_TUNED_HERE", {})
    configs.table.cache_clear()
    T, K, E, H, I = 200, 2, 8, 128, 96
    x, logits, gate_up, down = moe_inputs(T, K, E, H, I, torch.bfloat16)
    static_x, static_logits = x.clone(), logits.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad():
        # compile every kernel outside the graph, with the heuristic configs and no tuning
        monkeypatch.setenv("FINTEAM_AUTOTUNE", "0")
        with torch.cuda.stream(stream):
            moe_block(static_x, static_logits, gate_up, down, K, backend)
        torch.cuda.current_stream().wait_stream(stream)
        monkeypatch.setenv("FINTEAM_AUTOTUNE", "1")
        with torch.cuda.graph(graph):
            captured = moe_block(static_x, static_logits, gate_up, down, K, backend)
    assert not kernels._TUNED_HERE, "nothing may be tuned during capture"
    static_x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    routing = reference.topk_gating(static_logits, K)
    want = reference.moe_experts(static_x.float(), routing.ids_TK, routing.weights_TK, gate_up.float(), down.float())
    base = reference.moe_experts(static_x, routing.ids_TK, routing.weights_TK, gate_up, down)
    assert_close(captured, want, baseline=base, name="replayed output")

    with torch.no_grad():
        eager = moe_block(static_x, static_logits, gate_up, down, K, backend)  # tunes (triton), then remembers
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = moe_block(static_x, static_logits, gate_up, down, K, backend)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)


def test_training_step_never_synchronises(backend):
    """Gating, router losses, experts forward and backward with sync debug mode "error" (after
    a first run that compiles and tunes)."""
    T, K, E, H, I = 256, 4, 16, 64, 32
    leaves = moe_inputs(T, K, E, H, I, torch.bfloat16, requires_grad=True)

    def step():
        x, logits, gate_up, down = leaves
        routing = topk_gating(logits, K, backend=backend)
        out = moe_experts(x, routing.ids_TK, routing.weights_TK, gate_up, down, backend=backend)
        losses = router_losses(logits, routing.ids_TK, E, backend=backend)
        return torch.autograd.grad(out.float().square().mean() + losses.aux_loss + losses.z_loss, leaves)

    first = step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        again = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def near_ties(T: int, E: int) -> torch.Tensor:
    """Logits a few ulps apart within each row, so that their scores tie or differ by an ulp or
    two depending on how exp rounds."""
    base = torch.randn(T, 1, device="cuda").expand(T, E).contiguous()
    steps = torch.randint(0, 4, (T, E), device="cuda").float()
    return base + steps * base.abs().clamp_min(1e-3) * 2**-23


@pytest.mark.parametrize("options", [
    dict(),
    dict(expert_bias="small"),  # the bias tips the near-ties
    dict(expert_bias="small", num_groups=8, topk_groups=3),  # DeepSeek-V3's group ratings
])
@pytest.mark.parametrize("E", [8, 64, 256, 512])
def test_gating_near_ties_pick_the_reference_experts(backend, E, options):
    """On near-ties only the rounding of exp and of the division decides the picks: the kernels
    must round as PyTorch's CUDA sigmoid does (1 / (1 + expf(-x)), IEEE division; the Triton
    kernels use libdevice's expf and div_rn, not ex2.approx and div.full), so that the ids equal
    the reference's exactly. Sigmoid scores are elementwise, so equal rounding gives equal
    scores; softmax scores also depend on the order of the row's sum, which no two
    implementations share, so softmax is held to exact ties only (test_cuda)."""
    options = dict(options, score="sigmoid")
    if options.get("expert_bias") == "small":
        options["expert_bias"] = torch.randint(-2, 3, (E,), device="cuda").float() * 2**-25
    K = 8 if E > 8 else 4
    if options.get("num_groups", 1) > 1:
        K = min(K, options["topk_groups"] * (E // options["num_groups"]))
    logits = near_ties(4096, E)
    got = topk_gating(logits, K, backend=backend, **options)
    want = reference.topk_gating(logits, K, **options)
    assert torch.equal(got.ids_TK, want.ids_TK)
    assert torch.equal(got.tokens_per_expert_E, want.tokens_per_expert_E)


@pytest.mark.parametrize("glu", [False, True])
def test_fp32_takes_tf32_when_pytorch_allows_it(glu):
    """With allow_tf32 the fp32 GEMMs run on tensor cores: their error against fp64 is TF32's
    (far above fp32's), and at most twice what PyTorch's own TF32 matmul makes."""
    from finteam_kernels.ops.grouped_gemm import gemm

    counts, D, O = [300, 0, 129, 64], 256, 192
    offsets = torch.tensor([0] + counts, device="cuda").cumsum(0)
    N = sum(counts)
    x = torch.randn(N, D, device="cuda")
    w = torch.randn(len(counts), 2 * O if glu else O, D, device="cuda") / D**0.5
    exact = reference.grouped_gemm(x.double(), w.double(), offsets)

    def run():
        return gemm(x, w, offsets, activation="silu", keep_h=True)[1] if glu else gemm(x, w, offsets)[0]

    allowed = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch_tf32 = reference.grouped_gemm(x, w, offsets)
        err = float((run().double() - exact).abs().max())
        base = float((torch_tf32.double() - exact).abs().max())
        torch.backends.cuda.matmul.allow_tf32 = False
        assert_close(run(), exact.float(), name="fp32 without TF32")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allowed
    assert err <= 2 * base + 1e-6, (err, base)
    assert err > 1e-5, f"fp32 error {err:.1e}: TF32 was not used"


def test_moe_experts_strided_inputs(backend):
    """x as a transposed view, weights as slices of larger tensors, routing weights strided."""
    T, K, E, H, I = 70, 2, 8, 64, 40
    x = torch.randn(H, T, device="cuda", dtype=torch.bfloat16).t()
    gate_up = torch.randn(E, 2 * I, H + 8, device="cuda", dtype=torch.bfloat16)[..., :H] / H**0.5
    down = torch.randn(E, I, H, device="cuda", dtype=torch.bfloat16).transpose(1, 2) / I**0.5
    ids = routed(T, K, E).cuda()
    w = torch.rand(K, T, device="cuda").t()
    got = moe_experts(x, ids, w, gate_up, down, backend=backend)
    want = reference.moe_experts(x.float(), ids, w, gate_up.float(), down.float())
    base = reference.moe_experts(x, ids, w, gate_up, down)
    assert_close(got, want, baseline=base, name="strided moe_experts")


def test_tuned_table_is_used_and_tuning_is_remembered(tmp_path, monkeypatch):
    """A table entry for this GPU decides the config (no tuning); without one, run-time tuning
    runs once per problem and row bucket, and its result is correct."""
    from finteam_kernels.ops import grouped_gemm_kernels as kernels
    from finteam_kernels.ops.grouped_gemm import gemm

    monkeypatch.setenv("FINTEAM_AUTOTUNE", "1")
    monkeypatch.setenv("FINTEAM_CONFIG_DIR", str(tmp_path))
    monkeypatch.setattr(kernels, "_TUNED_HERE", {})
    counts, D, O = [100, 0, 60, 3], 128, 96
    offsets = torch.tensor([0] + counts, device="cuda").cumsum(0)
    x = torch.randn(sum(counts), D, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(len(counts), O, D, device="cuda", dtype=torch.bfloat16) / D**0.5
    want = reference.grouped_gemm(x.float(), w.float(), offsets)
    base = reference.grouped_gemm(x, w, offsets)
    configs.table.cache_clear()
    assert_close(gemm(x, w, offsets)[0], want, baseline=base, name="tuned at run time")
    assert len(kernels._TUNED_HERE) == 1
    flags = {"GATHER": False, "ACTIVATION": "none", "STORE_H": False}
    problem = kernels.gemm_problem("plain", x, w, x.shape[0], O, D, len(counts), flags)
    chosen = kernels.GEMM_CONFIGS["plain"][-1]
    name = configs.device_name(torch.cuda.current_device())
    (tmp_path / configs.file_name(name)).write_text(json.dumps(
        {"device": name, "triton": "", "torch": "", "date": "", "gemm": {problem: {"256": list(chosen)}}}))
    configs.table.cache_clear()
    try:
        assert kernels.launch_config("gemm", "plain", problem, x.shape[0], len(counts), x.device) == \
            kernels.gemm_meta(chosen)
        assert_close(gemm(x, w, offsets)[0], want, baseline=base, name="from the table")
    finally:
        configs.table.cache_clear()
