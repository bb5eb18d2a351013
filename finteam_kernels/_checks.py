"""Argument checks shared by the ops: every error names the op, the argument, what was expected
and what came.

Value checks (ids and plan indices in range) read the data. On a CPU tensor that is cheap; on a
GPU they are queued as a device-side assertion, so they never synchronise with the host. While
torch.compile traces there is no data to read: the check goes into the graph as an asynchronous
assertion (which is what stops the reference backend's indexing), and the public op tells its
custom op that the values are unchecked, so that the custom op checks them before its kernel
runs (the graph may order the two either way). A plan made by `dispatch` is not checked at all
(`_types.is_issued`). Whatever gets through, the kernels still never read or
write out of bounds: they mask indices outside their range (and the compiled CPU library
refuses them).
"""
import math
from collections.abc import Iterable

import torch

from ._types import is_issued

ID_DTYPES = (torch.int32, torch.int64)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _describe(t: torch.Tensor) -> str:
    return f"a {t.dim()}-D {str(t.dtype).removeprefix('torch.')} tensor of shape {tuple(t.shape)} on {t.device}"


def check_tensor(op: str, name: str, t, dims: str, *, dtypes: Iterable[torch.dtype] | None = None) -> None:
    """`t` is a tensor with one dimension per letter group of `dims` ("T, E") and, if given, one
    of `dtypes`."""
    names = [d.strip() for d in dims.split(",")] if dims else []
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a tensor [{dims}]; got {type(t).__name__}")
    if t.dim() != len(names):
        raise ValueError(f"{op}: {name} must be a {len(names)}-D tensor [{dims}]; got {_describe(t)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            allowed = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
            raise TypeError(f"{op}: {name} must be {allowed}; got {_describe(t)}")


def check_dim(op: str, name: str, t: torch.Tensor, dim: int, expected: int, what: str) -> None:
    """`t.shape[dim] == expected`, where `what` says where `expected` came from."""
    if t.shape[dim] != expected:
        raise ValueError(
            f"{op}: {name} must have size {expected} in dimension {dim} ({what}); got shape {tuple(t.shape)}"
        )


def check_same_device(op: str, **tensors: torch.Tensor | None) -> None:
    items = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(
                f"{op}: {name} is on {t.device} but {first_name} is on {first.device}; all tensors must share one device"
            )


def check_same_dtype(op: str, **tensors: torch.Tensor) -> None:
    items = list(tensors.items())
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.dtype != first.dtype:
            raise TypeError(
                f"{op}: {name} is {str(t.dtype).removeprefix('torch.')} but {first_name} is "
                f"{str(first.dtype).removeprefix('torch.')}; they must have the same dtype"
            )


def check_int(op: str, name: str, value, lo: int, hi: int | None = None, why: str = "") -> None:
    """`lo <= value <= hi` for a Python int (bool is not an int here)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{op}: {name} must be an int; got {value!r}")
    if value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{op}: {name} must be {bound}{why}; got {value}")


def check_bool(op: str, name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be a bool; got {value!r}")


def check_real(op: str, name: str, value) -> None:
    """A finite Python int or float (bool is not a number here)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{op}: {name} must be a real number; got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{op}: {name} must be finite; got {value!r}")


def check_choice(op: str, name: str, value, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{op}: {name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def check_ids(op: str, name: str, ids: torch.Tensor, num_experts: int) -> bool:
    """Expert ids are int32/int64 and lie in [0, num_experts). Returns check_range's answer."""
    if ids.dtype not in ID_DTYPES:
        raise TypeError(
            f"{op}: {name} must hold int32 or int64 expert ids; got {str(ids.dtype).removeprefix('torch.')}"
        )
    return check_range(op, name, ids, num_experts, "expert ids", noun="ids")


def check_range(op: str, name: str, t: torch.Tensor, bound: int, what: str, noun: str = "values") -> bool:
    """Every value of the integer tensor `t` lies in [0, bound): read at once on a CPU tensor, a
    device-side assertion on a GPU, an assertion in the graph while torch.compile traces. Returns
    whether the values are known to be checked when the caller's kernel runs (not when traced)."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    message = f"{op}: {name} must hold {what} in [0, {bound})"
    if torch.compiler.is_compiling():
        torch._assert_async((lo >= 0) & (hi < bound), message)
        return False
    if t.device.type == "cpu":
        lo, hi = int(lo), int(hi)
        if lo < 0 or hi >= bound:
            raise ValueError(f"{message}; got {noun} from {lo} to {hi}")
    else:
        torch._assert_async((lo >= 0) & (hi < bound), message)
    return True


def check_plan_indices(op: str, plan) -> bool:
    """A plan's row_to_slot_N and slot_to_row_N lie in [0, N), unless `dispatch` made it and it is
    untouched. Returns whether the plan is known to be good when the caller's kernel runs."""
    if not torch.compiler.is_compiling() and is_issued(plan):
        return True
    return check_rows(op, plan.row_to_slot_N, plan.slot_to_row_N)


def check_rows(op: str, row_to_slot_N: torch.Tensor, slot_to_row_N: torch.Tensor) -> bool:
    """The two index arrays of a plan lie in [0, N) (see check_range)."""
    N = row_to_slot_N.shape[0]
    what = f"slots and rows of the plan (N = {N})"
    rows_ok = check_range(op, "plan.row_to_slot_N", row_to_slot_N, N, what)
    return check_range(op, "plan.slot_to_row_N", slot_to_row_N, N, what) and rows_ok


def check_plan(op: str, plan, num_tokens: int) -> int:
    """A DispatchPlan for `num_tokens` tokens; returns K (1 when there are no tokens, so that a
    kernel can always divide by it)."""
    for field in ("row_to_slot_N", "slot_to_row_N"):
        t = getattr(plan, field)
        check_tensor(op, f"plan.{field}", t, "N", dtypes=ID_DTYPES)
    N = plan.row_to_slot_N.shape[0]
    check_dim(op, "plan.slot_to_row_N", plan.slot_to_row_N, 0, N, "as long as plan.row_to_slot_N")
    if num_tokens == 0:
        if N != 0:
            raise ValueError(f"{op}: the plan routes {N} rows but there are no tokens")
        return 1
    if N % num_tokens != 0 or N == 0:
        raise ValueError(f"{op}: the plan's {N} rows are not K per token for {num_tokens} tokens (N must be T*K)")
    return N // num_tokens


def check_offsets(op: str, name: str, offsets: torch.Tensor, num_experts: int, num_rows: int) -> bool:
    """Expert offsets: an int64 [E+1] tensor that starts at 0, never decreases and ends at the
    row count (read on a CPU tensor, a device-side assertion on a GPU). Returns whether the
    values were checked (False while torch.compile traces: see the module docstring)."""
    check_tensor(op, name, offsets, "E+1", dtypes=(torch.int64,))
    check_dim(op, name, offsets, 0, num_experts + 1, "E+1, one more than the number of experts")
    return check_offset_values(op, name, offsets, num_rows)


def check_offset_values(op: str, name: str, offsets: torch.Tensor, num_rows: int) -> bool:
    """The values part of check_offsets (same return value)."""
    message = f"{op}: {name} must start at 0, never decrease and end at {num_rows} (the number of rows)"
    valid = (offsets[0] == 0) & (offsets[-1] == num_rows) & (offsets.diff() >= 0).all()
    if torch.compiler.is_compiling():
        torch._assert_async(valid, message)
        return False
    if offsets.device.type == "cpu":
        if not bool(valid):
            shown = offsets.tolist() if offsets.numel() <= 10 else f"{offsets[:5].tolist()} ... {offsets[-5:].tolist()}"
            raise ValueError(f"{message}; got {shown}")
    else:
        torch._assert_async(valid, message)
    return True
