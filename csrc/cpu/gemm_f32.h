// A small fp32 GEMM on AVX-512 registers, for the chunked backward (chunks_f32.h) where the BLAS
// runs narrower code than the CPU has: MKL takes its AVX2 kernels on AMD CPUs, half the FMA rate
// of a Zen 5 core's AVX-512 (ATen's fp32 GEMM at 0.21 TFLOP/s on a 2-core Zen 5 EPYC, against
// 0.8-0.9 for its bf16 GEMM, which oneDNN runs at twice the fp32 rate).
//
// Register blocks of 12 rows of C by 32 columns (24 accumulators): per step of the reduction two
// vectors of a row of B and a broadcast of each of the 12 elements of A. B is read in place
// (row-major), and so is A, by rows or (a_t) by columns.
#pragma once

#include "common.h"

namespace finteam::cpu {

// Whether gemm_f32 runs: an AVX-512 CPU not made by Intel (where MKL, the BLAS of the x86 torch
// wheels, runs AVX2 code), and FINTEAM_CPU_GEMM_F32 is not 0 (read once; 0 keeps the BLAS).
bool gemm_f32_enabled();

// C[M, N] = op(A)[M, K] @ B[K, N], row-major, on the calling thread; op(A)[m][k] is A[m * lda + k],
// or A[k * lda + m] with a_t. C is overwritten.
void gemm_f32(bool a_t, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
              float* C, int64_t ldc);

}  // namespace finteam::cpu
