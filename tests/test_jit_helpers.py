"""The shared @triton.jit helpers of `ops/_jit.py`: `round_to_bf16` gives exactly torch's
fp32 -> bf16 bits (round to nearest even) on values chosen to break a rounding, and `store` writes
fp32 into bf16, fp16 and fp32 tensors with torch's conversions' bits. Run in the interpreter
(with INTERPRETED, as the launchers set it), or on a GPU when the interpreter is off."""
import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from finteam_kernels.ops._jit import round_to_bf16, store  # noqa: E402
from finteam_kernels.ops._triton import interpreting  # noqa: E402

INTERPRETED = interpreting()
DEVICE = "cpu" if INTERPRETED else "cuda"
BLOCK = 1024


@triton.jit
def _round_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(out_ptr + offsets, round_to_bf16(tl.load(x_ptr + offsets, mask=mask)), mask=mask)


@triton.jit
def _store_kernel(x_ptr, out_ptr, n, INTERPRETED: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    store(out_ptr + offsets, tl.load(x_ptr + offsets, mask=mask), mask, INTERPRETED)


def _fp32(*bits: int) -> torch.Tensor:
    return torch.tensor(bits, dtype=torch.int64).to(torch.int32).view(torch.float32)


# fp32 bit patterns, each where a bf16 rounding (8 significant bits: the upper 16 bits kept) can go wrong
BF16_CASES = {
    # exactly halfway (lower 16 bits 0x8000): to the even neighbour, down when the kept bit is even,
    # up when it is odd, for both signs
    "tie_down": _fp32(0x3F808000, 0xBF808000, 0x40A08000),
    "tie_up": _fp32(0x3F818000, 0xBF818000, 0x40498000),
    # one fp32 unit either side of halfway: no tie rule, the nearer neighbour
    "near_half": _fp32(0x3F807FFF, 0x3F808001, 0x3F817FFF, 0x3F818001, 0xC2F67FFF, 0xC2F68001),
    # rounding up carries out of the significand into the exponent (1.99.. -> 2, -3.99.. -> -4)
    "carry_into_exponent": _fp32(0x3FFF8000, 0x3FFFFFFF, 0xC07FFFFF, 0x3F7FFFFF),
    # around bf16's largest finite (0x7F7F): halfway past it is inf, just below stays finite, and
    # fp32's largest finite is inf in bf16
    "overflow": _fp32(0x7F7F8000, 0xFF7F8000, 0x7F7F7FFF, 0xFF7F7FFF, 0x7F7FFFFF, 0xFF7FFFFF),
    "infinities": _fp32(0x7F800000, 0xFF800000),
    # NaNs, whose rounding would carry into the sign or leave an inf: one quiet, one with only low
    # payload bits (truncation alone gives inf), one all ones (adding wraps around), one whose low
    # half is a tie
    "nan": _fp32(0x7FC00000, 0x7F800001, 0xFFFFFFFF, 0x7FFF8000, 0xFF800001),
    # fp32 subnormals: the smallest (rounds to 0), ties on both sides of even, one that rounds up
    # into bf16's smallest normal, negatives
    "subnormal": _fp32(0x00000001, 0x00008000, 0x00018000, 0x00010000, 0x00017FFF, 0x007FFFFF,
                       0x807FFFFF, 0x80018000, 0x0040C000),
    "zeros": _fp32(0x00000000, 0x80000000),
}


def _random_normals(n: int) -> torch.Tensor:
    """Normal fp32 values of every exponent, with random significands (ties are rare here: the
    cases above hold them)."""
    significand = torch.randint(0, 1 << 23, (n,), dtype=torch.int64)
    exponent = torch.randint(1, 255, (n,), dtype=torch.int64)
    sign = torch.randint(0, 2, (n,), dtype=torch.int64)
    return ((sign << 31) | (exponent << 23) | significand).to(torch.int32).view(torch.float32)


def _launch(kernel, x: torch.Tensor, out_dtype: torch.dtype, **constexprs) -> torch.Tensor:
    x = x.to(DEVICE)
    out = torch.empty(x.shape, dtype=out_dtype, device=DEVICE)
    kernel[(triton.cdiv(x.numel(), BLOCK),)](x, out, x.numel(), BLOCK=BLOCK, **constexprs)
    return out.cpu()


def _assert_same_bits(actual: torch.Tensor, expected: torch.Tensor, x: torch.Tensor, what: str):
    """Equal bits, except that a NaN need only be a NaN (torch and a GPU each pick their own)."""
    int_type = {2: torch.int16, 4: torch.int32}[expected.element_size()]
    nan = expected.isnan()
    assert torch.equal(actual.isnan(), nan), f"{what}: NaN where torch has none, or none where it has one"
    differ = (actual.view(int_type) != expected.view(int_type)) & ~nan
    if differ.any():
        i = int(differ.nonzero()[0])
        bits = int(x.view(torch.int32)[i]) & 0xFFFFFFFF
        raise AssertionError(f"{what}: {int(differ.sum())} values differ, first fp32 0x{bits:08X}: "
                             f"got {actual[i].item()!r}, torch {expected[i].item()!r}")


@pytest.mark.parametrize("case", list(BF16_CASES))
def test_round_to_bf16_matches_torch(case):
    x = BF16_CASES[case]
    _assert_same_bits(_launch(_round_kernel, x, torch.bfloat16), x.to(torch.bfloat16), x, case)


def test_round_to_bf16_matches_torch_on_random_normals():
    x = _random_normals(4096)
    _assert_same_bits(_launch(_round_kernel, x, torch.bfloat16), x.to(torch.bfloat16), x, "random normals")


def test_cases_break_truncation():
    """Guard on the cases themselves: truncating (keeping the upper 16 bits) gets most of the
    non-NaN cases wrong, so a store that truncated would fail the tests here."""
    x = torch.cat([v for case, v in BF16_CASES.items() if case != "nan"])
    truncated = (x.view(torch.int32) >> 16).to(torch.int16)
    wrong = truncated != x.to(torch.bfloat16).view(torch.int16)
    assert int(wrong.sum()) >= len(x) // 2


# fp32 -> fp16 cases: ties on fp16's 11 significant bits, its overflow at 65520 (halfway past
# 65504), its subnormals and the fp32 values below them
FP16_CASES = torch.tensor([
    1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, -(1.0 + 2.0**-11),  # ties to even, down and up
    65504.0, 65519.0, 65520.0, -65520.0, 1e6,  # largest finite, just below and at halfway past it
    2.0**-24, 2.0**-25, 3 * 2.0**-25, 2.0**-26, -(2.0**-20 + 2.0**-24),  # subnormals and their ties
    1e-30, float("inf"), float("-inf"), float("nan"), 0.0, -0.0,
], dtype=torch.float32)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_store_converts_as_torch(out_dtype):
    x = torch.cat([*BF16_CASES.values(), FP16_CASES, _random_normals(2048), torch.randn(1000)])
    actual = _launch(_store_kernel, x, out_dtype, INTERPRETED=INTERPRETED)
    _assert_same_bits(actual, x.to(out_dtype), x, f"store fp32 -> {out_dtype}")
