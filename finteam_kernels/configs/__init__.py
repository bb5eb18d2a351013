"""Tuned launch configs of the grouped GEMM kernels, kept as data: one JSON table per GPU model.

    finteam_kernels/configs/NVIDIA_H200.json     (the name torch.cuda.get_device_name gives)
    {"device": "NVIDIA H200", "triton": "3.6.0", "torch": "2.11.0+cu130", "date": "2026-12-03",
     "gemm":  {"<problem>": {"<rows bucket>": [BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages], ...}},
     "wgrad": {"<problem>": {"<rows bucket>": [BLOCK_O, BLOCK_D, BLOCK_K, num_warps, num_stages], ...}}}

A problem (`problem_key`) names everything but the row count that can change the best config:
the config family (dtype and dot precision), E, the GEMM's widths, the operand layout and the
fused gather and epilogue. Rows are bucketed to powers of two, and a lookup takes the nearest
tuned bucket of the same problem (vLLM's tables do the same with token counts). A shape with
no entry gets the kernel module's heuristic, or is tuned at run time where that is allowed
(see `grouped_gemm_kernels.launch_config`). `python -m finteam_kernels.configs.tune` writes a
table on a GPU. Tables in the folder named by FINTEAM_CONFIG_DIR are read before the shipped
ones, so a freshly tuned table can be tried before it is committed.
"""
import functools
import json
import os
import re

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def problem_key(**parts) -> str:
    """'name=value,...' in the order given: the table's key of one problem."""
    return ",".join(f"{name}={int(value) if isinstance(value, bool) else value}" for name, value in parts.items())


def file_name(device_name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", device_name).strip("_") + ".json"


@functools.lru_cache(maxsize=None)
def device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


@functools.lru_cache(maxsize=None)
def table(name: str) -> dict:
    """The table of the GPU called `name` ({} if none is shipped): FINTEAM_CONFIG_DIR's first."""
    for folder in (os.environ.get("FINTEAM_CONFIG_DIR"), HERE):
        path = os.path.join(folder, file_name(name)) if folder else None
        if path and os.path.exists(path):
            with open(path) as f:
                return json.load(f)
    return {}


def lookup(kind: str, device: torch.device, key: str, rows: int) -> tuple | None:
    """The tuned config of problem `key` of kernel `kind` ("gemm" or "wgrad") on `device` for
    the tuned row bucket nearest to `rows` (in powers of two), or None."""
    if device.type != "cuda":
        return None
    entries = table(device_name(device.index if device.index is not None else torch.cuda.current_device()))
    buckets = entries.get(kind, {}).get(key)
    if not buckets:
        return None
    want = max(rows, 1).bit_length()
    nearest = min(buckets, key=lambda b: (abs(int(b).bit_length() - want), int(b)))
    return tuple(buckets[nearest])
