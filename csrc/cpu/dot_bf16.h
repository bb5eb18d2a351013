// Small-batch bf16 GEMM for weights streamed from memory (decode-sized batches of an expert).
//
// Shape legend: D the reduction width, O output rows of the weight, M the batch rows.
#pragma once

#include <vector>

#include "common.h"

namespace finteam::cpu {

// The kernel that streams bf16 weights here, chosen once when the library loads:
//   "amx"        AMX-BF16 tiles (dot_amx.h), where the CPU has them and the OS grants them
//   "vdpbf16ps"  AVX512-BF16 dot products (AVX512-BF16 CPUs without AMX, e.g. AMD Zen 4/5)
//   "fma"        AVX-512 FMAs on weights widened to fp32: AVX-512 CPUs without AVX512-BF16,
//                and AMX CPUs where the tiles are not granted (their vdpbf16ps is slow)
//   "avx2"       the same on 256-bit registers: AVX2 CPUs without AVX-512 (e.g. AMD Zen 2/3)
//   ""           none (no AVX2): callers use ATen's GEMM instead
// FINTEAM_CPU_STREAMING=vdpbf16ps|fma|avx2 picks another kernel the CPU can run (to test each),
// FINTEAM_CPU_STREAMING=none none.
const char* streaming_kernel();
inline bool skinny_gemm_available() { return streaming_kernel()[0] != '\0'; }

// Batches of up to this many rows the vdpbf16ps kernel reads one weight row at a time (one
// memory stream), larger ones in tiles of 4 weight rows; the same bits either way. Chosen per CPU
// (see DotTile::row_by_row_rows); FINTEAM_CPU_ROW_BY_ROW=0..5 sets it. 0 for the other kernels.
int64_t row_by_row_rows();

// Rows per expert up to which skinny_gemm_bf16 beats ATen's GEMM: 32 for the fma and avx2
// kernels (beyond, their FMA rate binds); 96 for vdpbf16ps (on a 2-core AMD EPYC, Zen 4, with a
// Mixtral-shaped layer timed interleaved: 13-20% faster than oneDNN at 48-64 rows, 3% at 96;
// even at 128 and 7-13% slower from 192 in separate runs); 1024 for amx, whose tiles keep a
// task's block of weight rows in L2 while the whole batch passes over it (measured against oneDNN's AMX GEMM on a Xeon:
// faster from 128 rows to 2048 tokens of a Mixtral-shaped layer; beyond, the packed batch
// outgrows the caches).
int64_t skinny_max_rows();

class SkinnyRows;

// out[m * ldo + (o - o0)] = sum_{d < D} x[m][d] * w[o * ldw + d], for o in [o0, o1) and
// m in [0, x.size()), accumulated in fp32. Single-threaded: callers split the rows o.
void skinny_gemm_bf16(const c10::BFloat16* w, int64_t ldw, int64_t D, int64_t o0, int64_t o1, const SkinnyRows& x,
                      float* out, int64_t ldo);

// The batch rows of one expert (at most skinny_max_rows(), each D wide), prepared once for every
// weight row they meet: read in place by the vdpbf16ps kernel, widened to fp32 for the fma and
// avx2 ones, packed into tiles for the amx one. `whole_tiles`: every block of weight rows the
// caller will pass has a multiple of 16 rows (then the amx kernel needs no fma layout for leftover rows).
class SkinnyRows {
 public:
  SkinnyRows(const c10::BFloat16* const* rows, int64_t M, int64_t D, bool whole_tiles);
  int64_t size() const { return M_; }

 private:
  friend void skinny_gemm_bf16(const c10::BFloat16*, int64_t, int64_t, int64_t, int64_t, const SkinnyRows&, float*,
                               int64_t);
  int64_t M_, stride_;
  std::vector<const c10::BFloat16*> rows_;
  std::vector<float> wide_;  // M rows of `stride_` floats: each 32-block (16 for avx2) as its even, then odd elements
  std::vector<uint16_t> tiles_;  // amx::pack's layout (when D is a multiple of 32)
};

}  // namespace finteam::cpu
