"""Tune the grouped GEMM's launch configs on this GPU and write them as its table.

    python -m finteam_kernels.configs.tune [--models mixtral-8x7b qwen3-30b-a3b] [--tokens 256 4096]
                                           [--dtype bf16] [--out DIR]

For each model shape and token count, builds the six GEMM launches of one `moe_experts` forward
and backward (gate/up with the gather and SwiGLU epilogue, down, and in the backward the
gathered dx of the down projection, both weight gradients and the dx of gate/up) on random
routing, times every config of each launch's family (`triton.testing.do_bench`, median), and
keeps the fastest under the launch's problem key and row bucket. The result is merged into
`DIR/<GPU name>.json` (default: this package's folder), so tables grow over several runs.
Prints one line per launch: the problem, the chosen config and its time against the heuristic's.
"""
import argparse
import datetime
import json
import os
import sys

import torch

from . import HERE, device_name, file_name

# Named shapes: (hidden H, expert intermediate I, experts E, top-k K).
MODELS = {
    "mixtral-8x7b": (4096, 14336, 8, 2),
    "qwen3-30b-a3b": (2048, 768, 128, 8),
    "olmoe": (2048, 1024, 64, 8),
    "deepseek-v3": (7168, 2048, 256, 8),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def moe_launches(T: int, H: int, I: int, E: int, K: int, dtype: torch.dtype) -> list:
    """The grouped GEMM launches of one moe_experts forward and backward, as (name, call)."""
    from ..ops.dispatch import dispatch_fwd
    from ..ops.grouped_gemm import gemm, wgrad

    device = torch.device("cuda")
    x = torch.randn(T, H, device=device, dtype=dtype)
    grad = torch.randn(T, H, device=device, dtype=dtype)
    w_gu = torch.randn(E, 2 * I, H, device=device, dtype=dtype) / H**0.5
    w_down = torch.randn(E, H, I, device=device, dtype=dtype) / I**0.5
    ids = torch.rand(T, E, device=device).argsort(dim=1)[:, :K].to(torch.int32)
    offsets, _, row_to_slot, _ = dispatch_fwd(ids, E)
    a, h = gemm(x, w_gu, offsets, index_N=row_to_slot, index_div=K, activation="silu", keep_h=True)
    dw_down = torch.empty_like(w_down)
    return [
        ("gate_up", lambda: gemm(x, w_gu, offsets, index_N=row_to_slot, index_div=K, activation="silu",
                                 keep_h=True)),
        ("down", lambda: gemm(a, w_down, offsets)),
        ("down dx", lambda: gemm(grad, w_down.transpose(1, 2), offsets, index_N=row_to_slot, index_div=K)),
        ("down dw", lambda: wgrad(a, grad, offsets, index_N=row_to_slot, index_div=K,
                                  out_EOD=dw_down.transpose(1, 2))),
        ("gate_up dx", lambda: gemm(h, w_gu.transpose(1, 2), offsets)),
        ("gate_up dw", lambda: wgrad(h, x, offsets, index_N=row_to_slot, index_div=K)),
    ]


class _Choice:
    """Stands in for `launch_config` while tuning: records the launch's problem, and returns
    the config being timed (or the heuristic's, when none is forced)."""

    def __init__(self, kernels):
        self.kernels, self.original = kernels, kernels.launch_config
        self.forced, self.seen = None, None

    def __call__(self, kind, family, problem, rows, experts, device):
        self.seen = (kind, family, problem, rows, experts)
        if self.forced is not None:
            return self.forced
        return (self.kernels.default_gemm_config if kind == "gemm" else self.kernels.default_wgrad_config)(
            family, rows, experts)


def tune(models: list[str], tokens: list[int], dtype: torch.dtype, warmup_ms: int, rep_ms: int, done=None) -> dict:
    """{kind: {problem: {rows bucket: config}}} for every launch of every shape; `done(tuned)`,
    if given, after each shape (so a run stopped midway keeps what it tuned)."""
    import triton.testing

    from ..ops import grouped_gemm_kernels as kernels

    choice = _Choice(kernels)
    tuned = {"gemm": {}, "wgrad": {}}
    kernels.launch_config = choice
    try:
        for model in models:
            H, I, E, K = MODELS[model]
            for T in tokens:
                for name, call in moe_launches(T, H, I, E, K, dtype):
                    choice.forced = None
                    call()
                    kind, family, problem, rows, experts = choice.seen
                    meta = kernels.gemm_meta if kind == "gemm" else kernels.wgrad_meta
                    table = kernels.GEMM_CONFIGS if kind == "gemm" else kernels.WGRAD_CONFIGS
                    heuristic = choice(kind, family, problem, rows, experts, None)
                    times = {}
                    for config in table[family]:
                        choice.forced = meta(config)
                        times[config] = triton.testing.do_bench(call, warmup=warmup_ms, rep=rep_ms,
                                                                return_mode="median")
                    best = min(times, key=times.get)
                    base = next(t for c, t in times.items() if meta(c) == heuristic)
                    bucket = str(1 << max(0, (rows - 1).bit_length()))
                    tuned[kind].setdefault(problem, {})[bucket] = list(best)
                    print(f"{model:14} T={T:<6} {name:10} {kind:5} rows={rows:<7} best {best} {times[best]*1e3:8.1f} us"
                          f"  heuristic {base*1e3:8.1f} us  ({problem})", flush=True)
                if done is not None:
                    done(tuned)
    finally:
        kernels.launch_config = choice.original
    return tuned


def merge(path: str, tuned: dict, device: str) -> dict:
    import triton

    data = {}
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    data.update({"device": device, "triton": triton.__version__, "torch": torch.__version__,
                 "date": datetime.date.today().isoformat()})
    for kind, problems in tuned.items():
        for problem, buckets in problems.items():
            data.setdefault(kind, {}).setdefault(problem, {}).update(buckets)
    return data


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mixtral-8x7b", "qwen3-30b-a3b"], choices=sorted(MODELS))
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 4096, 16384])
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--out", default=HERE, help="folder of the table (default: the package's)")
    parser.add_argument("--warmup-ms", type=int, default=5)
    parser.add_argument("--rep-ms", type=int, default=25)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("tuning needs a CUDA GPU", file=sys.stderr)
        return 2
    device = device_name(torch.cuda.current_device())
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, file_name(device))

    def write(tuned):
        data = merge(path, tuned, device)
        with open(path, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        print(f"wrote {path}", flush=True)

    tune(args.models, args.tokens, DTYPES[args.dtype], args.warmup_ms, args.rep_ms, done=write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
