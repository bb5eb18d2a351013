// Large buffers, kept for reuse.
//
// glibc serves an allocation of 32 MiB or more (its largest mmap threshold) with a fresh mmap
// every time, so each 4 KiB page of it faults and is zero-filled by the kernel on first touch,
// on every call. On a 2-core AMD EPYC: 12 ms for 32 MiB where rewriting it costs 0.9 ms, and 35
// of the 140 ms of a Mixtral-shaped experts' backward (bf16, 8 x 7168 x 1024 weight gradient).
// The library's large outputs and scratch (the experts' weight gradients, permuted rows) come
// instead from blocks freed by earlier calls, which a training loop asks for again at the same
// sizes every step. Smaller buffers come back from glibc's heap already touched and keep ATen's
// allocator. (Advising the fresh blocks as huge pages instead made the faults cheap on average
// but stalled some calls for over 100 ms.)
//
// FINTEAM_CPU_CACHE_MB (read once; default 1024) caps the bytes of free blocks kept; 0 keeps
// none. Blocks in use are reported to PyTorch's memory profiler like ATen's own.
#pragma once

#include "common.h"

namespace finteam::cpu {

constexpr int64_t kLargeBytes = int64_t{32} << 20;

// An uninitialised contiguous tensor of `sizes`: from the cache at or above kLargeBytes, from
// ATen's allocator below.
at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& options);

}  // namespace finteam::cpu
