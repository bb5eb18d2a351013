"""@triton.jit helpers shared by the kernel modules, and the interpreter traps they work around.

Triton's interpreter (TRITON_INTERPRET=1: the tests and CI) is not a GPU in two ways that matter
to a kernel's numbers (seen with triton 3.6.0 and 3.9.0):
  - its fp32 -> bf16 conversion truncates, where a GPU (and PyTorch) rounds to nearest even, and
    garbles fp32 subnormals. A bf16 result stored through it carries about twice the GPU's
    rounding error, which is all that the bf16 tests allow (twice plain PyTorch's own error): they
    could no longer tell a kernel that rounds twice from one that rounds once. Its fp32 -> fp16
    conversion rounds to nearest even (numpy's), as a GPU does.
  - its tl.dot on bf16 operands gives garbage.
So every kernel stores a value computed in fp32 into a 16-bit tensor through `store`, and hands
its bf16 tiles to tl.dot through `dot_operand`. Both take a constexpr INTERPRETED that the
launcher sets from `_triton.interpreting()` and `aot_specs()` gives as False (the GPU value);
with it False they compile to the plain conversion and dot, not one instruction more.
"""
import triton
import triton.language as tl


@triton.jit
def round_to_bf16(x):
    """fp32 `x` rounded to nearest even to bf16, in integer arithmetic: the value torch's
    `.to(torch.bfloat16)` gives (for a NaN, a NaN).

    Rounding adds just under half a bf16 unit (plus the kept lowest bit, for ties to even) to the
    bits, so the carry runs into the exponent where it should: halfway past bf16's largest finite
    value becomes inf, and inf stays inf. A NaN would carry into a wrong exponent or wrap around,
    so it keeps its upper bits instead, made quiet so that they still read as a NaN. The result is
    the upper 16 bits bitcast to bf16: no float conversion, so fp32 subnormals round as the rest."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    upper = tl.where(x != x, (bits | 0x400000) >> 16, rounded)
    return upper.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def store(ptrs, x, mask, INTERPRETED: tl.constexpr):
    """tl.store of `x` converted once, to nearest even, to the pointers' dtype. Under the
    interpreter (INTERPRETED) an fp32 `x` bound for bf16 is converted by `round_to_bf16` instead
    of the interpreter's own conversion."""
    if INTERPRETED and ptrs.dtype.element_ty == tl.bfloat16 and x.dtype == tl.float32:
        x = round_to_bf16(x)
    tl.store(ptrs, x.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def dot_operand(t, INTERPRETED: tl.constexpr):
    """t ready for tl.dot. Under the interpreter (INTERPRETED), whose bf16 tl.dot is wrong, bf16
    tiles are widened to fp32 first: exact, as the GPU's bf16 products are exact in fp32 too."""
    if INTERPRETED and t.dtype == tl.bfloat16:
        t = t.to(tl.float32)
    return t
