// The AMX weight-streaming kernel: C^T = W x^T with the weight as TDPBF16PS's first operand.
//
// A 16-row by 32-element block of the weight is one tile loaded straight from its rows; the
// batch (at most 16 rows per pass) is packed once into the pair-interleaved tile layout; each
// TDPBF16PS does 16 x 32 x M multiply-adds against 1 KB of weight. Two row blocks share each
// batch tile. On CPUs whose vdpbf16ps is slow (AMX parts), this keeps a decode batch of several
// rows bound by the weight stream, where the AVX-512 kernels are bound by their FMA rate.
#include "dot_amx.h"

#include <algorithm>

#include "common.h"

#if FINTEAM_X86 && defined(__linux__)
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define FINTEAM_AMX 1
#else
#define FINTEAM_AMX 0
#endif

namespace finteam::cpu::amx {

#if FINTEAM_AMX
namespace {

#define FINTEAM_AMX_TARGET __attribute__((target("amx-tile,amx-bf16,avx512f")))

constexpr int kRows = 16;  // weight rows per tile, and batch rows per pass

bool request_tiles() {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || (d & (1u << 22)) == 0 || (d & (1u << 24)) == 0) return false;
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0-1: C for two weight row blocks (16 x M fp32); 2-3: their A (16 x 32 bf16); 4: B.
FINTEAM_AMX_TARGET void configure(int64_t M) {
  TileConfig cfg;
  for (int t : {0, 1, 4}) {
    cfg.rows[t] = kRows;
    cfg.colsb[t] = static_cast<uint16_t>(M * 4);
  }
  for (int t : {2, 3}) {
    cfg.rows[t] = kRows;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

// C^T tile (16 weight rows x M) into out[m][o]; a full 16 x 16 tile is transposed in registers
// (unpack 32-bit, shuffle 64-bit, then two 128-bit lane shuffles).
__attribute__((target("avx512f"))) void scatter(const float* c, int64_t M, float* out, int64_t ldo) {
  if (M != kRows) {
    for (int r = 0; r < kRows; ++r) {
      for (int64_t m = 0; m < M; ++m) out[m * ldo + r] = c[r * M + m];
    }
    return;
  }
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_load_ps(c + i * 16);
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int h = 0; h < 16; h += 8) {
    for (int i = 0; i < 4; ++i) {
      t[h + i] = _mm512_shuffle_f32x4(r[h + i], r[h + i + 4], 0x88);
      t[h + i + 4] = _mm512_shuffle_f32x4(r[h + i], r[h + i + 4], 0xDD);
    }
  }
  for (int i = 0; i < 8; ++i) {
    _mm512_storeu_ps(out + i * ldo, _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88));
    _mm512_storeu_ps(out + (i + 8) * ldo, _mm512_shuffle_f32x4(t[i], t[i + 8], 0xDD));
  }
}

FINTEAM_AMX_TARGET void pass(const uint16_t* w, int64_t ldw, int64_t D, int64_t blocks, const uint16_t* b, int64_t M,
                             float* out, int64_t ldo) {
  configure(M);
  alignas(64) float c[2][kRows * kRows];
  const int64_t stride_w = ldw * 2, stride_b = M * 4, b_block = kRows * M * 2;
  int64_t blk = 0;
  for (; blk + 2 <= blocks; blk += 2) {
    const uint16_t* w0 = w + blk * kRows * ldw;
    const uint16_t* w1 = w0 + kRows * ldw;
    _tile_zero(0);
    _tile_zero(1);
    for (int64_t d = 0; d < D; d += 32) {
      _tile_loadd(2, w0 + d, stride_w);
      _tile_loadd(3, w1 + d, stride_w);
      _tile_loadd(4, b + d / 32 * b_block, stride_b);
      _tile_dpbf16ps(0, 2, 4);
      _tile_dpbf16ps(1, 3, 4);
    }
    _tile_stored(0, c[0], M * 4);
    _tile_stored(1, c[1], M * 4);
    scatter(c[0], M, out + blk * kRows, ldo);
    scatter(c[1], M, out + (blk + 1) * kRows, ldo);
  }
  if (blk < blocks) {
    const uint16_t* w0 = w + blk * kRows * ldw;
    _tile_zero(0);
    for (int64_t d = 0; d < D; d += 32) {
      _tile_loadd(2, w0 + d, stride_w);
      _tile_loadd(4, b + d / 32 * b_block, stride_b);
      _tile_dpbf16ps(0, 2, 4);
    }
    _tile_stored(0, c[0], M * 4);
    scatter(c[0], M, out + blk * kRows, ldo);
  }
  _tile_release();
}

}  // namespace

bool available() {
  static const bool ok = request_tiles();
  return ok;
}

std::vector<uint16_t> pack(const uint16_t* const* rows, int64_t M, int64_t D) {
  std::vector<uint16_t> out(M * D);
  uint16_t* dst = out.data();
  for (int64_t m0 = 0; m0 < M; m0 += kRows) {
    const int64_t mc = std::min<int64_t>(kRows, M - m0);
    for (int64_t d = 0; d < D; d += 32) {
      for (int64_t k = 0; k < 16; ++k) {
        for (int64_t m = 0; m < mc; ++m) {
          *dst++ = rows[m0 + m][d + 2 * k];
          *dst++ = rows[m0 + m][d + 2 * k + 1];
        }
      }
    }
  }
  return out;
}

void stream(const uint16_t* w, int64_t ldw, int64_t D, int64_t o0, int64_t blocks, const uint16_t* packed, int64_t M,
            float* out, int64_t ldo) {
  for (int64_t m0 = 0; m0 < M; m0 += kRows) {
    const int64_t mc = std::min<int64_t>(kRows, M - m0);
    pass(w + o0 * ldw, ldw, D, blocks, packed + m0 * D, mc, out + m0 * ldo, ldo);
  }
}

#else

bool available() { return false; }
std::vector<uint16_t> pack(const uint16_t* const*, int64_t, int64_t) { return {}; }
void stream(const uint16_t*, int64_t, int64_t, int64_t, int64_t, const uint16_t*, int64_t, float*, int64_t) {}

#endif

}  // namespace finteam::cpu::amx
