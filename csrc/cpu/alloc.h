// Large buffers on transparent huge pages.
//
// glibc serves an allocation of 32 MiB or more (its largest mmap threshold) with a fresh mmap
// every time, so every 4 KiB page of it faults and is zero-filled by the kernel on first touch:
// 12 ms for 32 MiB and 35 ms for the 117 MiB weight gradient of a Mixtral-shaped layer's experts
// (8 x 7168 x 1024 bf16) on a 2-core AMD EPYC, where writing it again costs 4-5 ms. That is a
// third of such an expert backward. Advised as huge pages the kernel faults 2 MiB at a time,
// and the first touch costs about twice a rewrite (11.5 ms, same buffer). Smaller buffers come
// back from glibc's heap already touched, and keep the default allocator.
#pragma once

#include "common.h"

namespace finteam::cpu {

// An uninitialised tensor of `sizes` (contiguous); at or above kLargeBytes, in 2 MiB-aligned
// memory advised as huge pages (where the kernel allows them; 4 KiB pages otherwise).
at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& options);

constexpr int64_t kLargeBytes = int64_t{32} << 20;

}  // namespace finteam::cpu
