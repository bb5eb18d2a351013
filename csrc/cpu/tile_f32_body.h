// The kernels of tile_f32.cpp for one ISA. tile_f32.cpp includes this file once per ISA, each
// time inside its own namespace and `#pragma GCC target` region, after defining there:
//   Vec (the register type), kWidth (floats in one), kGateRows and kDownRows (rows per register
//   block), and vzero, vload, vset1, vfmadd, vstore. So no include guard, on purpose.
// Only plain loops and those helpers here: anything defined in this region is compiled for the
// ISA, and a library template instantiated here could be merged with the baseline one.

constexpr int64_t kCols = 2 * kWidth;  // columns per register block: two registers

// acc[r][j] = sum_{d < D} w[r][d] * xt[d * kTileRows + kWidth j], for r < R, j < V: a block of
// V = 2 registers of columns, or 1 for a tile's last kWidth columns or fewer. A column's sums are
// the same FMAs in the same order either way.
template <int R, int V>
inline __attribute__((always_inline)) void block(const float* const (&w)[R], int64_t D, const float* xt,
                                                 Vec (&acc)[R][2]) {
#pragma GCC unroll 12
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = vzero();
  for (int64_t d = 0; d < D; ++d) {
    const Vec x0 = vload(xt + d * kTileRows), x1 = V == 2 ? vload(xt + d * kTileRows + kWidth) : x0;
#pragma GCC unroll 12
    for (int r = 0; r < R; ++r) {
      const Vec wv = vset1(w[r][d]);
      acc[r][0] = vfmadd(wv, x0, acc[r][0]);
      if constexpr (V == 2) acc[r][1] = vfmadd(wv, x1, acc[r][1]);
    }
  }
}

// act^T rows [n0, n0+R) at columns [m0, m0+kCols): f(gate) * up from W_gate_up rows n0.. and I+n0..
// With h_rows (training), also the pre-activations into the tile's rows of h_N2I, columns n0..
// and I+n0.., for the tile's first M columns (the rest are padding).
template <int R, int V>
void gate_up_block(const float* w, int64_t H, int64_t I, int64_t n0, const float* xt, int64_t m0, int64_t M,
                   Activation act, float* actT, float* h_rows) {
  constexpr int64_t kBlockCols = V * kWidth;
  const float* rows[2 * R];
  for (int r = 0; r < R; ++r) {
    rows[r] = w + (n0 + r) * H;
    rows[R + r] = w + (I + n0 + r) * H;
  }
  Vec acc[2 * R][2];
  block<2 * R, V>(rows, H, xt + m0, acc);
  alignas(64) float h[2 * R][kCols];
  for (int r = 0; r < 2 * R; ++r) {
    vstore(h[r], acc[r][0]);
    if constexpr (V == 2) vstore(h[r] + kWidth, acc[r][1]);
  }
  if (h_rows != nullptr) {
    const int64_t cols = M - m0 < kBlockCols ? M - m0 : kBlockCols;
    for (int64_t c = 0; c < cols; ++c) {
      float* dst = h_rows + (m0 + c) * 2 * I + n0;
      for (int r = 0; r < R; ++r) {
        dst[r] = h[r][c];
        dst[I + r] = h[R + r][c];
      }
    }
  }
  for (int r = 0; r < R; ++r) glu_f32(h[r], h[R + r], kBlockCols, act, actT + (n0 + r) * kTileRows + m0);
}

// y^T rows [h0, h0+R) at columns [m0, m0+V*kWidth) from W_down rows h0..
template <int R, int V>
void down_block(const float* w, int64_t I, int64_t h0, const float* actT, int64_t m0, float* yT) {
  const float* rows[R];
  for (int r = 0; r < R; ++r) rows[r] = w + (h0 + r) * I;
  Vec acc[R][2];
  block<R, V>(rows, I, actT + m0, acc);
  for (int r = 0; r < R; ++r) {
    vstore(yT + (h0 + r) * kTileRows + m0, acc[r][0]);
    if constexpr (V == 2) vstore(yT + (h0 + r) * kTileRows + m0 + kWidth, acc[r][1]);
  }
}

// One task: rows [r0, r0 + M) of one expert (M <= kTileRows), into y rows r0.. and, unless it
// is null, h rows r0.. (see tile_f32.h).
void tile(const float* x, int64_t ldx, const int32_t* row_to_slot, int64_t K, const float* wgu, const float* wd,
          int64_t H, int64_t I, Activation act, int64_t r0, int64_t M, float* y, float* h, float* xt, float* actT,
          float* yT) {
  float* h_rows = h != nullptr ? h + r0 * 2 * I : nullptr;
  const int64_t cols = (M + kWidth - 1) / kWidth * kWidth;  // whole registers of columns
  const int64_t pairs = cols / kCols * kCols;                // the columns of two-register blocks
  for (int64_t m = 0; m < M; ++m) {
    const float* row = x + (row_to_slot[r0 + m] / K) * ldx;
    for (int64_t d = 0; d < H; ++d) xt[d * kTileRows + m] = row[d];
  }
  for (int64_t d = 0; d < H; ++d) {
    for (int64_t m = M; m < cols; ++m) xt[d * kTileRows + m] = 0.f;  // padding columns: never stored
  }
  in_blocks<kGateRows>(0, I, [&]<int R>(int64_t n0) {
    for (int64_t m0 = 0; m0 < pairs; m0 += kCols) gate_up_block<R, 2>(wgu, H, I, n0, xt, m0, M, act, actT, h_rows);
    if (pairs < cols) gate_up_block<R, 1>(wgu, H, I, n0, xt, pairs, M, act, actT, h_rows);
  });
  in_blocks<kDownRows>(0, H, [&]<int R>(int64_t h0) {
    for (int64_t m0 = 0; m0 < pairs; m0 += kCols) down_block<R, 2>(wd, I, h0, actT, m0, yT);
    if (pairs < cols) down_block<R, 1>(wd, I, h0, actT, pairs, yT);
  });
  for (int64_t m = 0; m < M; ++m) {
    float* out = y + (r0 + m) * H;
    for (int64_t h = 0; h < H; ++h) out[h] = yT[h * kTileRows + m];
  }
}
