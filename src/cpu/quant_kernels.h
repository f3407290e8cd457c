// Per-ISA building blocks of quantize/dequantize, each working on one group of
// contiguous fp32 values. quantize.cpp drives them; the scalar set is the reference.
#pragma once

#include <cmath>
#include <cstdint>

#include "tensorslim/quantize.h"

namespace tensorslim {
namespace cpu {

// (hi - lo) / divisor, the asymmetric scale of a group spanning [lo <= 0, hi >= 0]. Finite
// values near +-3.4e38 overflow hi - lo to Inf (and then the codes to NaN): there, and only
// there, the halves are divided first, so every other group keeps its exact encoding.
inline float asymmetric_scale(float lo, float hi, float divisor) {
  const float span = hi - lo;
  return std::isinf(span) ? hi / divisor - lo / divisor : span / divisor;
}

struct QuantKernels {
  // lo = min(x), hi = max(x); returns false if any value is NaN or Inf.
  bool (*min_max)(const float* x, int64_t n, float* lo, float* hi);
  // codes[i] = clamp(rne(x[i] / scale) + zp, qmin, qmax), stored as the low byte.
  void (*encode)(const float* x, int64_t n, float scale, float zp, float qmin, float qmax,
                 uint8_t* codes);
  // out[i] = float(code[i] - zp) * scale for signed (int8) or unsigned (uint8) codes.
  void (*decode_s8)(const int8_t* codes, int64_t n, float scale, int32_t zp, float* out);
  void (*decode_u8)(const uint8_t* codes, int64_t n, float scale, int32_t zp, float* out);
};

const QuantKernels& scalar_quant_kernels();
#ifdef TENSORSLIM_HAVE_AVX2
const QuantKernels& avx2_quant_kernels();
#endif
#ifdef TENSORSLIM_HAVE_AVX512
const QuantKernels& avx512_quant_kernels();
#endif
const QuantKernels& active_quant_kernels();

}  // namespace cpu
}  // namespace tensorslim
