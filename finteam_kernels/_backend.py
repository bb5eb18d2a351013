"""Which implementation runs an op.

Backends:
  reference  plain PyTorch (`finteam_kernels.reference`): the spec, runs anywhere, autograd backward
  triton     Triton kernels: CUDA tensors (or CPU tensors under TRITON_INTERPRET=1, for testing)
  cuda       the compiled CUDA extension (csrc/cuda), CUDA tensors
  cpu        the compiled CPU extension (csrc/cpu), CPU tensors

`backend=` on each op, else the FINTEAM_BACKEND environment variable, else "auto". "auto" takes
the first usable backend in a fixed order per device:
  CUDA tensor: triton, cuda, reference
  CPU tensor:  cpu, reference          (never the Triton interpreter: it is a testing tool)
An explicit backend that cannot run here is an error, never a silent fallback.
"""
import importlib.util
import os

import torch

from . import _ext

BACKENDS = ("auto", "triton", "cuda", "cpu", "reference")
AUTO_ORDER = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "reference")}


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    """Kernels run in Triton's interpreter: the variable must be set before they are first used."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@torch.compiler.assume_constant_result  # what is installed does not change: torch.compile reads it once
def why_unusable(backend: str, device: torch.device, op: str) -> str | None:
    """None when `backend` can run `op` on tensors of `device`, else the reason it cannot."""
    if backend == "reference":
        return None
    if backend == "triton":
        if not triton_installed():
            return "triton is not installed"
        if device.type == "cuda" or (device.type == "cpu" and triton_interpreting()):
            return None
        return f"Triton kernels need a CUDA tensor (or TRITON_INTERPRET=1 for testing); got a {device.type} tensor"
    if backend in ("cpu", "cuda"):
        if device.type != backend:
            return f"backend {backend!r} runs on {backend} tensors; got a {device.type} tensor"
        return _ext.why_missing(backend, op)
    return f"unknown backend {backend!r}"


def pick_backend(backend: str | None, device: torch.device, op: str) -> str:
    """Resolve `backend` (None: $FINTEAM_BACKEND, default "auto") to the backend that runs `op`."""
    name = backend if backend is not None else os.environ.get("FINTEAM_BACKEND", "auto")
    source = "backend" if backend is not None else "FINTEAM_BACKEND"
    if name not in BACKENDS:
        raise ValueError(f"{op}: {source} must be one of {', '.join(map(repr, BACKENDS))}; got {name!r}")
    if name == "auto":
        for candidate in AUTO_ORDER.get(device.type, ("reference",)):
            if why_unusable(candidate, device, op) is None:
                return candidate
        return "reference"
    reason = why_unusable(name, device, op)
    if reason is not None:
        raise RuntimeError(f"{op}: {source}={name!r} cannot run here: {reason}")
    return name


def kernel(name: str, backend: str, triton_fn):
    """The function that runs `name` (e.g. "permute_fwd") on a kernel backend: the Triton launcher,
    or the compiled op of the same name and signature."""
    if backend == "triton":
        return triton_fn
    return _ext.op(name)


def direct_call(*tensors: torch.Tensor | None) -> bool:
    """True when a public op may run its kernel directly instead of through its torch.library
    custom op: no input needs a gradient and torch.compile is not tracing. The custom op's Python
    dispatch costs about 20 us a call, as much as a whole kernel on decode-sized inputs, and what
    it buys (autograd wiring, a traceable fake implementation) is not needed by such a call."""
    if torch.compiler.is_compiling():
        return False
    return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))
