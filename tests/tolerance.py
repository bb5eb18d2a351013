"""The tolerance rule of the test suite.

fp32 and fp64 results must match the reference tightly. A low-precision (fp16/bf16) result is
judged against an fp32 reference by what plain PyTorch itself gets wrong in that precision: its
largest error may be at most `factor` (2, the flash-attention rule) times the largest error of
the reference computed in the low precision, plus one unit in the last place at the scale of the
result, so that a reference that happens to be exact does not demand exactness.
"""
import torch

_TIGHT = {torch.float64: 1e-10, torch.float32: 2e-5}


def _scale(t: torch.Tensor) -> float:
    return float(t.abs().max()) if t.numel() else 0.0


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, baseline: torch.Tensor | None = None,
                 factor: float = 2.0, name: str = "result", computed_in: torch.dtype | None = None) -> float:
    """Check `actual` against `expected` (fp32 or better); return the largest error relative to
    the largest |expected| (what the closing notes report).

    `baseline` is the same computation in plain PyTorch at `actual`'s precision; it is required
    when `actual` is fp16/bf16. `computed_in` names the precision of a result stored wider than it
    was computed (an fp32 loss from bf16 logits, fp32 gradients under bf16 autocast).
    """
    dtype = computed_in or actual.dtype
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if not actual.dtype.is_floating_point:
        assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
        assert torch.equal(actual, expected), f"{name}: integer results differ"
        return 0.0
    assert torch.isfinite(actual).all() or not torch.isfinite(expected).all(), f"{name}: non-finite values"
    if actual.numel() == 0:
        return 0.0
    scale = _scale(expected)
    err = float((actual.double() - expected.double()).abs().max())
    if dtype in _TIGHT:
        tol = _TIGHT[dtype] * (1.0 + scale)
        assert err <= tol, f"{name}: max error {err:.3e} > {tol:.3e} ({dtype})"
    else:
        assert baseline is not None, f"{name}: a {dtype} result needs a plain-PyTorch baseline"
        base = float((baseline.double() - expected.double()).abs().max())
        ulp = torch.finfo(dtype).eps * scale
        tol = factor * base + ulp
        assert err <= tol, (f"{name}: max error {err:.3e} > {factor} x PyTorch's own {dtype} error "
                            f"{base:.3e} + ulp {ulp:.3e}")
    return err / scale if scale else err
