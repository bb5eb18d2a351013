"""Benchmark the MoE ops and the FinTeamMoE layer against the reference and the peers, on the
roofline measured in the same run.

    python benchmarks/moe_dispatch.py                      # quick shapes on a CPU, full on a GPU
    python benchmarks/moe_dispatch.py --full --ops moe_experts --shapes mixtral-8x7b-tp2
    python benchmarks/moe_dispatch.py --providers reference,cpu,hf-eager --modes forward --tokens 1,16

Shape legend: T tokens, H hidden, I expert intermediate, E experts, K top-k, N = T*K routed rows.

Ops: gating (topk_gating), dispatch (the plan), permute, unpermute, grouped_gemm (the gate/up
GEMM: D=H, O=2I), moe_experts (the whole expert computation) and layer (FinTeamMoE, router
included). Modes: forward (under no_grad: inference), backward (the backward of one retained
forward), forward+backward. Each row gives the median time with p20-p80, the achieved GB/s
and TFLOP/s from the byte and FLOP counts below, the fraction of the roof (the larger of
bytes / measured bandwidth and FLOPs / measured matmul rate, over the time), the speed-up over
the reference and over the fastest peer in the same cell, and the peak memory of one call.
Inputs rotate through enough copies to span twice the last-level cache (within a memory
budget); a roof fraction above 100% says the data stayed in cache all the same. On a CPU the
providers of a cell are timed in alternating rounds, each from its own copy (runner.py
run_cell_interleaved): a CPU's bandwidth drifts within seconds. On a GPU each is timed alone.
In the training modes of moe_experts a yardstick runs too, aten-gemms: the expert
computation's six GEMMs per expert alone, through ATen (providers.py); the targets give our
time and the best peer's over it, which says how much of a cell is left above its GEMMs.
Writes <out>/moe_dispatch.json (environment, ceilings, rows, skipped providers, targets),
moe_dispatch.txt (the table) and moe_dispatch.png (time against tokens).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import torch

import harness
import shapes as shape_table
from runner import OPS, Plan, run
from tables import skipped_text, table
from targets import judge_targets, targets_text

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _csv(text: str | None, allowed=None, convert=str):
    if text is None:
        return None
    items = tuple(convert(x.strip()) for x in text.split(",") if x.strip())
    if allowed is not None:
        bad = [x for x in items if x not in allowed]
        if bad:
            raise SystemExit(f"unknown {', '.join(map(str, bad))}; choose from {', '.join(allowed)}")
    return items


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="scaled-down shapes (the default on a CPU)")
    size.add_argument("--full", action="store_true", help="the models' own shapes (the default on a GPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--ops", help=f"comma list of {', '.join(OPS)}")
    parser.add_argument("--modes", help=f"comma list of {', '.join(shape_table.MODES)}")
    parser.add_argument("--shapes", help=f"comma list of {', '.join(shape_table.SHAPES)}")
    parser.add_argument("--providers", help="comma list of provider names (default: every one usable here)")
    parser.add_argument("--tokens", help="comma list of token counts (default: per mode, see shapes.py)")
    parser.add_argument("--routings", help=f"comma list of {', '.join(shape_table.ROUTINGS)}")
    parser.add_argument("--out", type=Path, help="results folder (default: benchmarks/results/<device>-<date>/)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory call")
    parser.add_argument("--ceiling-mib", type=int, help="bytes the bandwidth ceilings stream (default: 4x the cache)")
    parser.add_argument("--no-plot", action="store_true")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    start = time.perf_counter()
    args = parse_args(argv)
    device = torch.device(args.device)
    quick = args.quick or (device.type != "cuda" and not args.full)
    names = _csv(args.shapes, tuple(shape_table.SHAPES))
    table_of_shapes = shape_table.shapes(quick)
    plan = Plan(
        device=device,
        dtype=DTYPES[args.dtype],
        quick=quick,
        ops=_csv(args.ops, OPS) or OPS,
        modes=_csv(args.modes, shape_table.MODES) or shape_table.MODES,
        shapes={n: table_of_shapes[n] for n in (names or table_of_shapes)},
        providers=set(_csv(args.providers)) if args.providers else None,
        tokens=_csv(args.tokens, convert=int),
        routings=_csv(args.routings, shape_table.ROUTINGS) or shape_table.ROUTINGS,
        memory=not args.no_memory,
    )
    env = harness.environment(device, packages=("megablocks", "grouped_gemm", "scattermoe", "vllm", "liger_kernel"))
    header = (
        f"{env['device_name']} ({device.type}, {env['cpu_threads']} threads), torch {torch.__version__}, "
        f"commit {env['git_commit']}, {env['date']}, {'quick' if quick else 'full'} shapes, {args.dtype}"
    )
    load, cores = env["load_average"], os.cpu_count() or 1
    if load is not None and load > cores:
        header += f"\nwarning: load average {load:.1f} on {cores} cores: other work shares this machine, timings are unreliable"
    print(header, flush=True)
    roof = harness.ceilings(device, quick=quick, stream_bytes=args.ceiling_mib and args.ceiling_mib << 20,
                            dtype=plan.dtype)
    rows, skipped = run(plan, roof, log=lambda line: print(line, file=sys.stderr, flush=True))
    on_gpu = device.type == "cuda"
    targets = judge_targets(rows, on_gpu)
    report = table(rows, roof) + "\n" + targets_text(targets, on_gpu) + "\n" + skipped_text(skipped)
    wall_s = time.perf_counter() - start
    report += f"\n\nwall time {wall_s:.0f} s"
    print(report)
    report = header + "\n" + report

    out = args.out or harness.default_out_dir(device)
    settings = {k: (sorted(v) if isinstance(v, set) else v) for k, v in dataclasses.asdict(plan).items() if k != "shapes"}
    settings |= {"device": str(device), "dtype": args.dtype, "argv": sys.argv[1:] if argv is None else list(argv)}
    payload = {
        "environment": env, "settings": settings, "shapes": {n: dataclasses.asdict(s) for n, s in plan.shapes.items()},
        "ceilings": roof, "rows": rows, "skipped": skipped, "targets": targets, "wall_s": wall_s,
    }
    written = [harness.write_results(out, "moe_dispatch", payload)]
    (out / "moe_dispatch.txt").write_text(report + "\n")
    written.append(out / "moe_dispatch.txt")
    if not args.no_plot:
        title = f"{env['device_name']}, {'quick' if quick else 'full'} shapes, {args.dtype}"
        uniform = [r for r in rows if r["routing"] == "uniform"]  # one line per provider: same routing throughout
        png = harness.plot_time_vs_tokens(uniform, out / "moe_dispatch.png", title)
        if png is not None:
            written.append(png)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
