// Buffers of 256 KiB or more, kept for reuse.
//
// glibc serves an allocation of 32 MiB or more (its largest mmap threshold) with a fresh mmap
// every time, so each 4 KiB page of it faults and is zero-filled by the kernel on first touch,
// on every call. On a 2-core AMD EPYC: 12 ms for 32 MiB where rewriting it costs 0.9 ms, and 35
// of the 140 ms of a Mixtral-shaped experts' backward (bf16, 8 x 7168 x 1024 weight gradient).
// Smaller ones fault too, less predictably: glibc trims the top of its heap when more than twice
// its current mmap threshold is free there, and maps again what it gave back. The tiny team's
// experts (fp32, 2048 routed rows, buffers of 1-4 MiB) met 190-650 page faults per forward and
// backward from ATen's allocator; their gated unit's backward ran at half speed where its rows
// faulted in. The library's outputs and scratch of kLargeBytes or more (weight gradients,
// permuted rows, the experts' h and their backward's buffers) come instead from blocks freed by
// earlier calls, which a training loop asks for again at the same sizes every step; none fault
// after the first step. The blocks are mapped from the kernel, not taken from glibc's heap,
// where cached blocks would move and trim the process's other buffers (benchmarks/cpu_backend.py's
// tiny training case timed transformers' experts, in the same process as ours, at 14.4-14.9 ms
// with our blocks in the heap and 12.4-12.9 ms with them mapped).
// Smaller buffers keep ATen's allocator. (Advising fresh blocks as huge pages instead made the
// faults cheap on average but stalled some calls for over 100 ms.)
//
// FINTEAM_CPU_CACHE_MB (read once; default 1024) caps the bytes of free blocks kept; 0 keeps
// none. Blocks in use are reported to PyTorch's memory profiler like ATen's own.
#pragma once

#include "common.h"

namespace finteam::cpu {

constexpr int64_t kLargeBytes = int64_t{256} << 10;

// An uninitialised contiguous tensor of `sizes`: from the cache at or above kLargeBytes, from
// ATen's allocator below.
at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& options);

}  // namespace finteam::cpu
