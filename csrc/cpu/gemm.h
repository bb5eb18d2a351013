// The GEMMs of experts with many rows: ATen's, or on a CPU without native 16-bit GEMMs its fp32
// GEMM on operands widened once.
//
// On an AVX2 CPU (no AVX-512: AMD Zen 2/3, Intel before Skylake-SP) ATen's bf16 and fp16 GEMMs
// run at a fraction of its fp32 GEMM (measured 6x slower on a 2-core AMD EPYC): they convert
// inside the inner loop. Widening the operands once (2 bytes read and 4 written per element,
// memory-bound and small next to the GEMM's M*N*K FMAs) and rounding the fp32 product once, as
// the 16-bit GEMM does with its fp32 accumulator, gives the same result up to summation order.
#pragma once

#include "common.h"

namespace finteam::cpu {

// out = a @ b (2-D views, out with dense rows), in out's dtype.
void gemm_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b);

}  // namespace finteam::cpu
