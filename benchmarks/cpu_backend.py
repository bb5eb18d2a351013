"""The compiled CPU backend against its targets: one run, one table, JSON alongside.

Shape legend: T tokens, H hidden, I expert intermediate, E experts, K top-k, N = T*K routed rows.

1. The whole expert computation (bf16, H=1024, I=3584, E=8, K=2; T = 1, 16, 2048): our `cpu`
   moe_experts against transformers' Mixtral experts with experts_implementation "eager" and
   "grouped_mm", all on the same weights. Enough weight copies are rotated, each provider on
   its own, that between two reads of a copy twice the last-level cache of others is read: every
   call streams its weights from memory as a model's layers do. Each case's fraction of its
   ceiling, timed in the same rounds as the providers (the rate of a shared machine drifts by
   tens of percent within a run, so a ceiling measured at another moment cannot judge a case):
     T = 1, 16   bytes of the experts the tokens hit / time, over the weight-streaming roof: a
                 plain read of the same bytes (an integer max over each expert's weights). The
                 run's ceilings (a bf16 gemv, a read and a copy of a large buffer; a copy counts
                 written bytes too, which decode does not move) are printed, and each case's
                 fraction of the copy rate is in the JSON
     T = 2048    FLOPs / time, over a dense GEMM of the same FLOPs, the case's [N, H] @ [H, 3I],
                 in the data type the library multiplies in here (bf16; fp32 on operands
                 widened beforehand below AVX-512). The dense GEMM probes at the run's start and
                 end (that shape and the square one, the best of them) are printed beside it
   Targets: >= 1.3x the better transformers path at T=1, >= 1.5x at T=16, >= 1x at T=2048; and
   >= 90% of the streaming roof at T = 1, 16, >= 85% of the GEMM rate at T = 2048.
2. The routing ops at T=4096, E=64, K=2, H=1024 against the plain-PyTorch reference (the
   functions in finteam_kernels.reference), both on inputs that are warm in cache, as they are
   when the previous op of the layer just wrote them: gating (fp32 logits, softmax, top-2,
   renormalise) and weighted unpermute >= 3x, dispatch plan >= 2x, permute (bf16) >= 1x.
3. The tiny pipeline's shapes (H=128, I=256, E=3, K=2, fp32): decode, T = 1 and 8, forward,
   ours >= 2x the better transformers path (the MoE blocks are about half of a tiny decode
   step); training, 8 x 128 tokens, forward and backward, ours >= 1.2x the better transformers
   path, and its fraction of ATen's fp32 GEMM rate on a dense GEMM of the same FLOPs.
4. kt-kernel, KTransformers' CPU MoE kernels, run in their own environment (kt_peer.py; listed
   as skipped when absent), on the quick Mixtral (H=1024, I=3584, E=8, K=2) and Qwen3 (H=512,
   I=192, E=128, K=8) shapes at T = 1, 16, 256, bf16, at 1 and 2 worker threads, its weight
   packing untimed. Target: ours >= 1.5x kt at its better thread setting.
Ours is timed through the public op (argument checks and custom-op dispatch included).
Providers of one case are timed interleaved (one call of each per round, the order rotating), so
that a drift in the machine's memory bandwidth or load while the case runs hits them alike.

    python benchmarks/cpu_backend.py [--full] [--threads N] [--no-kt] [--out DIR]

The machine's load is printed before and after (load average, and the share of the last 10 s in
which a runnable task waited for a CPU): on a shared machine any other busy process makes a
2-thread parallel region wait for a descheduled thread, so compare numbers taken at low load.
"""
from __future__ import annotations

import argparse
import sys

import torch

import harness

import finteam_kernels
from finteam_kernels import _ext, reference  # noqa: E402

H, I, E, K = 1024, 3584, 8, 2
EXPERT_TOKENS = (1, 16, 2048)
EXPERT_TARGETS = {1: 1.3, 16: 1.5, 2048: 1.0}
FRACTION_TARGETS = {1: 0.9, 16: 0.9, 2048: 0.85}  # of the weight-streaming rate; of the dense GEMM rate
OPS_T, OPS_E = 4096, 64
OP_TARGETS = {"gating": 3.0, "dispatch plan": 2.0, "permute": 1.0, "unpermute": 3.0}


def _routing(T: int, num_experts: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct random experts per token and renormalised weights (bf16, as a model passes them)."""
    g = torch.Generator().manual_seed(seed)
    ids_TK = torch.rand(T, num_experts, generator=g).argsort(dim=1)[:, :K]
    weights_TK = torch.rand(T, K, generator=g).softmax(dim=1).to(torch.bfloat16)
    return ids_TK, weights_TK


def _transformers_experts(implementation: str, w_gate_up_E2IH: torch.Tensor, w_down_EHI: torch.Tensor):
    """A Mixtral experts module of transformers whose parameters are our weight tensors (no copy)."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    config = MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=K)
    config._experts_implementation = implementation
    with torch.device("meta"):
        module = MixtralExperts(config)
    module.gate_up_proj = torch.nn.Parameter(w_gate_up_E2IH, requires_grad=False)
    module.down_proj = torch.nn.Parameter(w_down_EHI, requires_grad=False)
    return module


def dense_gemm_rate(quick: bool, dtypes: tuple) -> float:
    """TFLOP/s of a dense GEMM on bf16 data with the FLOPs of the T=2048 case (2*N*H*3I): the
    best of the case's own shape ([N, H] @ [H, 3I]) and the square GEMM of the same FLOPs, each
    in bf16 and in fp32 on operands widened beforehand (untimed; on a CPU without AVX-512,
    ATen's fp32 GEMM is several times its bf16 one, and the bf16 one is left out)."""
    T = max(EXPERT_TOKENS)
    side = round((T * K * H * 3 * I) ** (1 / 3))
    return max(harness.matmul_rate(m, n, k, "cpu", dtype=dtype, quick=quick)
               for m, n, k in ((T * K, 3 * I, H), (side, side, side)) for dtype in dtypes)


def gemv_rate(quick: bool) -> float:
    """GB/s of bf16 matrix-vector products over 128 MiB weights, enough of them rotated to span
    twice the last-level cache (the way the expert weights are read in the experts cases)."""
    rows, cols = 16384, 4096
    weights = [harness.random_tensor((rows, cols), "cpu") for _ in range(harness.rotation_copies(rows * cols * 2, "cpu"))]
    v = harness.random_tensor((cols,), "cpu")
    stats = harness.measure(harness.cycle([lambda w=w: w @ v for w in weights]), "cpu", quick=quick, memory=False)
    return harness.gbs(rows * cols * 2, stats.median_ms)


def gemm_dtypes() -> tuple:
    """The data types a dense GEMM of bf16 data can run in here, the library's first."""
    # Below AVX-512 the library multiplies bf16 data in fp32 on widened operands (csrc/cpu/gemm.cpp):
    # ATen's bf16 GEMM is emulated there, ~50x slower, and one probe of it takes minutes.
    emulated = torch.ops.finteam.cpu_capability().startswith(("avx2", "baseline"))
    return (torch.float32,) if emulated else (torch.bfloat16, torch.float32)


def ceilings(quick: bool) -> dict:
    """The harness's ceilings, with the weight-streaming and GEMM probes of this benchmark: the
    higher of each pair counts."""
    dtypes = gemm_dtypes()
    rate = harness.ceilings("cpu", quick=quick, dtype=dtypes[0])
    rate["gemv_gbs"] = max(rate["gemv_gbs"], gemv_rate(quick))
    rate["dense_gemm_tflops"] = dense_gemm_rate(quick, dtypes)
    return rate


def expert_rows(quick: bool) -> list[dict]:
    """The experts cases, each with its ceiling timed in the same rounds: a read of its weight
    bytes (T <= 16), a dense GEMM of its FLOPs (T = 2048)."""
    # Sized by the smallest call's reads (T=1: K experts), every provider on its own copies.
    copies, stride = harness.interleaved_copies(K * 3 * I * H * 2, providers=4, device="cpu")
    weights = [(harness.random_tensor((E, 2 * I, H), "cpu", scale=0.02), harness.random_tensor((E, H, I), "cpu", scale=0.02))
               for _ in range(copies)]
    providers = {
        "cpu": [lambda x, ids, w, wgu=wgu, wd=wd: finteam_kernels.moe_experts(x, ids, w, wgu, wd, backend="cpu")
                for wgu, wd in weights],
    }
    for impl in ("eager", "grouped_mm"):
        providers[f"hf-{impl}"] = [_transformers_experts(impl, wgu, wd) for wgu, wd in weights]
    rows = []
    for T in EXPERT_TOKENS:
        x_TH = harness.random_tensor((T, H), "cpu")
        ids_TK, weights_TK = _routing(T, E, seed=T)
        hit_ids = torch.unique(ids_TK).tolist()
        hit = len(hit_ids)
        nbytes, flops = hit * 3 * I * H * 2, 2 * T * K * 3 * I * H
        case = {name: [lambda f=f: f(x_TH, ids_TK, weights_TK) for f in fns] for name, fns in providers.items()}
        if T <= 16:
            # The roof of a decode call, timed in the same rounds (a shared machine's bandwidth
            # drifts by tens of percent within a run): a plain read of the bytes it must read.
            case["read"] = [lambda wgu=wgu, wd=wd: [w[e].view(torch.int16).max() for e in hit_ids for w in (wgu, wd)]
                            for wgu, wd in weights]
            unit, achieved = "GB/s", lambda ms: harness.gbs(nbytes, ms)  # noqa: E731
            roof = "read"
        else:
            # The roof of a prefill call, timed the same way: a dense GEMM of the same FLOPs.
            dtype = gemm_dtypes()[0]
            a_NH = harness.random_tensor((T * K, H), "cpu").to(dtype)
            w_3IH = harness.random_tensor((3 * I, H), "cpu", scale=0.02).to(dtype)
            case["dense gemm"] = [lambda: torch.mm(a_NH, w_3IH.t())]
            unit, achieved = "TFLOP/s", lambda ms: harness.tflops(flops, ms)  # noqa: E731
            roof = "dense gemm"
        with torch.inference_mode():
            times = harness.interleaved({name: harness.cycle(fns, start=p * stride)
                                         for p, (name, fns) in enumerate(case.items())}, quick)
        for name, stats in times.items():
            row = {"section": "experts", "case": f"T={T}", "tokens": T, "provider": name, **stats.to_dict(),
                   "rate": achieved(stats.median_ms), "unit": unit, "experts_hit": hit, "weight_copies": copies}
            row["ceiling"] = achieved(times[roof].median_ms)
            row["fraction_of_ceiling"] = row["rate"] / row["ceiling"]
            rows.append(row)
        best = min(("hf-eager", "hf-grouped_mm"), key=lambda n: times[n].median_ms)
        ratio = times[best].median_ms / times["cpu"].median_ms
        rows.append({"section": "experts", "case": f"T={T}", "provider": "cpu vs best transformers",
                     "best_baseline": best, "speedup": ratio, "target": EXPERT_TARGETS[T],
                     "met": ratio >= EXPERT_TARGETS[T]})
    return rows


# The inference shapes of the kt-kernel comparison: the quick Mixtral and Qwen3 of moe_dispatch.py.
KT_SHAPES = {"mixtral-8x7b": (1024, 3584, 8, 2), "qwen3-30b-a3b": (512, 192, 128, 8)}  # H, I, E, K
KT_TOKENS = (1, 16, 256)
KT_THREADS = (1, 2)
KT_TARGET = 1.5


def kt_rows(quick: bool) -> tuple[list[dict], str | None]:
    """Ours against kt-kernel (kt_peer.py, another process) on the same weights and inputs, kt at
    each thread setting; ours timed before and after kt, the slower of the two medians counts."""
    import kt_peer

    reason = kt_peer.why_unusable()
    if reason is not None:
        return [], reason
    budget_s = 3.0 if quick else 10.0
    rows = []
    for name, (h, i, e, k) in KT_SHAPES.items():
        copies = harness.rotation_copies(k * 3 * i * h * 2, "cpu")  # the experts a T=1 call reads
        weights = [(harness.random_tensor((e, 2 * i, h), "cpu", scale=h ** -0.5),
                    harness.random_tensor((e, h, i), "cpu", scale=i ** -0.5)) for _ in range(copies)]
        cases = []
        for T in KT_TOKENS:
            g = torch.Generator().manual_seed(T)
            ids_TK = torch.rand(T, e, generator=g).argsort(dim=1)[:, :k]
            weights_TK = torch.rand(T, k, generator=g).softmax(dim=1)
            cases.append((T, harness.random_tensor((T, h), "cpu"), ids_TK, weights_TK))

        def ours(T, x_TH, ids_TK, weights_TK, weights=weights):
            fns = [lambda wgu=wgu, wd=wd: finteam_kernels.moe_experts(x_TH, ids_TK, weights_TK, wgu, wd, backend="cpu")
                   for wgu, wd in weights]
            with torch.inference_mode():
                return harness.interleaved({"cpu": harness.cycle(fns)}, quick)["cpu"]

        before = {c[0]: ours(*c) for c in cases}
        kt = {threads: kt_peer.measure(*weights[0], cases, threads, copies, budget_s) for threads in KT_THREADS}
        after = {c[0]: ours(*c) for c in cases}
        for T, x_TH, ids_TK, weights_TK in cases:
            ours_ms = max(before[T].median_ms, after[T].median_ms)
            with torch.inference_mode():
                expected = finteam_kernels.moe_experts(x_TH, ids_TK, weights_TK, *weights[0], backend="cpu").float()
            case = f"{name} T={T}"
            rows.append({"section": "kt-kernel", "case": case, "tokens": T, "provider": "cpu", "median_ms": ours_ms,
                         "p20_ms": min(before[T].p20_ms, after[T].p20_ms), "p80_ms": max(before[T].p80_ms, after[T].p80_ms),
                         "runs_ms": [before[T].median_ms, after[T].median_ms], "weight_copies": copies})
            for threads, result in kt.items():
                r = result[str(T)]
                error = (r["out"].float() - expected).abs().max().item()
                rows.append({"section": "kt-kernel", "case": case, "tokens": T, "provider": f"kt-{threads}t",
                             "median_ms": r["median_ms"], "p20_ms": r["p20_ms"], "p80_ms": r["p80_ms"],
                             "reps": r["reps"], "kt_kernel": f"{result['variant']} {result['kernel']}",
                             "max_abs_diff_vs_ours": error})
            best = min(KT_THREADS, key=lambda t: kt[t][str(T)]["median_ms"])
            ratio = kt[best][str(T)]["median_ms"] / ours_ms
            rows.append({"section": "kt-kernel", "case": case, "provider": "cpu vs kt-kernel",
                         "best_baseline": f"kt-{best}t", "speedup": ratio, "target": KT_TARGET,
                         "met": ratio >= KT_TARGET})
    return rows, None


# The tiny pipeline's training shape: its team of three experts, a batch of 8 x 128 tokens, fp32.
TINY = {"H": 128, "I": 256, "E": 3, "K": 2, "T": 8 * 128}
TINY_TARGET = 1.2
TINY_DECODE_TOKENS = (1, 8)
TINY_DECODE_TARGET = 2.0  # the MoE blocks are half of a tiny decode step: 1.3x the step needs about 2x here


def _tiny_hf_experts(impl: str, w_gate_up: torch.Tensor, w_down: torch.Tensor):
    """transformers' Mixtral experts of the tiny team's shape with experts_implementation `impl`,
    holding copies of the given weights."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    config = MixtralConfig(hidden_size=TINY["H"], intermediate_size=TINY["I"], num_local_experts=TINY["E"],
                           num_experts_per_tok=TINY["K"])
    config._experts_implementation = impl
    module = MixtralExperts(config)
    module.gate_up_proj = torch.nn.Parameter(w_gate_up.detach().clone())
    module.down_proj = torch.nn.Parameter(w_down.detach().clone())
    return module


def _tiny_inputs(T: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    """x_TH, ids_TK, weights_TK, w_gate_up, w_down of the tiny team's shape for T tokens, fp32."""
    h, i, e, k = TINY["H"], TINY["I"], TINY["E"], TINY["K"]
    x_TH = torch.randn(T, h, generator=g)
    ids_TK = torch.rand(T, e, generator=g).argsort(dim=1)[:, :k]
    weights_TK = torch.rand(T, k, generator=g).softmax(dim=1)
    w_gate_up = torch.randn(e, 2 * i, h, generator=g) * h ** -0.5
    w_down = torch.randn(e, h, i, generator=g) * i ** -0.5
    return x_TH, ids_TK, weights_TK, w_gate_up, w_down


def _versus_best_transformers(section: str, case: str, times: dict, target: float) -> dict:
    """The row of ours against the faster of transformers' eager and grouped_mm experts."""
    best = min(("hf-eager", "hf-grouped_mm"), key=lambda n: times[n].median_ms)
    ratio = times[best].median_ms / times["cpu"].median_ms
    return {"section": section, "case": case, "provider": "cpu vs best transformers", "best_baseline": best,
            "speedup": ratio, "target": target, "met": ratio >= target}


def tiny_decode_rows(quick: bool) -> list[dict]:
    """Microseconds per call of the expert computation on the tiny team's shape at decode sizes
    (T = 1, and 8: the pipeline's throughput batch), fp32, forward under no_grad: there a call's
    fixed cost decides. Ours through the public op, against transformers' eager and grouped_mm."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for T in TINY_DECODE_TOKENS:
        x_TH, ids_TK, weights_TK, w_gate_up, w_down = _tiny_inputs(T, g)
        modules = {impl: _tiny_hf_experts(impl, w_gate_up, w_down) for impl in ("eager", "grouped_mm")}
        providers = {"cpu": lambda: finteam_kernels.moe_experts(x_TH, ids_TK, weights_TK, w_gate_up, w_down, backend="cpu")}
        for impl, module in modules.items():
            providers[f"hf-{impl}"] = lambda m=module: m(x_TH, ids_TK, weights_TK)
        with torch.no_grad():
            times = harness.interleaved(providers, quick)
        case = f"tiny decode T={T}"
        rows += [{"section": "tiny decode", "case": case, "provider": name, **stats.to_dict()} for name, stats in times.items()]
        rows.append(_versus_best_transformers("tiny decode", case, times, TINY_DECODE_TARGET))
    return rows


def tiny_training_rows(quick: bool) -> list[dict]:
    """Forward+backward of the expert computation on the tiny team's training shape in fp32,
    ours against transformers' eager and grouped_mm experts, and as a fraction of ATen's fp32
    GEMM rate on a dense GEMM of the same FLOPs (forward 6*N*I*H, backward 12*N*I*H)."""
    h, i, k, T = TINY["H"], TINY["I"], TINY["K"], TINY["T"]
    g = torch.Generator().manual_seed(0)
    x_TH, ids_TK, weights_TK, w_gate_up, w_down = _tiny_inputs(T, g)
    for t in (x_TH, weights_TK, w_gate_up, w_down):
        t.requires_grad_()
    grad_TH = torch.randn(T, h, generator=g)

    def ours():
        finteam_kernels.moe_experts(x_TH, ids_TK, weights_TK, w_gate_up, w_down, backend="cpu").backward(grad_TH)

    providers = {"cpu": ours}
    for impl in ("eager", "grouped_mm"):
        module = _tiny_hf_experts(impl, w_gate_up, w_down)
        providers[f"hf-{impl}"] = lambda m=module: m(x_TH, ids_TK, weights_TK).backward(grad_TH)
    flops = 18 * T * k * i * h
    side = round((flops / 2) ** (1 / 3))
    rate = harness.matmul_rate(side, side, side, "cpu", dtype=torch.float32, quick=quick)
    times = harness.interleaved(providers, quick)
    case = f"tiny train T={T}"
    rows = []
    for name, stats in times.items():
        achieved = harness.tflops(flops, stats.median_ms)
        rows.append({"section": "tiny training", "case": case, "provider": name, **stats.to_dict(), "rate": achieved,
                     "unit": "TFLOP/s", "ceiling": rate, "fraction_of_ceiling": achieved / rate})
    rows.append(_versus_best_transformers("tiny training", case, times, TINY_TARGET))
    return rows


def op_rows(quick: bool) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    logits_TE = torch.randn(OPS_T, OPS_E, generator=g)
    routing = reference.topk_gating(logits_TE, K)
    plan = reference.dispatch(routing.ids_TK, OPS_E)
    x_TH = harness.random_tensor((OPS_T, H), "cpu")
    y_NH = harness.random_tensor((OPS_T * K, H), "cpu")
    cases = {
        "gating": (lambda: reference.topk_gating(logits_TE, K),
                   lambda: finteam_kernels.topk_gating(logits_TE, K, backend="cpu")),
        "dispatch plan": (lambda: reference.dispatch(routing.ids_TK, OPS_E),
                          lambda: finteam_kernels.dispatch(routing.ids_TK, OPS_E, backend="cpu")),
        "permute": (lambda: reference.permute(x_TH, plan),
                    lambda: finteam_kernels.permute(x_TH, plan, backend="cpu")),
        "unpermute": (lambda: reference.unpermute(y_NH, plan, routing.weights_TK),
                      lambda: finteam_kernels.unpermute(y_NH, plan, routing.weights_TK, backend="cpu")),
    }
    rows = []
    with torch.inference_mode():
        for case, (ref_fn, ours_fn) in cases.items():
            stats = harness.interleaved({"reference": ref_fn, "cpu": ours_fn}, quick)
            ref, ours = stats["reference"], stats["cpu"]
            rows.append({"section": "ops", "case": case, "provider": "reference", **ref.to_dict()})
            rows.append({"section": "ops", "case": case, "provider": "cpu", **ours.to_dict()})
            ratio = ref.median_ms / ours.median_ms
            rows.append({"section": "ops", "case": case, "provider": "cpu vs reference", "speedup": ratio,
                         "target": OP_TARGETS[case], "met": ratio >= OP_TARGETS[case]})
    return rows


def table(rows: list[dict]) -> str:
    lines = [f"{'case':16s} {'provider':26s} {'median ms':>10s} {'p20':>9s} {'p80':>9s}  {'rate':>16s}  {'of ceiling':>10s}"]
    for r in rows:
        if "fraction" in r:
            verdict = "met" if r["met"] else "MISSED"
            lines.append(f"{r['case']:16s} {'  of its ceiling':26s} {100 * r['fraction']:9.0f}%  target {100 * r['target']:.0f}%  {verdict}")
            continue
        if "speedup" in r:
            verdict = "met" if r["met"] else "MISSED"
            against = f" (vs {r['best_baseline']})" if "best_baseline" in r else ""
            lines.append(f"{r['case']:16s} {'  speedup' + against:26s} {r['speedup']:9.2f}x  target {r['target']:.1f}x  {verdict}")
            continue
        rate = f"{r['rate']:8.4g} {r['unit']}" if "rate" in r else ""
        frac = f"{100 * r['fraction_of_ceiling']:9.0f}%" if "fraction_of_ceiling" in r else ""
        lines.append(f"{r['case']:16s} {r['provider']:26s} {r['median_ms']:10.3f} {r['p20_ms']:9.3f} {r['p80_ms']:9.3f}  {rate:>16s}  {frac:>10s}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="longer measurements (the quick default takes a few minutes)")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    parser.add_argument("--no-kt", action="store_true", help="leave out the kt-kernel comparison")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results/<cpu>-<date>/)")
    args = parser.parse_args()
    quick = not args.full
    if args.threads:
        torch.set_num_threads(args.threads)
    problem = _ext.load("cpu").problem
    if problem is not None:
        sys.exit(f"the compiled CPU backend is not usable here: {problem}")
    env = harness.environment("cpu", packages=("transformers",))
    before = harness.machine_load()
    first = ceilings(quick)
    # A ceiling is the best rate the machine gives: measured at both ends of the run, the higher
    # one counts (a shared machine can be busy during either).
    rows_experts = expert_rows(quick)
    last = ceilings(quick)
    rate = {key: max(first[key], last[key])
            for key in ("gemv_gbs", "read_gbs", "copy_gbs", "matmul_tflops", "dense_gemm_tflops")}
    for r in rows_experts:
        if r.get("unit") == "TFLOP/s":
            r["fraction_of_probe"] = r["rate"] / rate["dense_gemm_tflops"]
        elif r.get("unit") == "GB/s":
            r["fraction_of_copy"] = r["rate"] / rate["copy_gbs"]
    rows_experts += [{"section": "experts", "case": r["case"], "provider": "cpu of its ceiling",
                      "fraction": r["fraction_of_ceiling"], "target": FRACTION_TARGETS[r["tokens"]],
                      "met": r["fraction_of_ceiling"] >= FRACTION_TARGETS[r["tokens"]]}
                     for r in rows_experts if r.get("provider") == "cpu" and "fraction_of_ceiling" in r]
    rows = rows_experts + op_rows(quick) + tiny_decode_rows(quick) + tiny_training_rows(quick)
    kt, kt_skipped = kt_rows(quick) if not args.no_kt else ([], "--no-kt")
    rows += kt
    after = harness.machine_load()
    payload = {"environment": env, "cpu_capability": torch.ops.finteam.cpu_capability(), "ceilings": rate,
               "ceiling_runs": [first, last], "load": {"before": before, "after": after}, "rows": rows,
               "skipped": {"kt-kernel": kt_skipped} if kt_skipped else {}}
    path = harness.write_results(args.out or harness.default_out_dir("cpu"), "cpu_backend", payload)
    lines = [
        f"{env['cpu']}, {torch.get_num_threads()} threads, kernels at {payload['cpu_capability']}; torch {torch.__version__}",
        (f"machine load before/after: load average {before['load_average']:.2f}/{after['load_average']:.2f}, "
         f"cpu pressure (avg10) {before['cpu_pressure_avg10']}%/{after['cpu_pressure_avg10']}%"),
        (f"ceilings (best of the run's start and end): read {rate['read_gbs']:.1f} GB/s, bf16 gemv "
         f"{rate['gemv_gbs']:.1f} GB/s, copy {rate['copy_gbs']:.1f} GB/s (bytes read + written); dense GEMM on bf16 "
         f"data of the T={max(EXPERT_TOKENS)} FLOPs {rate['dense_gemm_tflops']:.3f} TFLOP/s. Each case is judged "
         "against a roof timed with it: T <= 16 a read of its own weight bytes, T=2048 a dense GEMM of its FLOPs"),
        table(rows),
    ]
    if kt_skipped:
        lines.append(f"kt-kernel skipped: {kt_skipped}")
    report = "\n".join(lines)
    path.with_suffix(".txt").write_text(report + "\n")
    print(report)
    print(f"results: {path}")


if __name__ == "__main__":
    main()
