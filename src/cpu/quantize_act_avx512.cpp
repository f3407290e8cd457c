// AVX-512 activation quantizers for W8A8 (compiled with -mavx512f/bw/vl/dq). The same fp32
// operations as the references in gemm_int8.cpp, in the same order, so codes are bit-exact:
// multiply by 1/s, divide by the scale, round half to even, add the zero point, clamp.
#include <immintrin.h>

#include <algorithm>
#include <cmath>

#include "parallel.h"
#include "reciprocal_division.h"
#include "tensorslim/gemm_int8.h"
#include "tensorslim/quantize.h"

namespace tensorslim {
namespace cpu {
namespace {

inline __mmask16 tail_mask(int64_t n) { return static_cast<__mmask16>((1u << n) - 1u); }

constexpr int kNotFinite = 0x99;  // fpclass: QNaN | +Inf | -Inf | SNaN

inline __m512 load_smoothed(const float* x, const float* inv, int64_t k, __mmask16 m) {
  __m512 v = _mm512_maskz_loadu_ps(m, x + k);
  return inv ? _mm512_mul_ps(v, _mm512_maskz_loadu_ps(m, inv + k)) : v;
}

// max |x * inv| over a row; false if a value is NaN or Inf.
bool row_absmax(const float* x, const float* inv, int64_t K, float* out) {
  __m512 vmax = _mm512_setzero_ps();
  __mmask16 bad = 0;
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 m = K - k >= 16 ? static_cast<__mmask16>(0xFFFF) : tail_mask(K - k);
    const __m512 v = load_smoothed(x, inv, k, m);
    bad |= _mm512_mask_fpclass_ps_mask(m, v, kNotFinite);
    vmax = _mm512_max_ps(vmax, _mm512_abs_ps(v));  // masked-off lanes loaded as 0
  }
  *out = _mm512_reduce_max_ps(vmax);
  return bad == 0;
}

// v / s rounded as a division rounds, from y = 1/s (see reciprocal_division.h).
inline __m512 divide_by_reciprocal(__m512 v, __m512 s, __m512 y) {
  const __m512 q = _mm512_mul_ps(v, y);
  const __m512 r = _mm512_fnmadd_ps(q, s, v);  // v - q * s, exact
  const __mmask16 small = _mm512_cmp_ps_mask(_mm512_abs_ps(q), _mm512_set1_ps(kReciprocalDivisionLimit),
                                             _CMP_LT_OQ);
  return _mm512_mask3_fmadd_ps(r, y, q, small);
}

// Codes of one row as int32 lanes: clamp(rne(v / scale) + zp, lo, hi).
template <typename Store>
bool encode_row(const float* x, const float* inv, int64_t K, float scale, float zp, float lo,
                float hi, bool check, Store store) {
  const __m512 vs = _mm512_set1_ps(scale), vz = _mm512_set1_ps(zp), vy = _mm512_set1_ps(1.0f / scale);
  const __m512 vlo = _mm512_set1_ps(lo), vhi = _mm512_set1_ps(hi);
  const bool by_reciprocal = reciprocal_division_exact(scale);
  __mmask16 bad = 0;
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 m = K - k >= 16 ? static_cast<__mmask16>(0xFFFF) : tail_mask(K - k);
    const __m512 v = load_smoothed(x, inv, k, m);
    if (check) bad |= _mm512_mask_fpclass_ps_mask(m, v, kNotFinite);
    const __m512 d = by_reciprocal ? divide_by_reciprocal(v, vs, vy) : _mm512_div_ps(v, vs);
    __m512 r = _mm512_roundscale_ps(d, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    r = _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(r, vz), vlo), vhi);
    store(k, m, _mm512_cvttps_epi32(r));
  }
  return bad == 0;
}

}  // namespace

bool quantize_per_token_avx512(const TensorView& x, const TensorView* inv_smooth,
                               const TensorView& q, const TensorView& scales) {
  if (best_isa() != Isa::kAVX512) return false;
  const int64_t M = x.shape[0], K = x.shape[1];
  const float* inv = inv_smooth ? inv_smooth->ptr<float>() : nullptr;
  const bool is_u8 = q.dtype == DType::kUInt8;
  parallel_for(M, activation_row_grain(K), [&](int64_t b, int64_t e) {
    for (int64_t row = b; row < e; ++row) {
      const float* xr = x.ptr<float>() + row * K;
      uint8_t* qr = static_cast<uint8_t*>(q.data) + row * K;
      float amax;
      if (!row_absmax(xr, inv, K, &amax)) throw_activation_not_finite(row);
      const float scale = amax > 0.0f ? amax / 127.0f : 1.0f;
      scales.ptr<float>()[row] = scale;
      // u8 output: the same codes + 128 (adding 128 to the int32 lane is exact).
      const __m512i shift = _mm512_set1_epi32(is_u8 ? 128 : 0);
      encode_row(xr, inv, K, scale, 0.0f, -127.0f, 127.0f, false,
                 [&](int64_t k, __mmask16 m, __m512i c) {
                   _mm512_mask_cvtepi32_storeu_epi8(qr + k, m, _mm512_add_epi32(c, shift));
                 });
    }
  });
  return true;
}

bool quantize_static_avx512(const TensorView& x, const TensorView* inv_smooth, float scale,
                            int32_t zero_point, const TensorView& q) {
  if (best_isa() != Isa::kAVX512) return false;
  const int64_t M = x.shape[0], K = x.shape[1];
  const float* inv = inv_smooth ? inv_smooth->ptr<float>() : nullptr;
  const bool is_u8 = q.dtype == DType::kUInt8;
  const float lo = is_u8 ? 0.0f : -128.0f, hi = is_u8 ? 255.0f : 127.0f;
  // Values are already clamped to the code range: the low byte of each lane is the code.
  auto encode = [&](int64_t first, int64_t n) {
    uint8_t* qr = static_cast<uint8_t*>(q.data) + first;
    return encode_row(x.ptr<float>() + first, inv, n, scale, static_cast<float>(zero_point),
                      lo, hi, true, [&](int64_t k, __mmask16 m, __m512i c) {
                        _mm512_mask_cvtepi32_storeu_epi8(qr + k, m, c);
                      });
  };
  if (!inv) {  // elementwise: split the values, not the rows (rows of 1-64 channels in convolutions)
    parallel_for(M * K, activation_row_grain(1), [&](int64_t b, int64_t e) {
      if (!encode(b, e - b)) throw_first_not_finite(x.ptr<float>(), b, e, K);
    });
    return true;
  }
  parallel_for(M, activation_row_grain(K), [&](int64_t b, int64_t e) {
    for (int64_t row = b; row < e; ++row)
      if (!encode(row * K, K)) throw_activation_not_finite(row);
  });
  return true;
}

}  // namespace cpu
}  // namespace tensorslim
