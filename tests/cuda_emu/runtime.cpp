// The CPU stand-in's runtime (see emu.h): grids, barriers, warp exchange, the few CUDA runtime
// calls the kernel files make, and C entry points for ctypes, one per function of kernels.h.
#include <barrier>
#include <memory>
#include <thread>
#include <vector>

#include "kernels.h"

namespace finteam_emu {
namespace {

constexpr size_t kMaxDynamicShared = 48 * 1024;

struct Warp {
  explicit Warp(int lanes) : barrier(lanes) {}
  std::barrier<> barrier;
  uint64_t slots[32] = {};
};

struct Block {
  explicit Block(int threads) : barrier(threads) {}
  std::barrier<> barrier;
  std::vector<std::unique_ptr<Warp>> warps;
  std::vector<unsigned char> shared;
};

thread_local ThreadContext t_context;
thread_local Block* t_block = nullptr;
cudaError_t g_last_error = cudaSuccess;

unsigned linear_thread() {
  const ThreadContext& c = t_context;
  return c.thread_idx.x + c.block_dim.x * (c.thread_idx.y + c.block_dim.y * c.thread_idx.z);
}

Warp& my_warp() { return *t_block->warps[linear_thread() / 32]; }

}  // namespace

ThreadContext& ctx() { return t_context; }

void sync_threads() { t_block->barrier.arrive_and_wait(); }

void sync_warp() { my_warp().barrier.arrive_and_wait(); }

uint64_t warp_exchange(uint64_t value, int source_lane) {
  Warp& warp = my_warp();
  warp.slots[linear_thread() % 32] = value;
  warp.barrier.arrive_and_wait();
  const uint64_t got = warp.slots[source_lane];
  warp.barrier.arrive_and_wait();
  return got;
}

uint64_t warp_gather(uint64_t value, uint64_t* all) {
  Warp& warp = my_warp();
  warp.slots[linear_thread() % 32] = value;
  warp.barrier.arrive_and_wait();
  std::memcpy(all, warp.slots, sizeof(warp.slots));
  warp.barrier.arrive_and_wait();
  return value;
}

void* dynamic_shared() { return t_block->shared.data(); }

void run_grid(const Config& config, const std::function<void()>& body) {
  const dim3 g = config.grid, b = config.block;
  const unsigned threads = b.x * b.y * b.z;
  if (threads == 0 || threads > 1024 || g.x == 0 || g.y == 0 || g.z == 0 || g.y > 65535 || g.z > 65535 ||
      config.shared_bytes > kMaxDynamicShared) {
    g_last_error = cudaErrorInvalidConfiguration;
    return;
  }
  for (unsigned bz = 0; bz < g.z; ++bz)
    for (unsigned by = 0; by < g.y; ++by)
      for (unsigned bx = 0; bx < g.x; ++bx) {
        Block block(static_cast<int>(threads));
        for (unsigned w = 0; w < (threads + 31) / 32; ++w)
          block.warps.push_back(std::make_unique<Warp>(static_cast<int>(std::min(32u, threads - 32 * w))));
        block.shared.assign(config.shared_bytes + 16, 0xff);  // NaN in every float: unwritten reads show
        std::vector<std::thread> pool;
        pool.reserve(threads);
        for (unsigned t = 0; t < threads; ++t)
          pool.emplace_back([&, t] {
            t_context = {{t % b.x, (t / b.x) % b.y, t / (b.x * b.y)}, {bx, by, bz}, b, g};
            t_block = &block;
            body();
            my_warp().barrier.arrive_and_drop();  // an exited thread leaves the barriers, as on a GPU
            block.barrier.arrive_and_drop();
          });
        for (std::thread& thread : pool) thread.join();
      }
}

}  // namespace finteam_emu

extern "C" {

cudaError_t cudaGetLastError() {
  const cudaError_t err = finteam_emu::g_last_error;
  finteam_emu::g_last_error = cudaSuccess;
  return err;
}

cudaError_t cudaMemsetAsync(void* ptr, int value, size_t count, cudaStream_t) {
  std::memset(ptr, value, count);
  return cudaSuccess;
}

}  // extern "C"

// C entry points: enums travel as ints (DType F32=0 F16=1 BF16=2; IdType I32=0 I64=1; Score
// Softmax=0 Sigmoid=1; Act SiLU=0 GeLU=1 GeLUTanh=2); every call runs on the null stream.
using finteam::Act;
using finteam::DType;
using finteam::IdType;
using finteam::Score;

extern "C" {

int emu_topk_gating_fwd(const void* logits, int dtype, int64_t st, int64_t se, const float* bias, int64_t T,
                        int64_t E, int64_t K, int score, int renormalize, int64_t groups, int64_t topk_groups,
                        float scaling, float* weights, int32_t* ids, int32_t* counts) {
  return finteam::topk_gating_fwd(logits, DType(dtype), st, se, bias, T, E, K, Score(score), renormalize, groups,
                                  topk_groups, scaling, weights, ids, counts, nullptr);
}

int emu_topk_gating_bwd(const float* grad, int64_t sgt, int64_t sgk, const void* logits, int dtype, int64_t st,
                        int64_t se, const int32_t* ids, int64_t T, int64_t E, int64_t K, int score, int renormalize,
                        float scaling, void* grad_logits) {
  return finteam::topk_gating_bwd(grad, sgt, sgk, logits, DType(dtype), st, se, ids, T, E, K, Score(score),
                                  renormalize, scaling, grad_logits, nullptr);
}

int64_t emu_router_losses_scratch_bytes(int64_t T, int64_t E) {
  return static_cast<int64_t>(finteam::router_losses_scratch_bytes(T, E));
}

int emu_router_losses_fwd(const void* logits, int dtype, int64_t st, int64_t se, const void* ids, int id_type,
                          int64_t T, int64_t E, int64_t K, void* scratch, float* aux, float* z) {
  return finteam::router_losses_fwd(logits, DType(dtype), st, se, ids, IdType(id_type), T, E, K, scratch, aux, z,
                                    nullptr);
}

int emu_router_losses_bwd(const float* grad_aux, const float* grad_z, const void* logits, int dtype, int64_t st,
                          int64_t se, const void* ids, int id_type, int64_t T, int64_t E, int64_t K, void* scratch,
                          void* grad_logits) {
  return finteam::router_losses_bwd(grad_aux, grad_z, logits, DType(dtype), st, se, ids, IdType(id_type), T, E, K,
                                    scratch, grad_logits, nullptr);
}

int64_t emu_dispatch_scratch_bytes(int64_t N, int64_t E) {
  return static_cast<int64_t>(finteam::dispatch_scratch_bytes(N, E));
}

int emu_dispatch_fwd(const void* ids, int id_type, int64_t N, int64_t E, void* scratch, int64_t* offsets,
                     int32_t* counts, int32_t* row_to_slot, int32_t* slot_to_row) {
  return finteam::dispatch_fwd(ids, IdType(id_type), N, E, scratch, offsets, counts, row_to_slot, slot_to_row,
                               nullptr);
}

int emu_gather_rows(const void* src, int dtype, int64_t sr, int64_t sc, const int32_t* index, int64_t div,
                    const float* scale, int64_t rows, int64_t H, void* out) {
  return finteam::gather_rows(src, DType(dtype), sr, sc, index, div, scale, rows, H, out, nullptr);
}

int emu_combine_rows(const void* src, int dtype, int64_t sr, int64_t sc, const int32_t* index, const float* weight,
                     int64_t T, int64_t K, int64_t H, void* out) {
  return finteam::combine_rows(src, DType(dtype), sr, sc, index, weight, T, K, H, out, nullptr);
}

int emu_row_dots(const void* a, int64_t sar, int64_t sac, const void* b, int64_t sbr, int64_t sbc, int dtype,
                 const int32_t* index, int64_t T, int64_t K, int64_t H, float* dot) {
  return finteam::row_dots(a, sar, sac, b, sbr, sbc, DType(dtype), index, T, K, H, dot, nullptr);
}

int emu_grouped_gemm_fwd(const void* x, const void* w, const int64_t* offsets, int dtype, int64_t N, int64_t D,
                         int64_t O, int64_t E, void* y) {
  return finteam::grouped_gemm_fwd(x, w, offsets, DType(dtype), N, D, O, E, y, nullptr);
}

int emu_grouped_gemm_dx(const void* grad, const void* w, const int64_t* offsets, int dtype, int64_t N, int64_t D,
                        int64_t O, int64_t E, int out_f32, void* grad_x) {
  return finteam::grouped_gemm_dx(grad, w, offsets, DType(dtype), N, D, O, E, out_f32, grad_x, nullptr);
}

int emu_grouped_gemm_dw(const void* grad, const void* x, const int64_t* offsets, int dtype, int64_t N, int64_t D,
                        int64_t O, int64_t E, void* grad_w) {
  return finteam::grouped_gemm_dw(grad, x, offsets, DType(dtype), N, D, O, E, grad_w, nullptr);
}

int emu_glu_fwd(const void* h, int dtype, int64_t N, int64_t I, int act, const float* scale,
                const int32_t* row_to_slot, void* a) {
  return finteam::glu_fwd(h, DType(dtype), N, I, Act(act), scale, row_to_slot, a, nullptr);
}

int emu_glu_bwd(const float* da, const void* h, int dtype, int64_t N, int64_t I, int act, const float* weight,
                const int32_t* row_to_slot, void* grad_h, float* grad_weight) {
  return finteam::glu_bwd(da, h, DType(dtype), N, I, Act(act), weight, row_to_slot, grad_h, grad_weight, nullptr);
}

}  // extern "C"
