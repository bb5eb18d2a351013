"""Loading the compiled extension (csrc/): found next to this file, loaded on first use.

A missing or broken extension is not an error: the Triton and reference backends still work. It
gives one warning naming the cause, and `python -m finteam_kernels.info` shows it.
"""
import functools
import glob
import os
import warnings

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
_LIBS = {"cpu": "_C_cpu", "cuda": "_C_cuda"}


@functools.cache
def load(kind: str) -> str | None:
    """Load the `kind` ("cpu" or "cuda") library; None on success, else why it is not usable."""
    files = glob.glob(os.path.join(_HERE, _LIBS[kind] + "*.so")) + glob.glob(os.path.join(_HERE, _LIBS[kind] + "*.pyd"))
    if not files:
        return f"the {kind} extension was not built (reinstall with `pip install --no-build-isolation .`)"
    try:
        torch.ops.load_library(files[0])
    except (OSError, RuntimeError) as err:
        reason = f"the {kind} extension failed to load: {err}"
        warnings.warn(f"finteam_kernels: {reason}; using the Triton/reference backends", RuntimeWarning, stacklevel=3)
        return reason
    return None


def why_missing(kind: str, op: str) -> str | None:
    reason = load(kind)
    if reason is not None:
        return reason
    if not hasattr(torch.ops.finteam, op + "_fwd") and not hasattr(torch.ops.finteam, op):
        return f"the {kind} extension has no implementation of {op}"
    return None


def op(name: str):
    return getattr(torch.ops.finteam, name)
