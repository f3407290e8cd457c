// AVX-512 quantize kernels (compiled with -mavx512f -mavx512bw -mavx512vl -mavx512dq).
// Same operations as the scalar reference in the same order, so results are bit-exact.
#include <immintrin.h>

#include <cmath>

#include "quant_kernels.h"

namespace tensorslim {
namespace cpu {
namespace {

inline __mmask16 tail_mask(int64_t n) { return static_cast<__mmask16>((1u << n) - 1u); }

bool min_max(const float* x, int64_t n, float* lo, float* hi) {
  __m512 vlo = _mm512_set1_ps(INFINITY), vhi = _mm512_set1_ps(-INFINITY);
  __mmask16 bad = 0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m512 v = _mm512_loadu_ps(x + i);
    bad |= _mm512_fpclass_ps_mask(v, 0x99);  // QNaN | +Inf | -Inf | SNaN
    vlo = _mm512_min_ps(vlo, v);
    vhi = _mm512_max_ps(vhi, v);
  }
  if (i < n) {
    const __mmask16 m = tail_mask(n - i);
    __m512 v = _mm512_maskz_loadu_ps(m, x + i);
    bad |= _mm512_mask_fpclass_ps_mask(m, v, 0x99);
    vlo = _mm512_mask_min_ps(vlo, m, vlo, v);
    vhi = _mm512_mask_max_ps(vhi, m, vhi, v);
  }
  *lo = _mm512_reduce_min_ps(vlo);
  *hi = _mm512_reduce_max_ps(vhi);
  return bad == 0;
}

inline __m512i encode16(__m512 v, __m512 scale, __m512 zp, __m512 qmin, __m512 qmax) {
  __m512 r = _mm512_roundscale_ps(_mm512_div_ps(v, scale), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  r = _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(r, zp), qmin), qmax);
  return _mm512_cvttps_epi32(r);
}

void encode(const float* x, int64_t n, float scale, float zp, float qmin, float qmax,
            uint8_t* codes) {
  const __m512 vs = _mm512_set1_ps(scale), vz = _mm512_set1_ps(zp);
  const __m512 vmin = _mm512_set1_ps(qmin), vmax = _mm512_set1_ps(qmax);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + i),
                     _mm512_cvtepi32_epi8(encode16(_mm512_loadu_ps(x + i), vs, vz, vmin, vmax)));
  if (i < n) {
    const __mmask16 m = tail_mask(n - i);
    _mm512_mask_cvtepi32_storeu_epi8(codes + i, m,
                                     encode16(_mm512_maskz_loadu_ps(m, x + i), vs, vz, vmin, vmax));
  }
}

template <bool kSigned>
void decode(const void* codes, int64_t n, float scale, int32_t zp, float* out) {
  const uint8_t* c = static_cast<const uint8_t*>(codes);
  const __m512 vs = _mm512_set1_ps(scale);
  const __m512i vz = _mm512_set1_epi32(zp);
  int64_t i = 0;
  auto one = [&](__m128i bytes) {
    __m512i w = kSigned ? _mm512_cvtepi8_epi32(bytes) : _mm512_cvtepu8_epi32(bytes);
    return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(w, vz)), vs);
  };
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(out + i, one(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c + i))));
  if (i < n) {
    const __mmask16 m = tail_mask(n - i);
    _mm512_mask_storeu_ps(out + i, m, one(_mm_maskz_loadu_epi8(m, c + i)));
  }
}

void decode_s8(const int8_t* c, int64_t n, float s, int32_t z, float* o) { decode<true>(c, n, s, z, o); }
void decode_u8(const uint8_t* c, int64_t n, float s, int32_t z, float* o) { decode<false>(c, n, s, z, o); }

const QuantKernels kAvx512 = {min_max, encode, decode_s8, decode_u8};

}  // namespace

const QuantKernels& avx512_quant_kernels() { return kAvx512; }

}  // namespace cpu
}  // namespace tensorslim
