"""What the Triton launchers share: interpreter handling, block sizes, autotune switch."""
import contextlib
import os
from typing import NamedTuple

import torch

from .._backend import triton_interpreting


def interpreting() -> bool:
    return triton_interpreting()


def autotune_enabled() -> bool:
    """Whether a launch without a tuned table entry may tune at run time. FINTEAM_AUTOTUNE=0:
    never (tables, else heuristics); never under the interpreter either."""
    return os.environ.get("FINTEAM_AUTOTUNE", "1") != "0" and not interpreting()


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def device_guard(t: torch.Tensor):
    """Launch on t's GPU (Triton launches on the current device)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class AotSpec(NamedTuple):
    """One kernel and config to compile ahead of time for real GPUs (see `ops/_aot.py`).

    Every `*_kernels.py` module lists its kernels in `aot_specs()`: each kernel with each config
    it can be launched with (every autotune config, and each constexpr variant that changes the
    code, e.g. HAS_WEIGHTS on and off), with the dtypes it is used with.
    """

    name: str  # readable id, e.g. "combine_rows[bf16,HAS_WEIGHTS=1]"
    fn: object  # the @triton.jit function (for an autotuned kernel, its `.fn`)
    signature: dict  # argument -> "*bf16", "*fp32", "*i32", "i32", "i64", "fp32" or "constexpr"
    constexprs: dict  # constexpr argument -> value
    num_warps: int = 4
    num_stages: int = 3
    hot: bool = True  # on the hot path: must compile without register spills
    # arguments a real launch sees as multiples of 16 (pointers 16-byte aligned, sizes and strides
    # multiples of 16): Triton specializes on that (and on unit strides, which a spec gives as
    # constexpr 1), and vectorized, pipelined loads depend on it
    aligned: tuple = ()
    # its tl.dot operands are 16-bit or TF32: the dots must use tensor cores (wgmma on sm_90)
    tensor_core: bool = False
    # its results must round like PyTorch's (e.g. gating's selection): no approximate exp or division
    exact: bool = False
