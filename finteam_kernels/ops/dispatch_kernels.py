"""Triton kernels of dispatch: a stable counting sort of the T*K routed slots by expert.

Shape legend: T tokens, E experts, K top-k, N = T*K routed slots (and rows); B = cdiv(N, BLOCK_N)
blocks of consecutive slots.

The sort is the classic one-digit radix sort (a block histogram, a scan, a scatter), so it never
synchronises with the host and every buffer is sized by N and E alone:

  1. `_count_kernel`  one program per block: hist_BE[b, e] = slots of block b routed to e.
  2. `_scan_kernel`   one program per chunk of experts: hist_BE[b, e] becomes the exclusive
                      prefix over blocks (slots of e in blocks before b), and the column total is
                      tokens_per_expert_E[e].
  3. `_place_kernel`  one program per block: the slot at position i of block b, routed to e, goes
                      to row offsets[e] + prefix[b, e] + (earlier slots of the block routed to e),
                      which keeps slot order inside each expert (stable, hence deterministic).

Fewer launches where they can be spared, since at decode sizes each launch costs more than its
work (`Prefix` says which way a launch takes):
  - one block (N <= BLOCK_N): the place kernel alone; it counts the block itself unless the
    counts are given (topk_gating's, for the same ids).
  - a few blocks and the counts given: count, then place, each block adding up the histograms
    of the blocks before it (B*E reads per block) instead of a scan launch.
  - otherwise all three.

Expert ids index a vector of E_PAD = a power of two >= E lanes, so E is bounded by what one
program holds (MAX_EXPERTS). Padding slots past N in the last block, and ids outside [0, E)
(which the op refuses before launching; a kernel must still never write out of bounds because
of one), are counted nowhere and never stored.
"""
from typing import NamedTuple

import triton
import triton.language as tl

MAX_EXPERTS = 4096
SCAN_BLOCK_B = 64
SCAN_BLOCK_E = 32
# Up to this many blocks, the place kernel adds up the histograms of the blocks before its own
# (at most this many rows of E counts, from L2) rather than waiting on a scan launch.
SUM_MAX_BLOCKS = 32
SUM_TILE = 2048  # counts a program adds at once: [SUM_TILE // E_PAD, E_PAD] (4096 spills at E_PAD 2048)


class Prefix:
    """How `_place_kernel` learns how many slots of each expert come before its block."""

    NONE = 0  # one block: none do
    SUM = 1  # prefix_ptr is `_count_kernel`'s hist_BE: add up the rows of the earlier blocks
    SCANNED = 2  # prefix_ptr is `_scan_kernel`'s output: row b is the prefix


class Blocking(NamedTuple):
    block_n: int  # slots per block: the rank costs BLOCK_N compares per slot, the table E/BLOCK_N per slot
    rank_chunk: int  # slots compared at once: a [BLOCK_N, RANK_CHUNK] tile in registers
    num_warps: int


GPU_BLOCKING = Blocking(256, 32, 8)  # 99 to 158 registers up to E_PAD = 4096, no spills
# The interpreter pays per operation, not per element: whole-block compares on bigger blocks run
# it several times faster. Tests also run GPU_BLOCKING, so both are checked.
INTERPRETER_BLOCKING = Blocking(512, 512, 8)


def sum_rows(e_pad: int) -> int:
    """Rows of the histogram that `_earlier_blocks` adds at once."""
    return max(1, SUM_TILE // e_pad)


# (PREFIX, COUNT) pairs the launcher uses: counting only where one block sees every slot
PLACE_VARIANTS = ((Prefix.NONE, True), (Prefix.NONE, False), (Prefix.SUM, False), (Prefix.SCANNED, False))


def expert_lanes(num_experts: int) -> int:
    """E_PAD: the power of two of lanes a program uses for the experts (at least 32, so that few
    variants get compiled)."""
    return max(32, 1 << (num_experts - 1).bit_length())


@triton.jit
def _block_ids(ids_ptr, block, N, E, BLOCK_N: tl.constexpr):
    """The expert ids (int32) of the slots of `block` (-1 for padding slots), their positions in
    the block, and which of them are real slots with an id in [0, E)."""
    start = block.to(tl.int64) * BLOCK_N
    local = tl.arange(0, BLOCK_N)
    raw = tl.load(ids_ptr + start + local, mask=start + local < N, other=-1)
    valid = (start + local < N) & (raw >= 0) & (raw < E)
    return tl.where(valid, raw, -1).to(tl.int32), local, valid


@triton.jit
def _histogram(ids, valid, E_PAD: tl.constexpr):
    """Per lane e < E_PAD, how many of the `valid` ids are e."""
    lanes = tl.arange(0, E_PAD)
    return tl.histogram(tl.where(valid, ids, 0), E_PAD) - tl.where(lanes == 0, tl.sum((~valid).to(tl.int32)), 0)


@triton.jit
def _count_kernel(ids_ptr, hist_ptr, N, E, BLOCK_N: tl.constexpr, E_PAD: tl.constexpr):
    """hist_BE[b, e] (int32, [B, E] contiguous) = slots of block b routed to expert e.

    ids: [N] contiguous int32/int64. One read of the ids, one write of B*E counts.
    """
    block = tl.program_id(0)
    ids, _, valid = _block_ids(ids_ptr, block, N, E, BLOCK_N)
    lanes = tl.arange(0, E_PAD)
    tl.store(hist_ptr + block.to(tl.int64) * E + lanes, _histogram(ids, valid, E_PAD), mask=lanes < E)


@triton.jit
def _scan_kernel(hist_ptr, counts_ptr, num_blocks, E, BLOCK_B: tl.constexpr, BLOCK_E: tl.constexpr):
    """In place, per expert e: hist_BE[b, e] -> sum of hist_BE[b', e] over b' < b; and
    counts_E[e] = the sum over all blocks (int32: at most N < 2**31).

    One program per BLOCK_E experts walks down the B blocks in tiles of BLOCK_B, carrying the
    running sum: one read and one write of the B*E table, which is at most N*E/BLOCK_N entries.
    """
    experts = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    carry = tl.zeros([BLOCK_E], dtype=tl.int32)
    for start in range(0, num_blocks, BLOCK_B):
        blocks = start + tl.arange(0, BLOCK_B).to(tl.int64)
        mask = (blocks[:, None] < num_blocks) & (experts[None, :] < E)
        ptrs = hist_ptr + blocks[:, None] * E + experts[None, :]
        tile = tl.load(ptrs, mask=mask, other=0)
        tl.store(ptrs, tl.cumsum(tile, axis=0) - tile + carry[None, :], mask=mask)
        carry += tl.sum(tile, axis=0)
    tl.store(counts_ptr + experts, carry, mask=experts < E)


@triton.jit
def _rank_in_block(ids_ptr, ids, local, start, N, E, BLOCK_N: tl.constexpr, RANK_CHUNK: tl.constexpr):
    """For each slot of the block, how many earlier slots of the block chose the same expert
    (slots with an id outside [0, E) match none).

    Compares the block's ids with RANK_CHUNK of them at a time (re-read from L1): BLOCK_N
    compares per slot, which is why blocks are small; a sort would be O(log^2) per slot but needs
    shuffles and runs two orders of magnitude slower in the interpreter.
    """
    rank = tl.zeros([BLOCK_N], dtype=tl.int32)
    for chunk in range(0, BLOCK_N, RANK_CHUNK):
        others = chunk + tl.arange(0, RANK_CHUNK)
        raw = tl.load(ids_ptr + start + others, mask=start + others < N, other=-1)
        other_ids = tl.where((raw >= 0) & (raw < E), raw, -1).to(tl.int32)
        same = (ids[:, None] == other_ids[None, :]) & (others[None, :] < local[:, None]) & (ids[:, None] >= 0)
        rank += tl.sum(same.to(tl.int32), axis=1)
    return rank


@triton.jit
def _earlier_blocks(hist_ptr, block, E, E_PAD: tl.constexpr, SUM_ROWS: tl.constexpr):
    """Per expert lane, the sum of hist_BE[b', e] over the blocks b' < block."""
    lanes = tl.arange(0, E_PAD)
    total = tl.zeros([E_PAD], dtype=tl.int32)
    for first in range(0, block, SUM_ROWS):
        rows = first + tl.arange(0, SUM_ROWS).to(tl.int64)
        tile = tl.load(hist_ptr + rows[:, None] * E + lanes[None, :],
                       mask=(rows[:, None] < block) & (lanes[None, :] < E), other=0)
        total += tl.sum(tile, axis=0)
    return total


@triton.jit
def _place_kernel(
    ids_ptr, prefix_ptr, counts_ptr, offsets_ptr, row_to_slot_ptr, slot_to_row_ptr,
    N, E, PREFIX: tl.constexpr, COUNT: tl.constexpr, BLOCK_N: tl.constexpr, E_PAD: tl.constexpr,
    RANK_CHUNK: tl.constexpr, SUM_ROWS: tl.constexpr,
):
    """row_to_slot_N[row] = slot and slot_to_row_N[slot] = row for the slots of one block; program
    0 also writes expert_offsets_E1 (int64, starting at 0), and with COUNT (one block, PREFIX =
    NONE) tokens_per_expert_E, counted here; otherwise counts_E is read.

    The slot's row is offsets[e] + prefix[b, e] + its rank among the block's slots of e, the
    prefix as `Prefix` (PREFIX) says. Each program re-derives the expert offsets (a scan over
    E_PAD lanes) rather than waiting on another launch. Cost: BLOCK_N compares per slot, O(E_PAD)
    lane work per block (B*E reads with Prefix.SUM), and 4-byte stores: the slots' contiguous,
    the rows' in runs of one expert. Slots with an id outside [0, E) are not stored.
    """
    block = tl.program_id(0)
    start = block.to(tl.int64) * BLOCK_N
    ids, local, valid = _block_ids(ids_ptr, block, N, E, BLOCK_N)
    lanes = tl.arange(0, E_PAD)
    if COUNT:
        counts = _histogram(ids, valid, E_PAD)
        tl.store(counts_ptr + lanes, counts, mask=lanes < E)
    else:
        counts = tl.load(counts_ptr + lanes, mask=lanes < E, other=0)
    counts = tl.where(lanes < E, counts, 0)
    ends = tl.cumsum(counts, axis=0)
    base = ends - counts
    if PREFIX == 1:
        base += _earlier_blocks(prefix_ptr, block, E, E_PAD, SUM_ROWS)
    if PREFIX == 2:
        base += tl.load(prefix_ptr + block.to(tl.int64) * E + lanes, mask=lanes < E, other=0)
    rows = tl.gather(base, tl.where(valid, ids, 0), 0) + _rank_in_block(
        ids_ptr, ids, local, start, N, E, BLOCK_N, RANK_CHUNK)
    tl.store(slot_to_row_ptr + start + local, rows, mask=valid)
    tl.store(row_to_slot_ptr + rows, (start + local).to(tl.int32), mask=valid)
    if block == 0:
        tl.store(offsets_ptr + 1 + lanes, ends.to(tl.int64), mask=lanes < E)
        tl.store(offsets_ptr, tl.zeros([], dtype=tl.int64))


def aot_specs():
    from ._triton import AotSpec

    block_n, rank_chunk, num_warps = GPU_BLOCKING
    specs = []
    lanes = sorted({expert_lanes(e) for e in range(1, MAX_EXPERTS + 1)})
    # every lane width with int32 ids; int64 ids (a wider load, same code after it) at both ends
    variants = [("i32", e_pad) for e_pad in lanes] + [("i64", lanes[0]), ("i64", lanes[-1])]
    for ids, e_pad in variants:
        specs.append(AotSpec(
            f"dispatch_count[ids={ids},E_PAD={e_pad}]", _count_kernel,
            {"ids_ptr": f"*{ids}", "hist_ptr": "*i32", "N": "i32", "E": "i32",
             "BLOCK_N": "constexpr", "E_PAD": "constexpr"},
            {"BLOCK_N": block_n, "E_PAD": e_pad}, num_warps=num_warps))
        for prefix, count in PLACE_VARIANTS:
            specs.append(AotSpec(
                f"dispatch_place[ids={ids},E_PAD={e_pad},PREFIX={prefix},COUNT={int(count)}]", _place_kernel,
                {"ids_ptr": f"*{ids}", "prefix_ptr": "*i32", "counts_ptr": "*i32", "offsets_ptr": "*i64",
                 "row_to_slot_ptr": "*i32", "slot_to_row_ptr": "*i32", "N": "i32", "E": "i32",
                 "PREFIX": "constexpr", "COUNT": "constexpr", "BLOCK_N": "constexpr", "E_PAD": "constexpr",
                 "RANK_CHUNK": "constexpr", "SUM_ROWS": "constexpr"},
                {"PREFIX": prefix, "COUNT": count, "BLOCK_N": block_n, "E_PAD": e_pad, "RANK_CHUNK": rank_chunk,
                 "SUM_ROWS": sum_rows(e_pad)}, num_warps=num_warps))
    specs.append(AotSpec(
        "dispatch_scan", _scan_kernel,
        {"hist_ptr": "*i32", "counts_ptr": "*i32", "num_blocks": "i32", "E": "i32",
         "BLOCK_B": "constexpr", "BLOCK_E": "constexpr"},
        {"BLOCK_B": SCAN_BLOCK_B, "BLOCK_E": SCAN_BLOCK_E}))
    return specs
