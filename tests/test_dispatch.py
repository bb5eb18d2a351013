"""dispatch: equal to the reference exactly over the full (T, E, K) grid and the awkward cases,
its invariants on generated shapes and ids, the custom op, and the argument errors."""
import pytest
import torch
from backends import kernel_backends
from routing import routed
from hypothesis import given, settings
from hypothesis import strategies as st

from finteam_kernels import dispatch, reference
from finteam_kernels.ops import dispatch_kernels

BACKENDS = kernel_backends()

TOKENS = [
    0,  # no tokens: empty plan, zero counts, offsets all 0
    1,  # a single token
    3,  # a partial block
    257,  # prime; with K >= 2 more slots than a block, so the scan over blocks matters
]
EXPERTS = [
    1,  # every slot in one group
    2,  # the smallest real choice
    7,  # prime, not a power of two: masked expert lanes
    8,  # a power of two (Mixtral)
    64,  # a typical fine-grained MoE
    257,  # prime and past 256 experts: the next lane width
]
GRID = [(T, E, K) for T in TOKENS for E in EXPERTS for K in sorted({1, 2, E}) if K <= E]


def assert_same_plan(actual, expected):
    for name, a, e in zip(expected._fields, actual, expected):
        assert a.dtype == e.dtype, f"{name}: {a.dtype} != {e.dtype}"
        assert torch.equal(a, e), f"{name} differs from the reference"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T,E,K", GRID)
def test_dispatch_grid_matches_reference(backend, T, E, K):
    ids = routed(T, K, E)
    assert_same_plan(dispatch(ids, E, backend=backend), reference.dispatch(ids, E))


CASES = {
    # every token on one expert: one long run, all other experts empty
    "one_expert": lambda: torch.full((300, 2), 5, dtype=torch.int32),
    # only experts 1, 2, 4 and 9 of 16 get slots: empty groups first, between and last
    "empty_experts": lambda: torch.tensor([1, 2, 4, 9])[torch.randint(0, 4, (200, 3))].to(torch.int32),
    # transformers passes int64 ids
    "int64": lambda: torch.randint(0, 64, (129, 4), dtype=torch.int64),
    # a transposed view: ids[t, j] are not at t*K + j
    "non_contiguous": lambda: torch.randint(0, 16, (3, 111), dtype=torch.int32).t(),
    # every other column of a wider tensor
    "strided_columns": lambda: torch.randint(0, 16, (77, 6), dtype=torch.int64)[:, ::2],
    # a token may name the same expert more than once: dispatch only groups slots
    "repeated_in_token": lambda: torch.randint(0, 3, (50, 6), dtype=torch.int32),
}
EXPERTS_OF_CASE = {"one_expert": 8, "empty_experts": 16, "int64": 64, "non_contiguous": 16, "strided_columns": 16,
                   "repeated_in_token": 3}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_dispatch_cases_match_reference(backend, case):
    ids, E = CASES[case](), EXPERTS_OF_CASE[case]
    plan = dispatch(ids, E, backend=backend)
    assert_same_plan(plan, reference.dispatch(ids, E))
    check_invariants(plan, ids, E)


@pytest.mark.parametrize("T,K,E", [
    (387, 2, 7),  # 774 slots: three full GPU blocks and a partial fourth; prime E
    (300, 3, 257),  # several blocks and 512 expert lanes
    (40, 4, 4096),  # the largest E: 4096 lanes in one program
])
def test_dispatch_gpu_blocking_in_interpreter(monkeypatch, T, K, E):
    """The interpreter normally runs bigger blocks with one compare chunk (faster there); the
    GPU's blocking (small blocks, the rank loop over chunks) must give the same plan."""
    if "triton" not in BACKENDS:
        pytest.skip("triton is not installed")
    monkeypatch.setattr(dispatch_kernels, "INTERPRETER_BLOCKING", dispatch_kernels.GPU_BLOCKING)
    ids = torch.randint(0, E, (T, K), dtype=torch.int32)
    assert_same_plan(dispatch(ids, E, backend="triton"), reference.dispatch(ids, E))


def check_invariants(plan, ids_TK, E):
    N = ids_TK.numel()
    ids_N = ids_TK.reshape(-1).long()
    offsets, counts = plan.expert_offsets_E1, plan.tokens_per_expert_E
    row_to_slot, slot_to_row = plan.row_to_slot_N.long(), plan.slot_to_row_N.long()
    assert (offsets.dtype, counts.dtype) == (torch.int64, torch.int32)
    assert plan.row_to_slot_N.dtype == plan.slot_to_row_N.dtype == torch.int32
    assert offsets.shape == (E + 1,) and counts.shape == (E,) and row_to_slot.shape == slot_to_row.shape == (N,)
    # inverse permutations of [0, N)
    assert torch.equal(row_to_slot.sort().values, torch.arange(N))
    assert torch.equal(row_to_slot[slot_to_row], torch.arange(N))
    assert torch.equal(slot_to_row[row_to_slot], torch.arange(N))
    # offsets start at 0, never decrease, end at N, and step by the counts, which are the true counts
    assert offsets[0] == 0 and offsets[-1] == N and bool((offsets.diff() >= 0).all())
    assert torch.equal(offsets.diff(), counts.long())
    assert torch.equal(counts.long(), torch.bincount(ids_N, minlength=E))
    # rows of expert e hold e's slots, in increasing slot order
    expert_of_row = torch.searchsorted(offsets, torch.arange(N), right=True) - 1
    assert torch.equal(ids_N[row_to_slot], expert_of_row)
    same_expert = expert_of_row[1:] == expert_of_row[:-1]
    assert bool((row_to_slot[1:] > row_to_slot[:-1])[same_expert].all())


@st.composite
def routings(draw):
    T, K, E = draw(st.integers(0, 40)), draw(st.integers(1, 6)), draw(st.integers(1, 300))
    ids = draw(st.lists(st.integers(0, E - 1), min_size=T * K, max_size=T * K))
    dtype = draw(st.sampled_from([torch.int32, torch.int64]))
    return torch.tensor(ids, dtype=dtype).reshape(T, K), E


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=30, deadline=None)
@given(routing=routings())
def test_dispatch_invariants(backend, routing):
    ids, E = routing
    check_invariants(dispatch(ids, E, backend=backend), ids, E)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dispatch_is_deterministic(backend):
    ids = torch.randint(0, 9, (500, 2), dtype=torch.int32)
    first, second = dispatch(ids, 9, backend=backend), dispatch(ids, 9, backend=backend)
    assert_same_plan(first, second)


def test_dispatch_opcheck():
    if "triton" not in BACKENDS:
        pytest.skip("triton is not installed")
    for ids in (torch.randint(0, 5, (9, 2), dtype=torch.int32), torch.zeros((0, 3), dtype=torch.int64)):
        torch.library.opcheck(torch.ops.finteam.dispatch.default, (ids, 5, False, "triton"))


def test_dispatch_errors():
    ids = torch.randint(0, 4, (5, 2), dtype=torch.int32)
    with pytest.raises(TypeError, match=r"dispatch: topk_ids_TK must be int32 or int64; got .*float32"):
        dispatch(ids.float(), 4)
    with pytest.raises(ValueError, match=r"dispatch: topk_ids_TK must be a 2-D tensor \[T, K\]; got a 1-D"):
        dispatch(ids.reshape(-1), 4)
    with pytest.raises(ValueError, match=r"dispatch: num_experts must be >= 1; got 0"):
        dispatch(ids, 0)
    with pytest.raises(TypeError, match=r"dispatch: num_experts must be an int; got 4.0"):
        dispatch(ids, 4.0)
    with pytest.raises(ValueError, match=r"dispatch: topk_ids_TK must hold expert ids in \[0, 3\); got ids from 0 to 3"):
        dispatch(torch.tensor([[0, 3]]), 3)
    with pytest.raises(ValueError, match=r"dispatch: topk_ids_TK must hold expert ids in \[0, 4\); got ids from -1"):
        dispatch(torch.tensor([[-1, 2]]), 4)
    # 2**31 slots without allocating them: a broadcast view
    huge = torch.zeros((1, 1), dtype=torch.int32).expand(2**16, 2**15)
    with pytest.raises(ValueError, match=r"dispatch: topk_ids_TK must route at most 2\*\*31 - 1 rows .* got T\*K = 2147483648"):
        dispatch(huge, 4)
    if "triton" in BACKENDS:
        with pytest.raises(ValueError, match=r"dispatch: num_experts must be in \[1, 4096\] for the triton backend; got 4097"):
            dispatch(ids, 4097, backend="triton")
