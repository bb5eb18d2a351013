"""grouped_gemm (being built: for now the plain-PyTorch reference only)."""
from .. import reference


def grouped_gemm(x_ND, w_EOD, expert_offsets_E1, *, backend=None):
    return reference.grouped_gemm(x_ND, w_EOD, expert_offsets_E1)
