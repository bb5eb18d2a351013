"""The benchmark's tables as text: one block per (op, mode), and the providers skipped."""
from __future__ import annotations


def fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def table(rows: list[dict], roof: dict) -> str:
    lines = [
        f"ceilings measured in this run: memory {roof['mem_gbs']:.1f} GB/s (copy {roof['copy_gbs']:.1f}, "
        f"gemv {roof['gemv_gbs']:.1f}, read {roof['read_gbs']:.1f}), matmul {roof['matmul_tflops']:.2f} TFLOP/s"
    ]
    head = (f"{'shape':18s} {'routing':7s} {'T':>6s} {'provider':16s} {'median ms':>10s} {'p20-p80 ms':>19s} "
            f"{'GB/s':>7s} {'TFLOP/s':>7s} {'roof':>8s} {'x ref':>6s} {'x peer':>6s} {'peak MB':>8s}")
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["op"], r["mode"]), []).append(r)
    for (op, mode), group in groups.items():
        lines += ["", f"== {op} / {mode} ==", head]
        for r in group:
            roof_cell = f"{100 * r['roof_fraction']:.0f}% {'mma' if r['bound'] == 'compute' else 'mem'}"
            peak = None if r["peak_bytes"] is None else r["peak_bytes"] / 2**20
            lines.append(
                f"{r['shape']:18s} {r['routing']:7s} {r['tokens']:6d} {r['provider']:16s} {r['median_ms']:10.4g} "
                f"{r['p20_ms']:9.4g}-{r['p80_ms']:<9.4g} {r['gbs']:7.1f} {r['tflops']:7.3f} {roof_cell:>8s} "
                f"{fmt(r['vs_reference'], '6.2f'):>6s} {fmt(r['vs_best_peer'], '6.2f'):>6s} {fmt(peak, '8.1f'):>8s}"
            )
    return "\n".join(lines)


def skipped_text(skipped: list[dict]) -> str:
    by_provider: dict[tuple[str, str], list[str]] = {}
    for s in skipped:
        by_provider.setdefault((s["provider"], s["reason"]), []).append(s["op"])
    lines = ["", "== skipped =="]
    lines += [f"{p:16s} {', '.join(sorted(set(ops)))}: {reason}" for (p, reason), ops in sorted(by_provider.items())]
    return "\n".join(lines)
