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
from torch._functorch.utils import unwrap_dead_wrappers
from torch.autograd.function import once_differentiable

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


def traced(*tensors: torch.Tensor | None) -> bool:
    """True when torch.compile, AOTAutograd, a torch.func transform, a dispatch mode (fake
    tensors, for one) or a torch function mode sees this call, or an input is a tensor subclass:
    an op then goes through its torch.library custom op, which all of those understand.
    Elsewhere an op that needs autograd wires it itself (`eager_function`). A function mode
    counts even where it only watches (`with torch.device(...)` is one): it then sees the op as
    one call of the custom op, not the kernels inside it, at the cost of the custom op's dispatch."""
    return (torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()
            or torch._C._len_torch_dispatch_stack() > 0 or torch._C._len_torch_function_stack() > 0
            or any(t is not None and type(t) not in _PLAIN_TENSORS for t in tensors))


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def eager_function(impl, setup_context, backward):
    """The autograd of a custom op without the custom op: a torch.autograd.Function that runs the
    op's own implementation `impl`, `setup_context` and `backward`, so the bits are the same. The
    custom op's Python dispatch and generated autograd cost about 200 us per forward+backward of
    moe_experts on a 2-core AMD EPYC (Zen 4), 40% on top of the call at 8 tokens; an untraced
    call (see `traced`) does not need what they buy."""

    def forward(*args):
        return impl(*args)

    @once_differentiable  # as the custom ops: their backward ops have no autograd
    def run_backward(ctx, *grads):
        return backward(ctx, *grads)

    # named after the op, so that a graph reads e.g. grad_fn=<moe_expertsBackward>
    name = impl.__name__.strip("_").removesuffix("_impl")
    op = type(name, (torch.autograd.Function,), {"forward": staticmethod(forward),
                                                 "setup_context": staticmethod(setup_context),
                                                 "backward": staticmethod(run_backward)})
    # Function.apply binds the arguments to forward's signature (inspect.signature, about 8 us a
    # call on a 2-core AMD EPYC, Zen 5: a sixth of topk_gating's whole forward+backward at 256
    # tokens) to fill in defaults, which `forward(*args)` has none of, and sends functorch
    # transforms elsewhere, which never reach here (`traced`). The autograd engine's own apply
    # is the rest of it.
    engine_apply = super(torch.autograd.Function, op).apply

    def apply(*args):
        return engine_apply(*unwrap_dead_wrappers(args))

    return apply


def direct_call(*tensors: torch.Tensor | None) -> bool:
    """True when a public op may run its kernel directly instead of through its torch.library
    custom op: no input needs a gradient and torch.compile is not tracing. The custom op's Python
    dispatch costs about 20 us a call, as much as a whole kernel on decode-sized inputs, and what
    it buys (autograd wiring, a traceable fake implementation) is not needed by such a call."""
    if torch.compiler.is_compiling():
        return False
    return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))
