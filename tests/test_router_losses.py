"""router_losses on every kernel backend against the reference, forward and gradient; the reference
against transformers' Mixtral `load_balancing_loss_func` and gradcheck; the custom ops,
torch.compile through both routing ops; the errors.

Shape legend: T tokens, E experts, K top-k.
"""
import pytest
import torch
from backends import kernel_backends
from tolerance import assert_close

from finteam_kernels import reference, router_losses, topk_gating

BACKENDS = kernel_backends()
inf, nan = float("inf"), float("nan")


def check_losses(logits_TE: torch.Tensor, ids_TK: torch.Tensor, backend: str) -> tuple[float, float]:
    """Run `backend` and the reference on the same inputs, both losses and the gradient of a
    random combination of them, and compare by the tolerance rule. Returns the relative errors
    of (losses, gradient)."""
    E = logits_TE.shape[1]
    grad_aux, grad_z = torch.randn(()), torch.randn(())
    x_TE = logits_TE.detach().requires_grad_()
    got = router_losses(x_TE, ids_TK, E, backend=backend)
    (got_grad_TE,) = torch.autograd.grad(got.aux_loss * grad_aux + got.z_loss * grad_z, x_TE)

    x32_TE = logits_TE.detach().float().requires_grad_()
    want = reference.router_losses(x32_TE, ids_TK, E)
    (want_grad_TE,) = torch.autograd.grad(want.aux_loss * grad_aux + want.z_loss * grad_z, x32_TE)
    baseline = baseline_grad_TE = None
    if logits_TE.dtype in (torch.float16, torch.bfloat16):
        xlow_TE = logits_TE.detach().requires_grad_()
        base = reference.router_losses(xlow_TE, ids_TK, E)
        (baseline_grad_TE,) = torch.autograd.grad(base.aux_loss * grad_aux + base.z_loss * grad_z, xlow_TE)
        baseline = torch.stack(base)

    assert got.aux_loss.shape == () and got.aux_loss.dtype == torch.float32 and got_grad_TE.dtype == logits_TE.dtype
    loss_err = assert_close(torch.stack(got), torch.stack(want), baseline=baseline, name="losses")
    grad_err = assert_close(got_grad_TE, want_grad_TE, baseline=baseline_grad_TE, name="grad_logits")
    return loss_err, grad_err


def _ids(logits_TE: torch.Tensor, k: int) -> torch.Tensor:
    return reference.topk_gating(logits_TE.float(), k).ids_TK


# Token counts: none; one; fewer than a tile's rows; one past a power of two (a partial last
# tile, and several partial-sum programs for E = 257). Expert counts: one; two; prime; 8; 64;
# prime and one past 256. K: top-1, top-2 and every expert.
TOKENS = (0, 1, 3, 257)
EXPERTS = (1, 2, 7, 8, 64, 257)


def _grid():
    for T in TOKENS:
        for E in EXPERTS:
            for K in sorted({1, 2, E}):
                if K <= E:
                    yield T, E, K


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T, E, K", list(_grid()))
def test_grid_fp32(T, E, K, backend):
    x_TE = torch.randn(T, E) * 2
    check_losses(x_TE, _ids(x_TE, K), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [
    "all tokens on one expert",  # one count holds every assignment, the others are 0
    "several empty experts",  # experts 3..7 never chosen
    "int64 ids",  # what transformers passes
    "ids not from the logits",  # the losses take any ids in range, duplicates included
    "masked experts",  # -inf logits: zero probability, still a finite loss and gradient
    "large logits",  # logsumexp needs the max shift: exp(100) overflows nothing
])
def test_cases(case, backend):
    T, E, K = 33, 8, 2
    x_TE = torch.randn(T, E)
    ids_TK = _ids(x_TE, K)
    if case == "all tokens on one expert":
        ids_TK = torch.stack([torch.full((T,), 5), torch.full((T,), 2)], dim=1).int()
    elif case == "several empty experts":
        ids_TK = _ids(x_TE[:, :3], K)
    elif case == "int64 ids":
        ids_TK = ids_TK.long()
    elif case == "ids not from the logits":
        ids_TK = torch.randint(0, E, (T, 3))
    elif case == "masked experts":
        x_TE[:, [1, 6]] = -inf
        x_TE[0, :4] = -inf
    else:
        x_TE = x_TE * 40 + 100
    check_losses(x_TE, ids_TK, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_logits_give_the_references_non_finite_losses(backend):
    # Not meaningful inputs, but the kernel must not hide them: NaN and +inf make the losses NaN
    # or inf exactly where the reference's do.
    rows = [
        [nan, 0.0, 1.0],  # NaN: both losses NaN
        [inf, 0.0, 1.0],  # +inf: NaN probabilities, infinite logsumexp
        [-inf, -inf, -inf],  # all -inf: NaN probabilities, logsumexp -inf, squared +inf
    ]
    for row in rows:
        x_TE = torch.tensor([row, [0.0, 1.0, 2.0]])
        ids_TK = torch.tensor([[0], [2]])
        got = router_losses(x_TE, ids_TK, 3, backend=backend)
        want = reference.router_losses(x_TE, ids_TK, 3)
        assert torch.isnan(got.aux_loss) and torch.isnan(want.aux_loss)
        assert torch.equal(got.z_loss.isnan(), want.z_loss.isnan()) and not torch.isfinite(got.z_loss)
        assert torch.isnan(want.z_loss) or got.z_loss == want.z_loss


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", [
    "transposed",  # experts are the slow dimension: stride_le = T
    "every other row",  # stride_lt = 2E; ids a column slice, also strided
])
def test_non_contiguous(layout, backend):
    if layout == "transposed":
        x_TE = torch.randn(9, 33).t()
        ids_TK = _ids(x_TE, 2)
    else:
        x_TE = torch.randn(66, 9)[::2]
        ids_TK = torch.cat([_ids(x_TE, 2), torch.zeros(33, 1, dtype=torch.int32)], dim=1)[:, :2]
    assert not x_TE.is_contiguous() and (layout == "transposed" or not ids_TK.is_contiguous())
    check_losses(x_TE, ids_TK, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", [
    "rows",  # token 2's row starts past 2**31 elements
    "columns",  # transposed: expert 2's column starts past 2**31 elements
])
def test_offsets_past_2_pow_31_elements(layout, backend):
    from test_addressing_64bit import far_rows

    x_TE = far_rows(3, 16) if layout == "rows" else far_rows(3, 16).t()
    check_losses(x_TE, _ids(x_TE, 2), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T, E, K", [
    (257, 8, 2),  # Mixtral
    (65, 257, 8),  # prime E, several partial-sum programs
])
def test_low_precision(T, E, K, dtype, backend):
    x_TE = (torch.randn(T, E) * 2).to(dtype)
    check_losses(x_TE, _ids(x_TE, K), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_tokens_stay_in_the_graph(backend):
    x_TE = torch.randn(0, 8, requires_grad=True)
    losses = router_losses(x_TE, torch.zeros(0, 2, dtype=torch.int32), 8, backend=backend)
    assert losses.aux_loss.item() == 0 and losses.z_loss.item() == 0
    assert losses.aux_loss.requires_grad and losses.z_loss.requires_grad
    (losses.aux_loss + losses.z_loss).backward()
    assert x_TE.grad.shape == (0, 8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_loss_alone(backend):
    # Only the aux loss is used: the z-loss's gradient arrives as nothing (or zeros).
    x_TE = torch.randn(17, 8, requires_grad=True)
    router_losses(x_TE, _ids(x_TE.detach(), 2), 8, backend=backend).aux_loss.backward()
    x32_TE = x_TE.detach().clone().requires_grad_()
    reference.router_losses(x32_TE, _ids(x32_TE.detach(), 2), 8).aux_loss.backward()
    assert_close(x_TE.grad, x32_TE.grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T, E, K", [
    (1100, 8, 2),  # 128 rows per program: 9 programs, each with one row block
    (300, 64, 2),  # 16 rows per program, 19 programs
])
def test_gpu_tiles(T, E, K, backend, monkeypatch):
    # The interpreter normally runs big tiles to save time; here the tiles a GPU would run.
    from finteam_kernels.ops import topk_gating_kernels

    monkeypatch.setattr(topk_gating_kernels, "interpreting", lambda: False)
    x_TE = torch.randn(T, E)
    check_losses(x_TE, _ids(x_TE, K), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_more_row_blocks_than_partial_sum_programs(backend, monkeypatch):
    # With more row blocks than programs, each program sums several blocks in a strided loop.
    from finteam_kernels.ops import router_losses as op

    monkeypatch.setattr(op, "MAX_PARTIALS", 2)
    x_TE = torch.randn(257, 257)
    check_losses(x_TE, _ids(x_TE, 2), backend)


# The reference against independent formulations.


def test_reference_gradcheck():
    x_TE = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    ids_TK = _ids(x_TE.detach(), 2)
    assert torch.autograd.gradcheck(lambda x: torch.stack(reference.router_losses(x, ids_TK, 5)), (x_TE,))


def test_reference_matches_transformers_load_balancing_loss():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    for T, E, K in ((64, 8, 2), (33, 7, 3), (16, 4, 4)):
        x_TE = torch.randn(T, E)
        theirs = load_balancing_loss_func((x_TE,), num_experts=E, top_k=K)
        ours = reference.router_losses(x_TE, _ids(x_TE, K), E)
        assert_close(ours.aux_loss, theirs)


def test_balanced_router_scores_k():
    # The Mixtral convention: with uniform probabilities and perfectly balanced picks, aux = K.
    x_TE = torch.zeros(8, 4)
    ids_TK = torch.tensor([[0, 1], [2, 3]] * 4)
    assert_close(reference.router_losses(x_TE, ids_TK, 4).aux_loss, torch.tensor(2.0))


# The custom ops, torch.compile and the argument checks.


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    x_TE = torch.randn(5, 8, requires_grad=True)
    ids_TK = _ids(x_TE.detach(), 2)
    torch.library.opcheck(torch.ops.finteam.router_losses.default, (x_TE, ids_TK, 8, False, backend))
    torch.library.opcheck(torch.ops.finteam.router_losses_backward.default,
                          (torch.randn(()), torch.randn(()), x_TE.detach(), ids_TK, 8, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_through_gating_and_losses(backend):
    # A router step as a trainer writes it, compiled whole: both ops' fake implementations and
    # backward registrations must hold up, and the results match eager.
    def step(logits_TE):
        routing = topk_gating(logits_TE, 2, score="sigmoid", num_groups=4, topk_groups=2, scaling=2.0,
                              backend=backend)
        losses = router_losses(logits_TE, routing.ids_TK, 8, backend=backend)
        return (routing.weights_TK * torch.arange(1.0, 3.0)).sum() + losses.aux_loss + 0.1 * losses.z_loss

    x_TE = torch.randn(16, 8, requires_grad=True)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    (got_TE,) = torch.autograd.grad(compiled(x_TE), x_TE)
    (want_TE,) = torch.autograd.grad(step(x_TE), x_TE)
    assert_close(got_TE, want_TE)


BAD_ARGUMENTS = [
    (dict(logits_TE=torch.randn(4)), ValueError, r"logits_TE must be a 2-D tensor \[T, E\]; got a 1-D"),
    (dict(logits_TE=torch.zeros(4, 8, dtype=torch.int64)), TypeError, r"logits_TE must be float32 or .*; got a 2-D int64"),
    (dict(topk_ids_TK=torch.zeros(4, dtype=torch.int32)), ValueError, r"topk_ids_TK must be a 2-D tensor \[T, K\]"),
    (dict(topk_ids_TK=torch.zeros(4, 2)), TypeError, r"topk_ids_TK must be int32 or int64; got a 2-D float32"),
    (dict(topk_ids_TK=torch.zeros(5, 2, dtype=torch.int32)), ValueError,
     r"topk_ids_TK must have size 4 in dimension 0 \(one row per token, as logits_TE\); got shape \(5, 2\)"),
    (dict(topk_ids_TK=torch.full((4, 2), 8)), ValueError, r"topk_ids_TK must hold expert ids in \[0, 8\); got ids from 8 to 8"),
    (dict(topk_ids_TK=torch.full((4, 2), -1)), ValueError, r"topk_ids_TK must hold expert ids in \[0, 8\); got ids from -1"),
    (dict(topk_ids_TK=torch.zeros(4, 2, dtype=torch.int32, device="meta")), ValueError,
     r"topk_ids_TK is on meta but logits_TE is on cpu"),
    (dict(num_experts=0), ValueError, r"num_experts must be >= 1; got 0"),
    (dict(num_experts=7), ValueError, r"logits_TE must have size 7 in dimension 1 \(num_experts\); got shape \(4, 8\)"),
    (dict(num_experts="8"), TypeError, r"num_experts must be an int; got '8'"),
    (dict(backend="gpu"), ValueError, r"backend must be one of"),
]


@pytest.mark.parametrize("bad, error, message", BAD_ARGUMENTS)
def test_bad_arguments(bad, error, message):
    arguments = dict(logits_TE=torch.randn(4, 8), topk_ids_TK=torch.zeros(4, 2, dtype=torch.int32), num_experts=8,
                     backend="reference")
    arguments.update(bad)
    with pytest.raises(error, match=r"^router_losses: " + message):
        router_losses(arguments.pop("logits_TE"), arguments.pop("topk_ids_TK"), arguments.pop("num_experts"),
                      **arguments)


@pytest.mark.cuda
def test_deterministic_on_gpu():
    # Partial sums and a fixed-order reduction: bitwise the same on every run, unlike float atomics.
    x_TE = torch.randn(65536, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ids_TK = topk_gating(x_TE.detach(), 8, backend="triton").ids_TK
    first = router_losses(x_TE, ids_TK, 256, backend="triton")
    (first_grad,) = torch.autograd.grad(first.aux_loss + first.z_loss, x_TE)
    for _ in range(3):
        again = router_losses(x_TE, ids_TK, 256, backend="triton")
        (grad,) = torch.autograd.grad(again.aux_loss + again.z_loss, x_TE)
        assert torch.equal(torch.stack(again), torch.stack(first)) and torch.equal(grad, first_grad)
    check_losses(x_TE[:4096], ids_TK[:4096], "triton")


@pytest.mark.cuda
def test_rows_past_2_pow_31_elements_on_gpu():
    # Row 2 starts past 2**31 elements: int32 offsets would wrap and read row 0 or garbage.
    E = 64
    big = torch.empty((3, 2**31 // 2 + E), dtype=torch.bfloat16, device="cuda")
    x_TE = big[:, :E]
    x_TE.normal_()
    check_losses(x_TE, topk_gating(x_TE, 2, backend="triton").ids_TK, "triton")
