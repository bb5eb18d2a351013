"""The kernel backends that op tests run on here (each is compared with the reference)."""
import importlib.util

from finteam_kernels import _ext


def kernel_backends() -> list[str]:
    """Backends other than the reference that run on CPU tensors on this machine: Triton in its
    interpreter, and the compiled CPU extension once it is built."""
    names = []
    if importlib.util.find_spec("triton") is not None:
        names.append("triton")
    if _ext.load("cpu").usable:
        names.append("cpu")
    return names
