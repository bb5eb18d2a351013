// The AMX weight-streaming kernel (Intel AMX-BF16), used by skinny_gemm_bf16 (dot_bf16.h).
//
// Shape legend: D the reduction width, O output rows of the weight, M the batch rows (<= 32).
#pragma once

#include <cstdint>
#include <vector>

namespace finteam::cpu::amx {

// Whether this CPU has AMX-BF16 and the OS let this process use the tile registers.
bool available();

// The batch as TDPBF16PS's second operand: per chunk of up to 16 rows, per 32-element block
// of D, 16 lines of (row m, elements 2k and 2k+1) pairs. D must be a multiple of 32.
std::vector<uint16_t> pack(const uint16_t* const* rows, int64_t M, int64_t D);

// out[m * ldo + (o - o0)] = sum_d x[m][d] * w[o * ldw + d] for o in [o0, o0 + 16 * blocks),
// from the packed batch; fp32 accumulation. D must be a multiple of 32.
void stream(const uint16_t* w, int64_t ldw, int64_t D, int64_t o0, int64_t blocks, const uint16_t* packed, int64_t M,
            float* out, int64_t ldo);

}  // namespace finteam::cpu::amx
