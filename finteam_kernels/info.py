"""`python -m finteam_kernels.info`: versions, the compiled libraries, and per op which backends
can run here (and, for those that cannot, why).

Asking about CUDA tensors never needs a GPU: it reports what would run if one were used.
"""
import importlib.metadata
import os
import platform

import torch

from . import __version__, _backend, _ext

OPS = ("topk_gating", "router_losses", "dispatch", "permute", "unpermute", "grouped_gemm", "moe_experts")
DEVICES = ("cpu", "cuda")


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def libraries() -> dict:
    """Per library: its file, and None if it loaded, else why it is not usable."""
    return {kind: {"file": _ext.library_path(kind), "problem": _ext.load(kind).problem} for kind in _ext._LIBS}


def usable(device: str) -> dict:
    """{op: {backend: None if usable on `device` tensors, else why not}} plus what auto picks
    (the Triton interpreter is listed for CPU tensors too: a testing tool, never auto's pick)."""
    dev = torch.device(device)
    table = {}
    for op in OPS:
        names = _backend.AUTO_ORDER[device]
        extra = ("triton",) if "triton" not in names else ()
        row = {name: _backend.why_unusable(name, dev, op) for name in (*names, *extra)}
        row["auto"] = next((name for name in names if row[name] is None), "reference")
        table[op] = row
    return table


def report() -> str:
    lines = [
        f"finteam_kernels {__version__}   torch {torch.__version__}   triton {_version('triton')}   "
        f"transformers {_version('transformers')}   python {platform.python_version()}",
        f"CPU: {_cpu_name()}, {torch.get_num_threads()} threads; torch CUDA build: {torch.version.cuda or 'no'}",
    ]
    libs = libraries()
    if libs["cpu"]["problem"] is None:
        lines.append(f"CPU kernels run at ISA level: {torch.ops.finteam.cpu_capability()}")
    built = _ext.build_notes()
    if built:
        lines.append(f"built against torch {built.get('torch', '?')}")
    lines.append("")
    lines.append("compiled libraries:")
    for kind, lib in libs.items():
        state = "loaded" if lib["problem"] is None else f"not usable: {lib['problem']}"
        where = os.path.relpath(lib["file"], os.path.dirname(os.path.dirname(_ext.__file__))) if lib["file"] else "-"
        lines.append(f"  {kind:5s} {where}  {state}")
    reasons: list[str] = []
    for device in DEVICES:
        lines.append("")
        lines.append(f"{device.upper()} tensors (auto order: {', '.join(_backend.AUTO_ORDER[device])}):")
        for op, row in usable(device).items():
            cells = []
            for name, why in row.items():
                if name == "auto":
                    continue
                if why is None:
                    cells.append(f"{name} yes")
                else:
                    if why not in reasons:
                        reasons.append(why)
                    cells.append(f"{name} no[{reasons.index(why) + 1}]")
            lines.append(f"  {op:14s} auto -> {row['auto']:10s} " + "  ".join(cells))
    if reasons:
        lines.append("")
        lines.append("why not:")
        lines.extend(f"  [{i}] {why}" for i, why in enumerate(reasons, 1))
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
