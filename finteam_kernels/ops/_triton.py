"""What the Triton launchers share: interpreter handling, block sizes, autotune switch."""
import contextlib
import os

import torch

from .._backend import triton_interpreting


def interpreting() -> bool:
    return triton_interpreting()


def autotune_enabled() -> bool:
    """FINTEAM_AUTOTUNE=0 runs every kernel with its default config (no tuning runs)."""
    return os.environ.get("FINTEAM_AUTOTUNE", "1") != "0" and not interpreting()


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def row_block(width: int, cap: int = 1024) -> int:
    """A power-of-two block covering `width` elements of a row, at most `cap` (then the kernel loops)."""
    return min(cap, next_pow2(max(width, 1)))


def device_guard(t: torch.Tensor):
    """Launch on t's GPU (Triton launches on the current device)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
