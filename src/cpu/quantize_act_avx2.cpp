// AVX2 activation quantizers for W8A8 (compiled with -mavx2 -mfma): the AVX-512 ones'
// twins, 8 lanes at a time, the K tail in the reference's scalar code. The same fp32
// operations in the same order as the references in gemm_int8.cpp, so codes are bit-exact.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <string>

#include "parallel.h"
#include "reciprocal_division.h"
#include "tensorslim/gemm_int8.h"
#include "tensorslim/quantize.h"

namespace tensorslim {
namespace cpu {
namespace {

inline __m256 load_smoothed(const float* x, const float* inv, int64_t k) {
  const __m256 v = _mm256_loadu_ps(x + k);
  return inv ? _mm256_mul_ps(v, _mm256_loadu_ps(inv + k)) : v;
}

inline float scalar_smoothed(const float* x, const float* inv, int64_t k) {
  return inv ? x[k] * inv[k] : x[k];
}

// All-ones lanes where |v| is Inf or NaN.
inline __m256 not_finite_lanes(__m256 v) {
  const __m256 abs = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v);
  return _mm256_cmp_ps(abs, _mm256_set1_ps(INFINITY), _CMP_NLT_UQ);
}

float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

// max |x * inv| over a row; false if a value is NaN or Inf.
bool row_absmax(const float* x, const float* inv, int64_t K, float* out) {
  __m256 vmax = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    const __m256 v = load_smoothed(x, inv, k);
    bad = _mm256_or_ps(bad, not_finite_lanes(v));
    vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v));
  }
  float m = hmax(vmax);
  bool finite = _mm256_movemask_ps(bad) == 0;
  for (; k < K; ++k) {
    const float v = scalar_smoothed(x, inv, k);
    if (!std::isfinite(v)) finite = false;
    m = std::fmax(m, std::fabs(v));
  }
  *out = m;
  return finite;
}

// The low byte of each of 8 int32 lanes, in order.
inline void store_low_bytes(__m256i c, uint8_t* dst) {
  const __m256i pick = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                        0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
  const __m256i b = _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(c, pick),
                                                _mm256_setr_epi32(0, 4, 1, 1, 1, 1, 1, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(dst), _mm256_castsi256_si128(b));
}

// v / s rounded as a division rounds, from y = 1/s (see reciprocal_division.h).
inline __m256 divide_by_reciprocal(__m256 v, __m256 s, __m256 y) {
  const __m256 q = _mm256_mul_ps(v, y);
  const __m256 r = _mm256_fnmadd_ps(q, s, v);  // v - q * s, exact
  const __m256 abs_q = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), q);
  const __m256 small = _mm256_cmp_ps(abs_q, _mm256_set1_ps(kReciprocalDivisionLimit), _CMP_LT_OQ);
  return _mm256_blendv_ps(q, _mm256_fmadd_ps(r, y, q), small);
}

// Codes clamp(rne(v / scale) + zp, lo, hi) of one row, plus `shift`, as bytes; false if a
// value is NaN or Inf (only looked at when `check`).
bool encode_row(const float* x, const float* inv, int64_t K, float scale, float zp, float lo,
                float hi, int32_t shift, bool check, uint8_t* q) {
  const __m256 vs = _mm256_set1_ps(scale), vz = _mm256_set1_ps(zp), vy = _mm256_set1_ps(1.0f / scale);
  const __m256 vlo = _mm256_set1_ps(lo), vhi = _mm256_set1_ps(hi);
  const __m256i vshift = _mm256_set1_epi32(shift);
  const bool by_reciprocal = reciprocal_division_exact(scale);
  __m256 bad = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    const __m256 v = load_smoothed(x, inv, k);
    if (check) bad = _mm256_or_ps(bad, not_finite_lanes(v));
    const __m256 d = by_reciprocal ? divide_by_reciprocal(v, vs, vy) : _mm256_div_ps(v, vs);
    __m256 r = _mm256_round_ps(d, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    r = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(r, vz), vlo), vhi);
    store_low_bytes(_mm256_add_epi32(_mm256_cvttps_epi32(r), vshift), q + k);
  }
  bool finite = _mm256_movemask_ps(bad) == 0;
  for (; k < K; ++k) {
    const float v = scalar_smoothed(x, inv, k);
    if (check && !std::isfinite(v)) finite = false;
    const float r = std::fmin(std::fmax(std::nearbyint(v / scale) + zp, lo), hi);
    q[k] = static_cast<uint8_t>(static_cast<int32_t>(r) + shift);
  }
  return finite;
}

}  // namespace

bool quantize_per_token_avx2(const TensorView& x, const TensorView* inv_smooth,
                             const TensorView& q, const TensorView& scales) {
  if (best_isa() < Isa::kAVX2) return false;
  const int64_t M = x.shape[0], K = x.shape[1];
  const float* inv = inv_smooth ? inv_smooth->ptr<float>() : nullptr;
  const int32_t shift = q.dtype == DType::kUInt8 ? 128 : 0;  // u8: the same codes + 128
  parallel_for(M, activation_row_grain(K), [&](int64_t b, int64_t e) {
    for (int64_t row = b; row < e; ++row) {
      const float* xr = x.ptr<float>() + row * K;
      float amax;
      if (!row_absmax(xr, inv, K, &amax)) throw_activation_not_finite(row);
      const float scale = amax > 0.0f ? amax / 127.0f : 1.0f;
      scales.ptr<float>()[row] = scale;
      encode_row(xr, inv, K, scale, 0.0f, -127.0f, 127.0f, shift, false,
                 static_cast<uint8_t*>(q.data) + row * K);
    }
  });
  return true;
}

bool quantize_static_avx2(const TensorView& x, const TensorView* inv_smooth, float scale,
                          int32_t zero_point, const TensorView& q) {
  if (best_isa() < Isa::kAVX2) return false;
  const int64_t M = x.shape[0], K = x.shape[1];
  const float* inv = inv_smooth ? inv_smooth->ptr<float>() : nullptr;
  const bool is_u8 = q.dtype == DType::kUInt8;
  const float lo = is_u8 ? 0.0f : -128.0f, hi = is_u8 ? 255.0f : 127.0f;
  auto encode = [&](int64_t first, int64_t n) {
    return encode_row(x.ptr<float>() + first, inv, n, scale, static_cast<float>(zero_point), lo, hi, 0,
                      true, static_cast<uint8_t*>(q.data) + first);
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
