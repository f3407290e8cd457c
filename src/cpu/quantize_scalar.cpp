// The scalar reference kernels: the specification of every other path.
#include <cmath>

#include "quant_kernels.h"

namespace tensorslim {
namespace cpu {
namespace {

bool min_max(const float* x, int64_t n, float* lo, float* hi) {
  float l = INFINITY, h = -INFINITY;
  bool finite = true;
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i];
    if (!std::isfinite(v)) finite = false;
    l = std::fmin(l, v);
    h = std::fmax(h, v);
  }
  *lo = l;
  *hi = h;
  return finite;
}

void encode(const float* x, int64_t n, float scale, float zp, float qmin, float qmax,
            uint8_t* codes) {
  for (int64_t i = 0; i < n; ++i) {
    float r = std::nearbyint(x[i] / scale) + zp;
    r = std::fmin(std::fmax(r, qmin), qmax);
    codes[i] = static_cast<uint8_t>(static_cast<int32_t>(r));
  }
}

template <typename T>
void decode(const T* codes, int64_t n, float scale, int32_t zp, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(codes[i] - zp) * scale;
}

const QuantKernels kScalar = {min_max, encode, decode<int8_t>, decode<uint8_t>};

}  // namespace

const QuantKernels& scalar_quant_kernels() { return kScalar; }

const QuantKernels& active_quant_kernels() {
  switch (active_isa()) {
#ifdef TENSORSLIM_HAVE_AVX512
    case Isa::kAVX512: return avx512_quant_kernels();
#endif
#ifdef TENSORSLIM_HAVE_AVX2
    case Isa::kAVX2: return avx2_quant_kernels();
#endif
    default: return kScalar;
  }
}

}  // namespace cpu
}  // namespace tensorslim
