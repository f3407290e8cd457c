// The ISA-independent half of the E2M1 GEMV (fp4_gemv.h): which weights it takes and the
// activations' re-layout.
#include "fp4_gemv.h"

#include <cmath>
#include <cstring>

namespace tensorslim {
namespace cpu {

bool fp4_gemv_fits(const FormatInfo& info, int64_t K, int64_t group, int lanes) {
  if (info.format != Format::kNVFP4 && info.format != Format::kMXFP4) return false;
  if (lanes != 8 && lanes != 16) return false;
  // The AVX2 decode takes codes 8..15 as the negated 0..7 (sign bit 3), as E2M1 is.
  for (int c = 0; c < 8; ++c) {
    uint32_t pos, neg;
    std::memcpy(&pos, &info.code_values[c], 4);
    std::memcpy(&neg, &info.code_values[c + 8], 4);
    if ((pos ^ 0x80000000u) != neg) return false;
  }
  return K > 0 && K % (2 * lanes) == 0 && group == info.block_size;
}

bool pack_fp4_activations(const float* x, int64_t ldx, int64_t M, int64_t K, int lanes, float* out) {
  const int64_t B = 2 * lanes;
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * ldx;
    float* o = out + m * K;
    for (int64_t b = 0; b < K; b += B)
      for (int64_t j = 0; j < lanes; ++j) {
        const float even = xr[b + 2 * j], odd = xr[b + 2 * j + 1];
        o[b + j] = even;
        o[b + lanes + j] = odd;
        // written as "not <=" so that NaN fails too
        if (!(std::fabs(even) <= kFp4MaxActivation) || !(std::fabs(odd) <= kFp4MaxActivation)) return false;
      }
  }
  return true;
}

}  // namespace cpu
}  // namespace tensorslim
