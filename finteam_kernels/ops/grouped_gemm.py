"""grouped_gemm: every expert's block of rows times that expert's weight matrix, in one launch.

Shape legend: E experts, N routed rows (grouped by expert), D and O the GEMM's input and output
widths; rows of expert e are `expert_offsets_E1[e]:expert_offsets_E1[e+1]`.
  forward   y_NO[rows of e] = x_ND[rows of e] @ w_EOD[e]^T
  backward  dx_ND[rows of e] = dy_NO[rows of e] @ w_EOD[e]       (the forward kernel, w transposed)
            dw_EOD[e] = dy_NO[rows of e]^T @ x_ND[rows of e]     (zero for an expert with no rows)

`gemm` and `wgrad` are the launch helpers that moe_experts shares (with the row gather and the
GLU epilogue); `grouped_gemm_fwd` / `grouped_gemm_bwd` are the launchers of the contract.
"""
import torch

from .. import _checks, reference
from .._backend import direct_call, eager_function, kernel, pick_backend, traced
from ._triton import cdiv, device_guard, interpreting, next_pow2

GEMM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _tf32_allowed() -> bool:
    """torch.backends.cuda.matmul.allow_tf32, however it was set (that flag,
    torch.set_float32_matmul_precision, or the newer fp32_precision)."""
    try:
        return bool(torch.backends.cuda.matmul.allow_tf32)
    except RuntimeError:  # both the legacy and the new flag were set: PyTorch lets the new one decide
        return torch.backends.cuda.matmul.fp32_precision == "tf32"


def _dot_flags(dtype: torch.dtype) -> dict:
    """fp32 operands multiply as PyTorch's own fp32 CUDA matmuls do (TF32 on tensor cores only
    when PyTorch allows it); under the interpreter the kernels work around its bf16 traps."""
    tf32 = dtype == torch.float32 and _tf32_allowed()
    return {"INTERPRETED": interpreting(), "DOT_PRECISION": "tf32" if tf32 else "ieee"}


def gemm(a: torch.Tensor, w_EOD: torch.Tensor, expert_offsets_E1: torch.Tensor, *,
         index_N: torch.Tensor | None = None, index_div: int = 1, activation: str = "none",
         keep_h: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, h): y[r] = a[src(r)] @ w[e(r)]^T for the expert-grouped rows r, src(r) = index_N[r] //
    index_div with an index (the fused permute), else r.

    With an activation, w is [E, 2*O, D] (gate rows, then up rows), y[r] = act(gate) * up and h is
    [gate | up] ([N, 2*O], or [0, 2*O] unless keep_h). Without one, h is [0, 0]. a and w may be
    any strided views of one dtype; y and h are new contiguous tensors in that dtype.
    """
    from . import grouped_gemm_kernels as kernels

    N = index_N.shape[0] if index_N is not None else a.shape[0]
    E, width, D = w_EOD.shape
    glu = activation != "none"
    O = width // 2 if glu else width
    y = a.new_empty((N, O))
    h = a.new_empty((N if keep_h else 0, 2 * O if glu else 0))
    if y.numel() == 0:
        return y, h
    args = (a, index_N if index_N is not None else expert_offsets_E1, w_EOD, expert_offsets_E1, y,
            h if keep_h else y, N, O, D, E, index_div, next_pow2(N),
            a.stride(0), a.stride(1), w_EOD.stride(0), w_EOD.stride(1), w_EOD.stride(2),
            y.stride(0), y.stride(1), h.stride(0) if keep_h else 0, h.stride(1) if keep_h else 0)
    flags = dict(GATHER=index_N is not None, ACTIVATION=activation, STORE_H=keep_h,
                 EXPERT_CHUNK=kernels.EXPERT_CHUNK, **_dot_flags(a.dtype))

    def grid(meta):
        return ((cdiv(N, meta["BLOCK_M"]) + min(E, N)) * cdiv(O, meta["BLOCK_N"]),)

    family = kernels.family(a.element_size(), glu, flags["DOT_PRECISION"])
    problem = kernels.gemm_problem(family, a, w_EOD, N, O, D, E, flags)
    with device_guard(a):
        kernels.launch("gemm", family, problem, N, E, grid, args, flags, a.device)
    return y, h


def wgrad(dy: torch.Tensor, a: torch.Tensor, expert_offsets_E1: torch.Tensor, *,
          index_N: torch.Tensor | None = None, index_div: int = 1,
          out_EOD: torch.Tensor | None = None) -> torch.Tensor:
    """dw[e] = dy[rows of e]^T @ a[src(rows of e)] ([E, O, D]; zeros for an expert with no rows),
    with src as in `gemm`. Written into `out_EOD` when given (any strided view, e.g. the
    transpose of a new tensor), else into a new contiguous tensor."""
    from . import grouped_gemm_kernels as kernels

    N, O = dy.shape
    D = a.shape[1]
    E = expert_offsets_E1.shape[0] - 1
    dw = out_EOD if out_EOD is not None else dy.new_empty((E, O, D))
    if dw.numel() == 0:
        return dw
    args = (dy, a, index_N if index_N is not None else expert_offsets_E1, expert_offsets_E1, dw,
            O, D, E, index_div, next_pow2(N), dy.stride(0), dy.stride(1), a.stride(0), a.stride(1),
            dw.stride(0), dw.stride(1), dw.stride(2))
    flags = dict(GATHER=index_N is not None, **_dot_flags(a.dtype))

    def grid(meta):
        return (cdiv(O, meta["BLOCK_O"]) * cdiv(D, meta["BLOCK_D"]), E)

    family = kernels.family(a.element_size(), precision=flags["DOT_PRECISION"])
    problem = kernels.wgrad_problem(family, dy, a, dw, O, D, E, flags)
    with device_guard(a):
        kernels.launch("wgrad", family, problem, N, E, grid, args, flags, a.device)
    return dw


def grouped_gemm_fwd(x_ND: torch.Tensor, w_EOD: torch.Tensor, expert_offsets_E1: torch.Tensor) -> torch.Tensor:
    """Triton launcher of the forward."""
    return gemm(x_ND, w_EOD, expert_offsets_E1)[0]


def grouped_gemm_bwd(grad_NO: torch.Tensor, x_ND: torch.Tensor, w_EOD: torch.Tensor,
                     expert_offsets_E1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton launcher of the backward: (grad_x_ND, grad_w_EOD)."""
    grad_NO = grad_NO.to(x_ND.dtype)
    grad_x_ND = gemm(grad_NO, w_EOD.transpose(1, 2), expert_offsets_E1)[0]
    return grad_x_ND, wgrad(grad_NO, x_ND, expert_offsets_E1)


def _grouped_gemm_impl(x_ND: torch.Tensor, w_EOD: torch.Tensor, expert_offsets_E1: torch.Tensor, offsets_checked: bool,
                       backend: str) -> torch.Tensor:
    if not offsets_checked:  # traced by torch.compile: the offsets are first seen here
        _checks.check_offset_values("grouped_gemm", "expert_offsets_E1", expert_offsets_E1, x_ND.shape[0])
    return kernel("grouped_gemm_fwd", backend, grouped_gemm_fwd)(x_ND, w_EOD, expert_offsets_E1)


_grouped_gemm = torch.library.custom_op("finteam::grouped_gemm", _grouped_gemm_impl, mutates_args=())


@_grouped_gemm.register_fake
def _(x_ND, w_EOD, expert_offsets_E1, offsets_checked, backend):
    return x_ND.new_empty((x_ND.shape[0], w_EOD.shape[1]))


def _grouped_gemm_backward_impl(grad_NO: torch.Tensor, x_ND: torch.Tensor, w_EOD: torch.Tensor,
                                expert_offsets_E1: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return kernel("grouped_gemm_bwd", backend, grouped_gemm_bwd)(grad_NO, x_ND, w_EOD, expert_offsets_E1)


_grouped_gemm_backward = torch.library.custom_op(
    "finteam::grouped_gemm_backward", _grouped_gemm_backward_impl, mutates_args=())


@_grouped_gemm_backward.register_fake
def _(grad_NO, x_ND, w_EOD, expert_offsets_E1, backend):
    return x_ND.new_empty(x_ND.shape), w_EOD.new_empty(w_EOD.shape)


def _setup_context(ctx, inputs, output):
    x_ND, w_EOD, expert_offsets_E1, _, ctx.backend = inputs
    ctx.save_for_backward(x_ND, w_EOD, expert_offsets_E1)


def _backward(ctx, grad_NO):
    x_ND, w_EOD, expert_offsets_E1 = ctx.saved_tensors
    backward_op = _grouped_gemm_backward if traced() else _grouped_gemm_backward_impl  # see eager_function
    grad_x_ND, grad_w_EOD = backward_op(grad_NO, x_ND, w_EOD, expert_offsets_E1, ctx.backend)
    return grad_x_ND, grad_w_EOD, None, None, None


_grouped_gemm.register_autograd(_backward, setup_context=_setup_context)
_grouped_gemm_eager = eager_function(_grouped_gemm_impl, _setup_context, _backward)


def grouped_gemm(x_ND: torch.Tensor, w_EOD: torch.Tensor, expert_offsets_E1: torch.Tensor, *,
                 backend: str | None = None) -> torch.Tensor:
    """y_NO: each expert's rows of x_ND (grouped by expert, `expert_offsets_E1` int64 [E+1] from 0
    to N) times the transpose of that expert's w_EOD[e]; y in x's dtype, fp32 accumulation."""
    op = "grouped_gemm"
    _checks.check_tensor(op, "x_ND", x_ND, "N, D", dtypes=GEMM_DTYPES)
    _checks.check_tensor(op, "w_EOD", w_EOD, "E, O, D", dtypes=GEMM_DTYPES)
    _checks.check_same_dtype(op, x_ND=x_ND, w_EOD=w_EOD)
    _checks.check_dim(op, "w_EOD", w_EOD, 2, x_ND.shape[1], "D, the width of x_ND")
    _checks.check_tensor(op, "expert_offsets_E1", expert_offsets_E1, "E+1", dtypes=(torch.int64,))
    _checks.check_same_device(op, x_ND=x_ND, w_EOD=w_EOD, expert_offsets_E1=expert_offsets_E1)
    offsets_checked = _checks.check_offsets(op, "expert_offsets_E1", expert_offsets_E1, w_EOD.shape[0], x_ND.shape[0])
    name = pick_backend(backend, x_ND.device, op)
    if name == "reference":
        return reference.grouped_gemm(x_ND, w_EOD, expert_offsets_E1)
    if direct_call(x_ND, w_EOD):
        return kernel("grouped_gemm_fwd", name, grouped_gemm_fwd)(x_ND, w_EOD, expert_offsets_E1)
    run = _grouped_gemm if traced(x_ND, w_EOD) else _grouped_gemm_eager
    return run(x_ND, w_EOD, expert_offsets_E1, offsets_checked, name)
