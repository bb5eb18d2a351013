"""topk_gating on every kernel backend against the reference, forward and gradient; the reference
against transformers' Mixtral and DeepSeek-V3 routers and gradcheck; the custom ops; the errors.

Shape legend: T tokens, E experts, K top-k.
Ids and counts must equal the reference's on the same input; weights and gradients follow the
tolerance rule (fp32 tight, fp16/bf16 against plain PyTorch's own error).
"""
import pytest
import torch
from backends import kernel_backends
from tolerance import assert_close

from finteam_kernels import reference, topk_gating
from finteam_kernels.ops import topk_gating as gating_op

BACKENDS = kernel_backends()
inf, nan = float("inf"), float("nan")


def check_gating(logits_TE: torch.Tensor, k: int, backend: str, **options) -> tuple[float, float]:
    """Run `backend` and the reference on the same logits, forward and the gradient of a random
    weighting of the weights, and compare. Returns the relative errors of (weights, gradient)."""
    T = logits_TE.shape[0]
    # Bounded, so that rows whose picked scores all underflow (the renormalising denominator is
    # then clamped to the smallest normal float) keep a finite reference gradient.
    grad_TK = torch.rand(T, k, device=logits_TE.device) * 2 - 1
    x_TE = logits_TE.detach().requires_grad_()
    got = topk_gating(x_TE, k, backend=backend, **options)
    (got_grad_TE,) = torch.autograd.grad(got.weights_TK, x_TE, grad_TK)

    x32_TE = logits_TE.detach().float().requires_grad_()
    want = reference.topk_gating(x32_TE, k, **options)
    (want_grad_TE,) = torch.autograd.grad(want.weights_TK, x32_TE, grad_TK)
    baseline = baseline_grad_TE = None
    if logits_TE.dtype in (torch.float16, torch.bfloat16):
        xlow_TE = logits_TE.detach().requires_grad_()
        base = reference.topk_gating(xlow_TE, k, **options)
        (baseline_grad_TE,) = torch.autograd.grad(base.weights_TK, xlow_TE, grad_TK)
        baseline = base.weights_TK
        assert_close(got.ids_TK, base.ids_TK, name="ids on the same input")

    assert got.weights_TK.dtype == torch.float32 and got_grad_TE.dtype == logits_TE.dtype
    assert_close(got.ids_TK, want.ids_TK, name="ids")
    assert_close(got.tokens_per_expert_E, want.tokens_per_expert_E, name="tokens_per_expert")
    weight_err = assert_close(got.weights_TK, want.weights_TK, baseline=baseline, name="weights")
    grad_err = assert_close(got_grad_TE, want_grad_TE, baseline=baseline_grad_TE, name="grad_logits")
    return weight_err, grad_err


# Token counts: none; one; fewer than a tile's rows; one past a power of two, so the last tile
# is partial and, for E = 257, several programs share the rows.
TOKENS = (0, 1, 3, 257)
# Expert counts: one (K = E = 1); two; prime and not a power of two; Mixtral's 8; 64; prime and
# one past 256, so almost half of the 512-lane row tile is padding.
EXPERTS = (1, 2, 7, 8, 64, 257)


def _grid():
    for T in TOKENS:
        for E in EXPERTS:
            for K in sorted({1, 2, E}):  # top-1, top-2 and every expert (K = E), where K <= E
                if K <= E:
                    yield T, E, K


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T, E, K", list(_grid()))
def test_grid_fp32(T, E, K, backend):
    # Softmax, renormalised: the default router. The options below vary the rest on fewer shapes.
    check_gating(torch.randn(T, E) * 2, K, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T, E, K, options", [
    (33, 8, 2, dict(renormalize=False)),  # softmax probabilities as weights, no renormalisation
    (33, 8, 3, dict(score="sigmoid", renormalize=False, scaling=0.5)),  # raw sigmoid scores, scaled
    (33, 8, 2, dict(scaling=2.5)),  # the routed scaling factor applies after renormalising
    (33, 7, 7, dict(score="sigmoid")),  # sigmoid, K = E at prime E
    (257, 257, 2, dict(score="sigmoid")),  # sigmoid at E = 257 over several programs
    (33, 64, 6, dict(expert_bias="randn")),  # bias steers the choice; weights stay unbiased scores
    (33, 64, 6, dict(expert_bias="bf16")),  # a bias in another dtype than the logits
    (33, 7, 3, dict(score="sigmoid", expert_bias="randn", renormalize=False)),  # bias, prime E
    # DeepSeek-V3's router scaled down from 256 experts in 8 groups: sigmoid, bias, 4 groups kept,
    # renormalised, scaled by 2.5.
    (33, 64, 8, dict(score="sigmoid", expert_bias="randn", num_groups=8, topk_groups=4, scaling=2.5)),
    (33, 8, 2, dict(num_groups=4, topk_groups=2)),  # groups of two: rated by the sum of both
    (33, 8, 4, dict(num_groups=4, topk_groups=2)),  # K = every expert of the kept groups
    (33, 7, 3, dict(score="sigmoid", num_groups=7, topk_groups=3)),  # groups of one expert
    (33, 64, 8, dict(num_groups=8, topk_groups=1)),  # one kept group holds all K picks
    (33, 64, 4, dict(num_groups=2, topk_groups=2)),  # every group kept: same as ungrouped
    (33, 60, 5, dict(num_groups=5, topk_groups=2, expert_bias="randn")),  # groups of 12: not a power of two
    (257, 257, 8, dict(score="sigmoid", expert_bias="randn", scaling=2.5)),  # bias at prime E = 257
])
def test_options_fp32(T, E, K, options, backend):
    options = dict(options)
    if options.get("expert_bias") == "randn":
        options["expert_bias"] = 0.1 * torch.randn(E)
    elif options.get("expert_bias") == "bf16":
        options["expert_bias"] = (0.1 * torch.randn(E)).bfloat16()
    check_gating(torch.randn(T, E), K, backend, **options)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_bias_changes_selection_not_weights(score, backend):
    # Guards the two cases above from passing vacuously: the bias must change some picks, and the
    # weights must still be the unbiased scores of the picked experts.
    x_TE = torch.randn(64, 16)
    bias_E = torch.linspace(0.5, -0.5, 16)
    plain = topk_gating(x_TE, 2, score=score, renormalize=False, backend=backend)
    biased = topk_gating(x_TE, 2, score=score, renormalize=False, expert_bias=bias_E, backend=backend)
    assert not torch.equal(plain.ids_TK, biased.ids_TK)
    scores_TE = torch.softmax(x_TE, 1) if score == "softmax" else torch.sigmoid(x_TE)
    assert_close(biased.weights_TK, scores_TE.gather(1, biased.ids_TK.long()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("K, options", [
    (1, {}),
    (3, {}),
    (8, {}),  # every expert: the whole tie order
    (3, dict(score="sigmoid", expert_bias="ties")),  # ties made by the bias, not the logits
    (3, dict(num_groups=4, topk_groups=2)),  # tied group ratings go to the lowest group
    (2, dict(num_groups=8, topk_groups=3)),  # groups of one, tied
])
def test_ties_go_to_the_lowest_expert(K, options, backend):
    x_TE = torch.tensor([
        [0.0] * 8,  # all tied
        [3.0] * 8,  # all tied at another value
        [1.0, 0.0] * 4,  # experts 0, 2, 4, 6 tie for the best
        [1.0, 2.0, 2.0, 1.0, 2.0, 0.0, 0.0, 0.0],  # 1, 2, 4 tie, then 0, 3 tie
        [0.0, 0.0, 0.0, 0.0, 5.0, 5.0, 5.0, 5.0],  # the tie is in the upper half
    ])
    options = dict(options)
    if options.get("expert_bias") == "ties":
        options["expert_bias"] = torch.tensor([0.0, 0.5, 0.5, 0.0, 0.5, 0.0, 0.0, 0.5])
    check_gating(x_TE, K, backend, **options)
    if not options:
        assert topk_gating(x_TE, K, backend=backend).ids_TK[0].tolist() == list(range(K))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("options", [{}, dict(score="sigmoid", num_groups=4, topk_groups=2)])
def test_quantized_logits_tie_often(dtype, options, backend):
    # Logits on a coarse grid: most rows hold exact ties, which the low-precision ids must break
    # exactly as the reference does on the same input.
    check_gating((torch.randint(-2, 3, (65, 8)) * 0.5).to(dtype), 3, backend, **options)


NONFINITE_ROWS = [
    [nan] * 8,  # all NaN: no finite logit, so experts 0..K-1 with zero weights
    [-inf] * 8,  # all -inf: dead too
    [inf] * 8,  # all +inf: dead too (no finite logit)
    [nan, -inf, inf, nan, -inf, inf, nan, -inf],  # dead, every kind of non-finite value
    [nan, 1.0, -inf, 2.0, nan, 0.5, -inf, 3.0],  # NaN and -inf lose to every finite logit
    [0.0, inf, 1.0, 2.0, inf, 3.0, -1.0, nan],  # +inf is the largest float: the two share the weight
    [-inf, -3.4e38, nan, -inf, -inf, nan, -inf, -inf],  # one finite logit near -FLT_MAX; -inf ties with -FLT_MAX
    [1e30, -1e30, 0.0, 1e30, 5.0, -5.0, 2.0, 1.0],  # huge finite logits
    [0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 0.0, 1.0],  # an ordinary row between them
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("K", [1, 2, 4])
@pytest.mark.parametrize("options", [
    dict(score="softmax"),
    dict(score="sigmoid"),
    dict(score="sigmoid", expert_bias="randn", num_groups=4, topk_groups=2, scaling=2.0),  # DeepSeek-style
    dict(score="softmax", expert_bias="masks", renormalize=False),  # a -inf bias disables experts
])
def test_nan_and_inf_logits(K, options, backend):
    options = dict(options)
    if options.get("expert_bias") == "randn":
        options["expert_bias"] = 0.1 * torch.randn(8)
    elif options.get("expert_bias") == "masks":
        options["expert_bias"] = torch.tensor([0.0, -inf, 0.0, 0.0, -inf, 0.0, 0.0, 0.0])
    x_TE = torch.tensor(NONFINITE_ROWS)
    check_gating(x_TE, K, backend, **options)
    got = topk_gating(x_TE, K, backend=backend, **options)
    assert got.ids_TK[:4].tolist() == [list(range(K))] * 4
    assert (got.weights_TK[:4] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_dead_rows_get_zero_gradient(backend):
    x_TE = torch.tensor(NONFINITE_ROWS[:4] + [[0.1 * i for i in range(8)]], requires_grad=True)
    for score in ("softmax", "sigmoid"):
        weights_TK = topk_gating(x_TE, 2, score=score, backend=backend).weights_TK
        # The first pick only, since renormalised weights sum to a constant.
        (grad_TE,) = torch.autograd.grad(weights_TK[:, 0].sum(), x_TE)
        assert torch.equal(grad_TE[:4], torch.zeros(4, 8))
        assert grad_TE[4].abs().sum() > 0


UNDERFLOWING_ROWS = [
    [-95.0] * 8,  # sigmoid scores are denormal: their sum is below the smallest normal float
    [-200.0] * 8,  # sigmoid scores are exactly 0
    [100.0] + [0.0] * 7,  # softmax: the bias steers the picks to experts with denormal scores
]
UNDERFLOWING_BIAS = [-2.0] + [0.0] * 7


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("score", ["sigmoid", "softmax"])
def test_picked_scores_that_underflow(score, backend):
    # The renormalising denominator is clamped to the smallest normal float.
    check_gating(torch.tensor(UNDERFLOWING_ROWS), 2, backend, score=score, expert_bias=torch.tensor(UNDERFLOWING_BIAS))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("score", ["sigmoid", "softmax"])
def test_underflowing_rows_keep_a_finite_gradient(score, backend):
    # A large incoming gradient overflows the reference's grad / denom (then inf * 0 = NaN); the
    # gradient itself is finite, and a kernel that divides on the scores' side keeps it so, linear
    # in the incoming gradient.
    x_TE = torch.tensor(UNDERFLOWING_ROWS, requires_grad=True)
    weights_TK = topk_gating(x_TE, 2, score=score, expert_bias=torch.tensor(UNDERFLOWING_BIAS),
                             backend=backend).weights_TK
    grad_TK = torch.rand(3, 2) * 2 - 1
    (small_TE,) = torch.autograd.grad(weights_TK, x_TE, grad_TK, retain_graph=True)
    (large_TE,) = torch.autograd.grad(weights_TK, x_TE, grad_TK * 1e6)
    assert torch.isfinite(large_TE).all()
    assert_close(large_TE, small_TE * 1e6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", [
    "transposed",  # experts are the slow dimension: stride_le = T
    "column slice",  # rows are longer than E: stride_lt > E
    "every other row",  # stride_lt = 2E
])
def test_non_contiguous_logits(layout, backend):
    if layout == "transposed":
        x_TE = torch.randn(9, 33).t()
    elif layout == "column slice":
        x_TE = torch.randn(33, 20)[:, 3:12]
    else:
        x_TE = torch.randn(66, 9)[::2]
    assert not x_TE.is_contiguous()
    check_gating(x_TE, 3, backend, score="sigmoid", num_groups=3, topk_groups=2)
    check_gating(x_TE, 3, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", [
    "rows",  # token 2's row starts past 2**31 elements
    "columns",  # transposed: expert 2's column starts past 2**31 elements
])
def test_offsets_past_2_pow_31_elements(layout, backend):
    from test_addressing_64bit import far_rows

    x_TE = far_rows(3, 16) if layout == "rows" else far_rows(3, 16).t()
    check_gating(x_TE, 2, backend, score="sigmoid", expert_bias=0.1 * torch.randn(x_TE.shape[1]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_stride_zero_gradient(backend):
    # `weights.sum().backward()` sends a stride-0 gradient into the backward kernel.
    x_TE = torch.randn(17, 8, requires_grad=True)
    topk_gating(x_TE, 2, backend=backend).weights_TK.sum().backward()
    x32_TE = x_TE.detach().clone().requires_grad_()
    reference.topk_gating(x32_TE, 2).weights_TK.sum().backward()
    assert_close(x_TE.grad, x32_TE.grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T, E, K, options", [
    (257, 8, 2, {}),  # Mixtral
    (257, 64, 6, dict(expert_bias="randn")),
    (65, 64, 8, dict(score="sigmoid", expert_bias="randn", num_groups=8, topk_groups=4, scaling=2.5)),  # DeepSeek-V3
    (65, 257, 2, dict(renormalize=False)),  # prime E
])
def test_low_precision(T, E, K, options, dtype, backend):
    options = dict(options)
    if options.get("expert_bias") == "randn":
        options["expert_bias"] = 0.1 * torch.randn(E)
    check_gating(torch.randn(T, E).to(dtype), K, backend, **options)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T, E, K, options", [
    (257, 8, 2, {}),  # 128 rows per program: three programs, the last one partial
    (9, 257, 3, dict(score="sigmoid", expert_bias="randn")),  # 2 rows of 512 lanes per program
    (5, 1024, 4, dict(num_groups=8, topk_groups=2)),  # one row per program, grouped
    (3, 2049, 2, {}),  # two rows of 4096 lanes per program (32 warps on a GPU)
])
def test_gpu_tiles(T, E, K, options, backend, monkeypatch):
    # The interpreter normally runs big tiles to save time; here the tiles a GPU would run.
    from finteam_kernels.ops import topk_gating_kernels

    monkeypatch.setattr(topk_gating_kernels, "interpreting", lambda: False)
    options = dict(options)
    if options.get("expert_bias") == "randn":
        options["expert_bias"] = 0.1 * torch.randn(E)
    check_gating(torch.randn(T, E), K, backend, **options)


# The reference against independent formulations.


def test_reference_gradcheck():
    # Random float64 logits are tie-free, so the picks are locally constant and the weights smooth.
    x_TE = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    bias_E = 0.1 * torch.randn(8, dtype=torch.float64)
    for options in (dict(score="softmax"), dict(score="softmax", renormalize=False),
                    dict(score="sigmoid", expert_bias=bias_E, num_groups=4, topk_groups=2, scaling=2.5)):
        assert torch.autograd.gradcheck(lambda x: reference.topk_gating(x, 3, **options).weights_TK, (x_TE,))


def test_reference_matches_transformers_mixtral_router():
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

    config = MixtralConfig(hidden_size=32, num_local_experts=8, num_experts_per_tok=2)
    router = MixtralTopKRouter(config)
    torch.nn.init.normal_(router.weight)
    logits_TE, weights_TK, ids_TK = router(torch.randn(64, 32))
    ours = reference.topk_gating(logits_TE.detach(), 2)
    assert torch.equal(ours.ids_TK.long(), ids_TK)
    assert_close(ours.weights_TK, weights_TK.detach())


def test_reference_matches_transformers_deepseek_v3_router():
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    config = DeepseekV3Config(hidden_size=32, n_routed_experts=64, num_experts_per_tok=6, n_group=8, topk_group=4,
                              routed_scaling_factor=2.5, norm_topk_prob=True)
    router = DeepseekV3TopkRouter(config)
    torch.nn.init.normal_(router.weight, std=0.2)
    router.e_score_correction_bias.normal_(std=0.1)
    logits_TE, weights_TK, ids_TK = router(torch.randn(64, 32))
    ours = reference.topk_gating(logits_TE.detach(), 6, score="sigmoid", expert_bias=router.e_score_correction_bias,
                                 num_groups=8, topk_groups=4, scaling=2.5)
    # transformers returns its picks unsorted: compare per token in expert order.
    theirs_order = ids_TK.argsort(dim=1)
    ours_order = ours.ids_TK.argsort(dim=1)
    assert torch.equal(ours.ids_TK.gather(1, ours_order).long(), ids_TK.gather(1, theirs_order))
    assert_close(ours.weights_TK.gather(1, ours_order), weights_TK.detach().gather(1, theirs_order))


# The custom ops, torch.compile and the argument checks.


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    x_TE = torch.randn(5, 8, requires_grad=True)
    bias_E = 0.1 * torch.randn(8)
    torch.library.opcheck(torch.ops.finteam.topk_gating.default,
                          (x_TE, bias_E, 3, "sigmoid", True, 4, 2, 2.5, backend))
    torch.library.opcheck(torch.ops.finteam.topk_gating.default, (x_TE, None, 2, "softmax", False, 1, 1, 1.0, backend))
    ids_TK = reference.topk_gating(x_TE.detach(), 3).ids_TK
    torch.library.opcheck(torch.ops.finteam.topk_gating_backward.default,
                          (torch.randn(5, 3), x_TE.detach(), ids_TK, "softmax", True, 1.0, backend))


BAD_ARGUMENTS = [
    (dict(logits_TE=torch.randn(4)), ValueError, r"logits_TE must be a 2-D tensor \[T, E\]; got a 1-D"),
    (dict(logits_TE=torch.zeros(4, 8, dtype=torch.int32)), TypeError, r"logits_TE must be float32 or float16 or bfloat16 or float64; got a 2-D int32"),
    (dict(logits_TE=torch.randn(4, 0)), ValueError, r"the number of experts logits_TE.shape\[1\] must be >= 1; got 0"),
    (dict(k=0), ValueError, r"k must be in \[1, 8\] \(E, the number of experts\); got 0"),
    (dict(k=9), ValueError, r"k must be in \[1, 8\] \(E, the number of experts\); got 9"),
    (dict(k=2.0), TypeError, r"k must be an int; got 2.0"),
    (dict(score="relu"), ValueError, r"score must be one of 'softmax', 'sigmoid'; got 'relu'"),
    (dict(renormalize=1), TypeError, r"renormalize must be a bool; got 1"),
    (dict(expert_bias=torch.zeros(7)), ValueError, r"expert_bias must have size 8 in dimension 0 \(one per expert"),
    (dict(expert_bias=torch.zeros(1, 8)), ValueError, r"expert_bias must be a 1-D tensor \[E\]; got a 2-D"),
    (dict(expert_bias=torch.zeros(8, dtype=torch.int64)), TypeError, r"expert_bias must be float32 or .*; got a 1-D int64"),
    (dict(expert_bias=torch.zeros(8, device="meta")), ValueError, r"expert_bias is on meta but logits_TE is on cpu"),
    (dict(num_groups=0), ValueError, r"num_groups must be >= 1; got 0"),
    (dict(num_groups=3), ValueError, r"num_groups must divide the number of experts E=8; got 3"),
    (dict(num_groups=4, topk_groups=5), ValueError, r"topk_groups must be in \[1, 4\] \(num_groups\); got 5"),
    (dict(num_groups=4, topk_groups=0), ValueError, r"topk_groups must be in \[1, 4\] \(num_groups\); got 0"),
    (dict(topk_groups=2), ValueError, r"topk_groups must be in \[1, 1\] \(num_groups\); got 2"),
    (dict(k=5, num_groups=4, topk_groups=2), ValueError, r"k must be in \[1, 4\] \(topk_groups \* E / num_groups = 2 \* 2"),
    (dict(scaling="2"), TypeError, r"scaling must be a real number; got '2'"),
    (dict(scaling=True), TypeError, r"scaling must be a real number; got True"),
    (dict(scaling=nan), ValueError, r"scaling must be finite; got nan"),
    (dict(backend="gpu"), ValueError, r"backend must be one of"),
]


@pytest.mark.parametrize("bad, error, message", BAD_ARGUMENTS)
def test_bad_arguments(bad, error, message):
    arguments = dict(logits_TE=torch.randn(4, 8), k=2, backend="reference")
    arguments.update(bad)
    with pytest.raises(error, match=r"^topk_gating: " + message):
        topk_gating(arguments.pop("logits_TE"), arguments.pop("k"), **arguments)


def test_too_many_experts_for_the_kernels():
    with pytest.raises(ValueError, match=r"topk_gating: the triton backend handles at most 4096 experts; got E=4097"):
        gating_op.topk_gating_fwd(torch.randn(2, 4097), None, 2, "softmax", True, 1, 1, 1.0)


@pytest.mark.cuda
def test_rows_past_2_pow_31_elements_on_gpu():
    # Row 2 starts past 2**31 elements: int32 offsets would wrap and read row 0 or garbage.
    E = 64
    big = torch.empty((3, 2**31 // 2 + E), dtype=torch.bfloat16, device="cuda")
    x_TE = big[:, :E]
    x_TE.normal_()
    check_gating(x_TE, 4, "triton")
