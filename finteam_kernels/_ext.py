"""Loading the compiled extension (csrc/): found next to this file, loaded on first use.

Two libraries, loaded with `torch.ops.load_library` (they register ops, they are not modules):
  _C_cpu*.so   every schema of the `finteam` namespace (csrc/ops.cpp) and the CPU kernels
  _C_cuda*.so  the CUDA kernels; it registers implementations of the schemas above, so loading
               it loads the CPU library first

A missing or broken extension is not an error: the Triton and reference backends still work. A
library that should be here and is not gives one warning naming the cause (the build records
why it skipped or failed in `_build_info.json`); `python -m finteam_kernels.info` shows it. A
CUDA library that was never meant to be built (a CPU build of torch) is reported but not warned
about.
"""
import functools
import glob
import json
import os
import warnings
from typing import NamedTuple

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
_LIBS = {"cpu": "_C_cpu", "cuda": "_C_cuda"}
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}
BUILD_INFO = os.path.join(_HERE, "_build_info.json")


def library_path(kind: str) -> str | None:
    files = sorted(glob.glob(os.path.join(_HERE, _LIBS[kind] + "*.so")) + glob.glob(os.path.join(_HERE, _LIBS[kind] + "*.pyd")))
    return files[0] if files else None


def build_notes() -> dict:
    """What the build recorded: {"torch": version built against, "not_built": {kind: reason}}."""
    try:
        with open(BUILD_INFO) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _expected(kind: str) -> bool:
    """Whether this installation should have the `kind` library: the CPU one always; the CUDA
    one where torch is a CUDA build (or the build tried it)."""
    if kind == "cpu":
        return True
    return torch.version.cuda is not None and "skipped" not in build_notes().get("not_built", {}).get(kind, "")


def _not_built_reason(kind: str) -> str:
    recorded = build_notes().get("not_built", {}).get(kind)
    if recorded:
        return recorded
    return (f"the {kind} extension was not built (no finteam_kernels/{_LIBS[kind]}*.so; install torch and a C++ "
            f"compiler, then `pip install --no-build-isolation .`)")


class Library(NamedTuple):
    """What `load` found: the library's file (None when there is none) and, when it cannot be
    used, why (None when it is loaded and usable)."""
    path: str | None
    problem: str | None

    @property
    def usable(self) -> bool:
        return self.problem is None


@functools.cache
def load(kind: str) -> Library:
    """Load the `kind` ("cpu" or "cuda") library once; say whether it is usable, and if not, why."""
    path = library_path(kind)
    if kind == "cuda" and not (cpu := load("cpu")).usable:
        return Library(path, f"the CUDA extension needs the op schemas of the CPU extension, which is unusable: "
                             f"{cpu.problem}")
    if path is None:
        problem = _not_built_reason(kind)
    else:
        try:
            torch.ops.load_library(path)
            return Library(path, None)
        except (OSError, RuntimeError) as err:
            problem = f"the {kind} extension failed to load ({os.path.basename(path)}): {err}"
    if _expected(kind):
        warnings.warn(f"finteam_kernels: {problem}; {kind} tensors run on the other backends "
                      "(see `python -m finteam_kernels.info`)", RuntimeWarning, stacklevel=3)
    return Library(path, problem)


def has_kernel(kind: str, name: str) -> bool:
    """Whether `finteam::<name>` has a `kind` implementation registered (after `load(kind)`)."""
    qualified = f"finteam::{name}"
    return (torch._C._dispatch_has_kernel(qualified)
            and torch._C._dispatch_has_kernel_for_dispatch_key(qualified, _DISPATCH_KEYS[kind]))


@functools.cache
def why_missing(kind: str, op: str) -> str | None:
    """None when the `kind` library implements `op` (its `<op>_fwd` launcher, or `op` itself),
    else the reason it cannot run it. Asked on every op call, so cached: after `load(kind)` the
    answer cannot change."""
    library = load(kind)
    if not library.usable:
        return library.problem
    if not any(has_kernel(kind, name) for name in (op + "_fwd", op)):
        return f"the {kind} extension has no implementation of {op}"
    return None


def op(name: str):
    return getattr(torch.ops.finteam, name)
