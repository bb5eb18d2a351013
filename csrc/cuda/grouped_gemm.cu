// Grouped GEMM for the experts: forward, dX and dW, with the group boundaries read on the
// device (no host sync, so the whole MoE step can be captured in a CUDA graph).
//
// Shape legend: N routed rows, E experts, D and O the GEMM's input and output widths; rows of
// expert e are offsets[e]:offsets[e+1].
//   forward  y_NO[rows of e]    = x_ND[rows of e] @ w_EOD[e]^T      groups split M
//   dX       grad_x[rows of e]  = grad_NO[rows of e] @ w_EOD[e]     groups split M
//   dW       grad_w[e]          = grad_NO[rows of e]^T @ x_ND[rows of e]   groups split K
//
// One kernel computes C[m, n] = sum_k A[m, k] * B[n, k] for all three. Each operand lives in a
// row-major matrix either with k contiguous ("K-major") or with m/n contiguous; a tile is copied
// as it lies in memory into shared memory, and the tensor-core fragments read it with the
// matching row/column-major layout, so no operand is ever transposed in memory.
//   * fp16/bf16: 128x128x32 block tiles, 8 warps each owning 64x32 of C, WMMA 16x16x16 on
//     tensor cores with fp32 accumulation (sm_80 and later).
//   * fp32: 64x64x16 block tiles, each thread 4x4 outputs with fp32 FMA (no TF32, so results
//     match PyTorch's default fp32 matmul).
// Tiles are double-buffered: the next tile's global loads (16-byte when the matrix allows,
// else per element) are in flight while the current one is multiplied. Out-of-range rows and
// columns are loaded as zeros, so an expert never reads another expert's rows into its sums.
// Cost: operands read once per block tile, C written once; compute-bound for the sizes of
// real experts.
//
// Groups split M: a block per (M tile of some expert, N tile). The grid is sized for the worst
// case, sum_e ceil(n_e / BM) <= N / BM + E + 1, and each block finds its expert by a warp scan of
// the offsets; blocks past the last tile exit. Rows past offsets[E] form one more group that is
// written as zeros. Groups split K: a block per (M tile, N tile, expert); an empty expert's
// block runs no K step and writes exact zeros.
#include <mma.h>

#include "common.cuh"

namespace finteam {
namespace {

constexpr int kThreads = 256;

// Tile shape per element type.
template <typename T>
struct Tiles {
  static constexpr int BM = 128, BN = 128, BK = 32, PAD = 8;
};
template <>
struct Tiles<float> {
  static constexpr int BM = 64, BN = 64, BK = 16, PAD = 4;
};

// Raw bits of one element, so the per-element path copies without converting.
template <typename T>
using Bits = typename std::conditional<sizeof(T) == 2, uint16_t, uint32_t>::type;

// Copies an OUTER x INNER tile of a row-major matrix into shared memory [OUTER][INNER + PAD],
// through registers, zero outside rows [.., row_end) and columns [.., col_end).
template <typename T, int OUTER, int INNER, int PAD>
struct TileCopy {
  static constexpr int VEC = 16 / sizeof(T);
  static constexpr int PER_THREAD = OUTER * INNER / VEC / kThreads;
  static_assert(OUTER * INNER % (VEC * kThreads) == 0, "tile splits evenly over the threads");
  static constexpr int PITCH = INNER + PAD;
  static constexpr int BYTES = OUTER * PITCH * sizeof(T);

  uint4 stage[PER_THREAD];

  __device__ __forceinline__ void load(const T* base, int64_t ld, int64_t row0, int64_t row_end, int64_t col0,
                                       int64_t col_end, bool vec_ok) {
#pragma unroll
    for (int i = 0; i < PER_THREAD; ++i) {
      const int v = threadIdx.x + i * kThreads;
      const int64_t row = row0 + v / (INNER / VEC);
      const int64_t col = col0 + (v % (INNER / VEC)) * VEC;
      const T* p = base + row * ld + col;
      if (vec_ok) {
        stage[i] = row < row_end && col < col_end ? *reinterpret_cast<const uint4*>(p) : make_uint4(0, 0, 0, 0);
      } else {
        Bits<T> bits[VEC];
#pragma unroll
        for (int q = 0; q < VEC; ++q)
          bits[q] = row < row_end && col + q < col_end ? reinterpret_cast<const Bits<T>*>(p)[q] : Bits<T>(0);
        memcpy(&stage[i], bits, sizeof(uint4));
      }
    }
  }

  __device__ __forceinline__ void store(T* tile) const {
#pragma unroll
    for (int i = 0; i < PER_THREAD; ++i) {
      const int v = threadIdx.x + i * kThreads;
      *reinterpret_cast<uint4*>(tile + (v / (INNER / VEC)) * PITCH + (v % (INNER / VEC)) * VEC) = stage[i];
    }
  }
};

// A K-major operand's tile is [MN][K] in shared memory, any other [K][MN].
template <typename T, bool K_MAJOR, int MN>
using OperandCopy = TileCopy<T, K_MAJOR ? MN : Tiles<T>::BK, K_MAJOR ? Tiles<T>::BK : MN, Tiles<T>::PAD>;

struct GemmArgs {
  const void* a;  // row-major matrix holding A
  int64_t lda;
  const void* b;  // row-major matrix holding B (per expert when groups split M)
  int64_t ldb, b_expert_stride;
  void* c;  // row-major C (per expert when groups split K)
  int64_t ldc, c_expert_stride;
  const int64_t* offsets;
  int E;
  int64_t M;  // rows of C (all experts' rows when groups split M)
  int64_t N;  // columns of C
  int64_t K;  // reduction length when groups split M
  bool vec_a, vec_b;
};

// The block's place in C and the k range it reduces over.
struct BlockWork {
  int expert;  // -1: nothing to do
  int64_t m0, m_end, n0, k0, k_end;
};

// Groups split M: which expert's M tile this block computes (n0 is the caller's).

template <int BM>
__device__ BlockWork find_work_split_m(const GemmArgs& args) {
  __shared__ BlockWork work;
  if (threadIdx.x < kWarp) {
    const int lane = threadIdx.x;
    const int64_t tile = blockIdx.x;
    int64_t carry = 0;
    bool found = false;
    for (int base = 0; base <= args.E && !found; base += kWarp) {
      const int e = base + lane;
      int64_t start = 0, end = 0;
      if (e < args.E) {
        start = args.offsets[e];
        end = args.offsets[e + 1];
      } else if (e == args.E) {  // the rows past the last expert, written as zeros
        start = args.offsets[args.E];
        end = args.M;
      }
      // offsets outside [0, M] or decreasing would send the tile outside A and C
      FINTEAM_KERNEL_ASSERT(e > args.E || (0 <= start && start <= end && end <= args.M));
      start = start < 0 ? 0 : start > args.M ? args.M : start;
      end = end < start ? start : end > args.M ? args.M : end;
      const int64_t tiles = end > start ? (end - start + BM - 1) / BM : 0;
      const int64_t inclusive = warp_inclusive_scan(tiles);
      const int64_t before = carry + inclusive - tiles;
      const bool mine = tile >= before && tile < before + tiles;
      if (mine) {
        work.expert = e;
        work.m0 = start + (tile - before) * BM;
        work.m_end = end;
        work.k0 = 0;
        work.k_end = e < args.E ? args.K : 0;
      }
      found = __ballot_sync(kFullMask, mine) != 0;
      carry += __shfl_sync(kFullMask, inclusive, kWarp - 1);
    }
    if (!found && lane == 0) work.expert = -1;
  }
  __syncthreads();
  return work;
}

template <typename T, typename OutT, bool A_K_MAJOR, bool B_K_MAJOR, bool SPLIT_K>
__global__ void __launch_bounds__(kThreads) grouped_gemm_kernel(const GemmArgs args) {
  using Tile = Tiles<T>;
  constexpr int BM = Tile::BM, BN = Tile::BN, BK = Tile::BK;
  using CopyA = OperandCopy<T, A_K_MAJOR, BM>;
  using CopyB = OperandCopy<T, B_K_MAJOR, BN>;
  __shared__ __align__(128) unsigned char smem[2 * (CopyA::BYTES + CopyB::BYTES)];
  // Buffers by arithmetic, not a pointer array, which a runtime index would put on the stack.
  auto tile_a = [&](int buffer) { return reinterpret_cast<T*>(smem + buffer * CopyA::BYTES); };
  auto tile_b = [&](int buffer) { return reinterpret_cast<T*>(smem + 2 * CopyA::BYTES + buffer * CopyB::BYTES); };

  BlockWork work;
  if constexpr (SPLIT_K) {
    const int e = blockIdx.z;
    work = BlockWork{e,
                     static_cast<int64_t>(blockIdx.x) * BM,
                     args.M,
                     static_cast<int64_t>(blockIdx.y) * BN,
                     args.offsets[e],
                     args.offsets[e + 1]};
  } else {
    work = find_work_split_m<BM>(args);
    work.n0 = static_cast<int64_t>(blockIdx.y) * BN;
  }
  if (work.expert < 0) return;

  const T* a = static_cast<const T*>(args.a);
  const T* b = static_cast<const T*>(args.b) + (SPLIT_K ? 0 : work.expert * args.b_expert_stride);
  // Bounds of each operand's mn and k coordinates.
  const int64_t a_mn_end = work.m_end, b_mn_end = args.N;
  CopyA copy_a;
  CopyB copy_b;
  auto load = [&](int64_t k0) {
    if constexpr (A_K_MAJOR)
      copy_a.load(a, args.lda, work.m0, a_mn_end, k0, work.k_end, args.vec_a);
    else
      copy_a.load(a, args.lda, k0, work.k_end, work.m0, a_mn_end, args.vec_a);
    if constexpr (B_K_MAJOR)
      copy_b.load(b, args.ldb, work.n0, b_mn_end, k0, work.k_end, args.vec_b);
    else
      copy_b.load(b, args.ldb, k0, work.k_end, work.n0, b_mn_end, args.vec_b);
  };

  const int64_t k_steps = work.k_end > work.k0 ? (work.k_end - work.k0 + BK - 1) / BK : 0;
  if (k_steps > 0) {
    load(work.k0);
    copy_a.store(tile_a(0));
    copy_b.store(tile_b(0));
  }
  __syncthreads();

  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  OutT* c = static_cast<OutT*>(args.c) + (SPLIT_K ? work.expert * args.c_expert_stride : 0);
  auto store_c = [&](int64_t m, int64_t n, float value) {
    if (m < work.m_end && n < args.N) c[m * args.ldc + n] = from_f32<OutT>(value);
  };

  if constexpr (sizeof(T) == 2) {
    using namespace nvcuda;
    using LayoutA = typename std::conditional<A_K_MAJOR, wmma::row_major, wmma::col_major>::type;
    using LayoutB = typename std::conditional<B_K_MAJOR, wmma::col_major, wmma::row_major>::type;
    constexpr int WM = 64, WN = 32, FM = WM / 16, FN = WN / 16;  // warp tile and its fragments
    const int warp_m = warp / (BN / WN), warp_n = warp % (BN / WN);
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[FM][FN];
#pragma unroll
    for (int i = 0; i < FM; ++i)
#pragma unroll
      for (int j = 0; j < FN; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

    for (int64_t step = 0; step < k_steps; ++step) {
      const int cur = step & 1;
      const bool more = step + 1 < k_steps;
      if (more) load(work.k0 + (step + 1) * BK);
      const T* ta = tile_a(cur);
      const T* tb = tile_b(cur);
#pragma unroll
      for (int kk = 0; kk < BK; kk += 16) {
        // All of B's fragments, then A's one at a time: fewer live registers than both at once.
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, LayoutB> fb[FN];
#pragma unroll
        for (int j = 0; j < FN; ++j) {
          const int n = warp_n * WN + j * 16;
          wmma::load_matrix_sync(fb[j], B_K_MAJOR ? tb + n * CopyB::PITCH + kk : tb + kk * CopyB::PITCH + n,
                                 CopyB::PITCH);
        }
#pragma unroll
        for (int i = 0; i < FM; ++i) {
          const int m = warp_m * WM + i * 16;
          wmma::fragment<wmma::matrix_a, 16, 16, 16, T, LayoutA> fa;
          wmma::load_matrix_sync(fa, A_K_MAJOR ? ta + m * CopyA::PITCH + kk : ta + kk * CopyA::PITCH + m, CopyA::PITCH);
#pragma unroll
          for (int j = 0; j < FN; ++j) wmma::mma_sync(acc[i][j], fa, fb[j], acc[i][j]);
        }
      }
      if (more) {
        copy_a.store(tile_a(cur ^ 1));
        copy_b.store(tile_b(cur ^ 1));
      }
      __syncthreads();
    }

    // Each warp stages one 16x16 fragment at a time in its own 1 KB of the (now idle) tiles.
    float* staging = reinterpret_cast<float*>(smem) + warp * 256;
#pragma unroll
    for (int i = 0; i < FM; ++i)
#pragma unroll
      for (int j = 0; j < FN; ++j) {
        wmma::store_matrix_sync(staging, acc[i][j], 16, wmma::mem_row_major);
        __syncwarp();
        const int row = lane / 2, col = (lane % 2) * 8;
#pragma unroll
        for (int q = 0; q < 8; ++q)
          store_c(work.m0 + warp_m * WM + i * 16 + row, work.n0 + warp_n * WN + j * 16 + col + q,
                  staging[row * 16 + col + q]);
        __syncwarp();
      }
  } else {
    constexpr int TM = 4, TN = 4;  // outputs per thread
    const int ty = threadIdx.x / (BN / TN), tx = threadIdx.x % (BN / TN);
    float acc[TM][TN] = {};
    for (int64_t step = 0; step < k_steps; ++step) {
      const int cur = step & 1;
      const bool more = step + 1 < k_steps;
      if (more) load(work.k0 + (step + 1) * BK);
      const T* ta = tile_a(cur);
      const T* tb = tile_b(cur);
#pragma unroll
      for (int kk = 0; kk < BK; ++kk) {
        float fa[TM], fb[TN];
#pragma unroll
        for (int i = 0; i < TM; ++i) {
          const int m = ty * TM + i;
          fa[i] = A_K_MAJOR ? ta[m * CopyA::PITCH + kk] : ta[kk * CopyA::PITCH + m];
        }
#pragma unroll
        for (int j = 0; j < TN; ++j) {
          const int n = tx * TN + j;
          fb[j] = B_K_MAJOR ? tb[n * CopyB::PITCH + kk] : tb[kk * CopyB::PITCH + n];
        }
#pragma unroll
        for (int i = 0; i < TM; ++i)
#pragma unroll
          for (int j = 0; j < TN; ++j) acc[i][j] = fmaf(fa[i], fb[j], acc[i][j]);
      }
      if (more) {
        copy_a.store(tile_a(cur ^ 1));
        copy_b.store(tile_b(cur ^ 1));
      }
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) store_c(work.m0 + ty * TM + i, work.n0 + tx * TN + j, acc[i][j]);
  }
}

// A row-major matrix can be read in 16-byte vectors: every row start and the width aligned.
template <typename T>
bool vec_ok(const void* base, int64_t ld, int64_t cols) {
  constexpr int64_t vec = 16 / sizeof(T);
  return aligned16(base) && ld % vec == 0 && cols % vec == 0;
}

template <typename T, typename OutT, bool A_K_MAJOR, bool B_K_MAJOR, bool SPLIT_K>
cudaError_t launch(const GemmArgs& args, cudaStream_t stream) {
  using Tile = Tiles<T>;
  dim3 grid;
  if (SPLIT_K) {
    grid = dim3(static_cast<unsigned>(ceil_div(args.M, Tile::BM)), static_cast<unsigned>(ceil_div(args.N, Tile::BN)),
                static_cast<unsigned>(args.E));
  } else {
    grid = dim3(static_cast<unsigned>(ceil_div(args.M, Tile::BM) + args.E + 1),
                static_cast<unsigned>(ceil_div(args.N, Tile::BN)));
  }
  grouped_gemm_kernel<T, OutT, A_K_MAJOR, B_K_MAJOR, SPLIT_K><<<grid, kThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace

cudaError_t grouped_gemm_fwd(const void* x_ND, const void* w_EOD, const int64_t* offsets_E1, DType dtype, int64_t N,
                             int64_t D, int64_t O, int64_t E, void* y_NO, cudaStream_t stream) {
  if (N == 0 || O == 0) return cudaSuccess;
  return with_dtype(dtype, [&](auto tag) {
    using Elem = decltype(tag);
    const GemmArgs args{x_ND,
                        D,
                        w_EOD,
                        D,
                        O * D,
                        y_NO,
                        O,
                        0,
                        offsets_E1,
                        static_cast<int>(E),
                        N,
                        O,
                        D,
                        vec_ok<Elem>(x_ND, D, D),
                        vec_ok<Elem>(w_EOD, D, D)};
    return launch<Elem, Elem, true, true, false>(args, stream);
  });
}

cudaError_t grouped_gemm_dx(const void* grad_NO, const void* w_EOD, const int64_t* offsets_E1, DType dtype, int64_t N,
                            int64_t D, int64_t O, int64_t E, bool out_f32, void* grad_x_ND, cudaStream_t stream) {
  if (N == 0 || D == 0) return cudaSuccess;
  return with_dtype(dtype, [&](auto tag) {
    using Elem = decltype(tag);
    const GemmArgs args{grad_NO,
                        O,
                        w_EOD,
                        D,
                        O * D,
                        grad_x_ND,
                        D,
                        0,
                        offsets_E1,
                        static_cast<int>(E),
                        N,
                        D,
                        O,
                        vec_ok<Elem>(grad_NO, O, O),
                        vec_ok<Elem>(w_EOD, D, D)};
    if (out_f32) return launch<Elem, float, true, false, false>(args, stream);
    return launch<Elem, Elem, true, false, false>(args, stream);
  });
}

cudaError_t grouped_gemm_dw(const void* grad_NO, const void* x_ND, const int64_t* offsets_E1, DType dtype, int64_t N,
                            int64_t D, int64_t O, int64_t E, void* grad_w_EOD, cudaStream_t stream) {
  if (E == 0 || O == 0 || D == 0) return cudaSuccess;
  return with_dtype(dtype, [&](auto tag) {
    using Elem = decltype(tag);
    const GemmArgs args{grad_NO,
                        O,
                        x_ND,
                        D,
                        0,
                        grad_w_EOD,
                        D,
                        O * D,
                        offsets_E1,
                        static_cast<int>(E),
                        O,
                        D,
                        0,
                        vec_ok<Elem>(grad_NO, O, O),
                        vec_ok<Elem>(x_ND, D, D)};
    return launch<Elem, Elem, false, false, true>(args, stream);
  });
}

}  // namespace finteam
