// See chunks_f32.h.
#include "chunks_f32.h"

#include <dlfcn.h>

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <string>

#include "gemm_f32.h"
#include "grad_rows.h"
#include "rows.h"

namespace finteam::cpu {
namespace {

// A chunk of 128 rows: the tiny team's shape (H=128, I=256) keeps x, h, act and y of a chunk in
// 448 KB, within one core's L2 (1 MB on Zen 4, 2 MB on Sapphire Rapids).
constexpr int64_t kChunkRows = 128;
// Experts whose weights take more than this run faster through ATen's GEMMs (chunks_f32.h), where
// the chunks' GEMMs are the BLAS's. With gemm_f32 (which packs nothing) they win at every size
// measured: forward (tiled) and backward of the op on a 2-core AMD EPYC (Zen 5), ATen's time over
// the chunks', 1.52x at H=256 I=512 (1.5 MiB an expert), 1.38x at H=512 I=1024 (6 MiB), 1.10-1.18x
// at H=1024 I=2816 (33 MiB); so no limit there.
constexpr int64_t kMaxExpertBytes = int64_t{1} << 20;
// A weight-gradient task writes this many of its rows (a reduction over all the expert's rows).
// Through the BLAS each task packs the expert's rows of its other operand again, so fewer and
// larger tasks do better while the threads stay busy: pass 2 at the tiny team's shape (2-core AMD
// EPYC, MKL's GEMM) took 2.83 ms with 64 rows, 2.75 with 128, 2.62 with 256 or 512. gemm_f32 packs
// nothing, and there smaller tasks share the pass out more evenly (the tiny team's 3 experts give
// 9 tasks of 256 rows, 30 of 64): the op's forward and backward at that shape on a 2-core AMD EPYC
// (Zen 4), interleaved with 256 rows, took 0.969-0.981 of the time with 64 (32: 0.992, 96: 0.989,
// 128: 0.995, 512: 1.033), the same bits.
int64_t grad_rows_per_task() { return gemm_f32_enabled() ? 64 : 256; }

// The Fortran BLAS interface: column-major, 32-bit sizes.
using Sgemm = void (*)(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                       const int*, const float*, const int*, const float*, float*, const int*);

Sgemm sgemm() {
  static const Sgemm f = reinterpret_cast<Sgemm>(dlsym(RTLD_DEFAULT, "sgemm_"));
  return f;
}

// Keeps MKL's GEMM on the calling thread for a task's lifetime, whatever runs the parallel region
// (inside an OpenMP one it would anyway; not under other thread pools). Nothing where the BLAS
// is not MKL.
class OneBlasThread {
 public:
  OneBlasThread() : previous_(set_local() != nullptr ? set_local()(1) : 0) {}
  ~OneBlasThread() {
    if (set_local() != nullptr) set_local()(previous_);
  }

 private:
  using SetLocal = int (*)(int);
  // MKL's C name (mkl_service.h maps mkl_set_num_threads_local to it); the lower-case symbol is
  // the Fortran entry, which takes a pointer.
  static SetLocal set_local() {
    static const SetLocal f = reinterpret_cast<SetLocal>(dlsym(RTLD_DEFAULT, "MKL_Set_Num_Threads_Local"));
    return f;
  }
  int previous_;
};

// Row-major C[M, N] = op(A) @ op(B) on this thread: the column-major BLAS computes C^T =
// op(B)^T @ op(A)^T on the same memory. a_t / b_t: A / B are stored as their transposes' rows.
void gemm_rows(bool a_t, bool b_t, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
               int64_t ldb, float* C, int64_t ldc) {
  // B untransposed: the backward's four GEMMs (the forward's take W^T, and the tiles where gemm_f32 runs).
  if (!b_t && gemm_f32_enabled()) return gemm_f32(a_t, M, N, K, A, lda, B, ldb, C, ldc);
  const char ta = b_t ? 'T' : 'N', tb = a_t ? 'T' : 'N';
  const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
  const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
  const float one = 1, zero = 0;
  sgemm()(&ta, &tb, &m, &n, &k, &one, B, &la, A, &lb, &zero, C, &lc);
}

// The tasks of one pass: (expert, first row), every chunk of every expert.
std::vector<std::pair<int64_t, int64_t>> chunks(const std::vector<int64_t>& offsets,
                                                const std::vector<int64_t>& experts) {
  std::vector<std::pair<int64_t, int64_t>> tasks;
  for (int64_t e : experts) {
    for (int64_t r = offsets[e]; r < offsets[e + 1]; r += kChunkRows) tasks.emplace_back(e, r);
  }
  return tasks;
}

// Rows r0..r1 of x (stride ldx) in expert order, into dense rows of H at `out`.
void gather(const float* x, int64_t ldx, const int32_t* row_to_slot, int64_t K, int64_t H, int64_t r0, int64_t r1,
            float* out) {
  constexpr int64_t f = sizeof(float);
  gather_rows_serial(x, ldx * f, row_to_slot, K, H * f, r0, r1, out, H * f);
}

}  // namespace

bool chunks_f32_enabled() {
  static const bool on = [] {
    const char* v = std::getenv("FINTEAM_CPU_CHUNKS");
    return (v == nullptr || std::string(v) != "0") && sgemm() != nullptr;
  }();
  return on;
}

bool chunks_f32_available(int64_t N, int64_t H, int64_t I) {
  const int64_t weight_bytes = 3 * H * I * static_cast<int64_t>(sizeof(float));
  return chunks_f32_enabled() && H > 0 && I > 0 && (weight_bytes <= kMaxExpertBytes || gemm_f32_enabled()) &&
         std::max({N, H, 2 * I}) < std::numeric_limits<int>::max();
}

void chunked_forward_f32(const float* x, int64_t ldx, const int32_t* row_to_slot, int64_t K, const float* w_gate_up,
                         const float* w_down, int64_t H, int64_t I, Activation act,
                         const std::vector<int64_t>& offsets, const std::vector<int64_t>& experts, float* h,
                         float* y) {
  const auto tasks = chunks(offsets, experts);
  parallel_tasks(
      static_cast<int64_t>(tasks.size()), [&] { return std::vector<float>(kChunkRows * (H + I)); },
      [&](int64_t task, std::vector<float>& scratch) {
        const OneBlasThread one;
        const auto [e, r0] = tasks[task];
        const int64_t r1 = std::min(offsets[e + 1], r0 + kChunkRows), m = r1 - r0;
        float* x_rows = scratch.data();
        float* a = x_rows + kChunkRows * H;
        gather(x, ldx, row_to_slot, K, H, r0, r1, x_rows);
        float* h_rows = h + r0 * 2 * I;
        gemm_rows(false, true, m, 2 * I, H, x_rows, H, w_gate_up + e * 2 * I * H, H, h_rows, 2 * I);
        for (int64_t r = 0; r < m; ++r) glu_f32(h_rows + r * 2 * I, h_rows + r * 2 * I + I, I, act, a + r * I);
        gemm_rows(false, true, m, H, I, a, I, w_down + e * H * I, I, y + r0 * H, H);
      });
}

void chunked_backward_f32(const float* grad, int64_t ldg, const float* x, int64_t ldx, const float* w,
                          const int32_t* row_to_slot, int64_t K, const float* w_gate_up, const float* w_down,
                          const float* h, int64_t H, int64_t I, Activation act, const std::vector<int64_t>& offsets,
                          const std::vector<int64_t>& experts, const ChunkGrads& out) {
  // Pass 1, by chunks: dout and x gathered, g = dout @ W_down[e], the gated unit's backward (which
  // also gives the routing weights' gradients), dout scaled by the weights, dx = dh @ W_gate_up[e].
  const auto tasks = chunks(offsets, experts);
  parallel_tasks(
      static_cast<int64_t>(tasks.size()), [] { return 0; },
      [&](int64_t task, int) {
        const OneBlasThread one;
        const auto [e, r0] = tasks[task];
        const int64_t r1 = std::min(offsets[e + 1], r0 + kChunkRows), m = r1 - r0;
        gather(grad, ldg, row_to_slot, K, H, r0, r1, out.dout_NH + r0 * H);
        gather(x, ldx, row_to_slot, K, H, r0, r1, out.x_NH + r0 * H);
        gemm_rows(false, false, m, I, H, out.dout_NH + r0 * H, H, w_down + e * H * I, I, out.g_NI + r0 * I, I);
        expert_grad_rows<float>(act, h, out.g_NI, row_to_slot, w, I, r0, r1, out.a_NI, out.dh_N2I, out.grad_w_TK);
        scale_rows<float>(out.dout_NH, H, row_to_slot, w, r0, r1);
        gemm_rows(false, false, m, H, 2 * I, out.dh_N2I + r0 * 2 * I, 2 * I, w_gate_up + e * 2 * I * H, H,
                  out.dx_NH + r0 * H, H);
      });
  // Pass 2, by blocks of weight-gradient rows, each a sum over all the expert's rows:
  // dW_down = dout_w^T @ act, dW_gate_up = dh^T @ x.
  const int64_t B = grad_rows_per_task(), down = (H + B - 1) / B, gate_up = (2 * I + B - 1) / B;
  parallel_tasks(
      static_cast<int64_t>(experts.size()) * (down + gate_up), [] { return 0; },
      [&](int64_t task, int) {
        const OneBlasThread one;
        const int64_t e = experts[task / (down + gate_up)], k = task % (down + gate_up);
        const int64_t first = offsets[e], M = offsets[e + 1] - first;
        if (k < down) {
          const int64_t p0 = k * B, p1 = std::min(H, p0 + B);
          gemm_rows(true, false, p1 - p0, I, M, out.dout_NH + first * H + p0, H, out.a_NI + first * I, I,
                    out.grad_w_down + (e * H + p0) * I, I);
        } else {
          const int64_t p0 = (k - down) * B, p1 = std::min(2 * I, p0 + B);
          gemm_rows(true, false, p1 - p0, H, M, out.dh_N2I + first * 2 * I + p0, 2 * I, out.x_NH + first * H, H,
                    out.grad_w_gate_up + (e * 2 * I + p0) * H, H);
        }
      });
}

}  // namespace finteam::cpu
