// AVX2 W4A8 on linear_w4a8_pack's copy (this file is compiled with -mavx2 -mfma): each
// 16-row panel as two halves of 8 lanes (the first and second 32 bytes of every step),
// vpmaddubsw + vpmaddwd, up to 4 tokens per pass. Layout and driver: w4a8_interleaved.h.
#include <immintrin.h>

#include "half.h"
#include "tensorslim/gemm_w4a8.h"
#include "tensorslim/quantize.h"
#include "w4a8_interleaved.h"
#include "w4a8_relayout_avx2.h"

namespace tensorslim {
namespace cpu {
namespace {

constexpr int kMaxTokens = 4;
constexpr int kHalfRows = 8;

inline __m256i broadcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// Tokens m .. m + T - 1 of rows n0 + 8h .. of half h (rows_h of them real).
template <int T>
inline void tokens256(const W4A8Args& a, const Acts& x, const PackedShape& sh, const uint8_t* panel,
                      int h, int64_t n0, int64_t rows_h, int64_t m) {
  const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  const int8_t* xr[T];
  __m256 facc[T];
  for (int t = 0; t < T; ++t) {
    xr[t] = x.q + (m + t) * x.Kp;
    facc[t] = _mm256_setzero_ps();
  }
  const uint8_t* codes = panel + h * 32;
  const float* scales = reinterpret_cast<const float*>(panel + sh.scales_at) + h * kHalfRows;
  for (int64_t g = 0; g < sh.groups; ++g) {
    __m256i acc[T];
    for (int t = 0; t < T; ++t) acc[t] = _mm256_setzero_si256();
    const int64_t j0 = g * sh.gsteps, j1 = j0 + sh.group_steps(g);
    for (int64_t j = j0; j < j1; ++j) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + j * 64));
      const __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
      for (int t = 0; t < T; ++t) {  // both halves' pair sums fit int16: 2 * 2 * 15 * 128 < 2^15
        const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, broadcast4(xr[t] + j * 8)),
                                           _mm256_maddubs_epi16(hi, broadcast4(xr[t] + j * 8 + 4)));
        acc[t] = _mm256_add_epi32(acc[t], _mm256_madd_epi16(p, ones));
      }
    }
    const __m256i o = a.zero_points
                          ? _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(
                                panel + sh.zps_at + g * kPackedRows + h * kHalfRows)))
                          : _mm256_set1_epi32(8);
    const __m256 s = _mm256_loadu_ps(scales + g * kPackedRows);
    for (int t = 0; t < T; ++t) {  // d = sum(u * q) - o * sum(q), exact; acc = acc + float(d) * scale
      const __m256i sum = _mm256_set1_epi32(x.sums[(m + t) * sh.groups + g]);
      const __m256 d = _mm256_cvtepi32_ps(_mm256_sub_epi32(acc[t], _mm256_mullo_epi32(o, sum)));
      facc[t] = _mm256_add_ps(facc[t], _mm256_mul_ps(d, s));
    }
  }
  alignas(32) float bias[kHalfRows] = {};
  if (a.bias)
    for (int64_t r = 0; r < rows_h; ++r) bias[r] = a.bias[n0 + r];
  for (int t = 0; t < T; ++t) {
    __m256 y = _mm256_mul_ps(facc[t], _mm256_set1_ps(a.act_scales[m + t]));
    if (a.bias) y = _mm256_add_ps(y, _mm256_load_ps(bias));  // no bias: no + 0 (-0 stays)
    const int64_t at = (m + t) * a.ldo + n0;
    alignas(32) float tmp[kHalfRows];
    _mm256_store_ps(tmp, y);
    if (!a.out_bf16) {
      if (rows_h == kHalfRows) _mm256_storeu_ps(static_cast<float*>(a.out) + at, y);
      else std::memcpy(static_cast<float*>(a.out) + at, tmp, rows_h * sizeof(float));
    } else {
      uint16_t* o16 = static_cast<uint16_t*>(a.out) + at;
      for (int64_t r = 0; r < rows_h; ++r) o16[r] = float_to_bf16(tmp[r]);
    }
  }
}

struct Packed256 {
  static constexpr int64_t kTokens = kMaxTokens;
  static void relayout_row(const int8_t* src, int64_t K, int64_t Kp, int8_t* dst) { relayout_row256(src, K, Kp, dst); }
  static void panel(const W4A8Args& a, const Acts& x, const PackedShape& sh, const uint8_t* p,
                    int64_t n0, int64_t rows, int64_t m0, int64_t m1) {
    for (int h = 0; h < 2 && rows > h * kHalfRows; ++h) {
      const int64_t nh = n0 + h * kHalfRows, rows_h = std::min<int64_t>(kHalfRows, rows - h * kHalfRows);
      switch (m1 - m0) {
        case 4: tokens256<4>(a, x, sh, p, h, nh, rows_h, m0); break;
        case 3: tokens256<3>(a, x, sh, p, h, nh, rows_h, m0); break;
        case 2: tokens256<2>(a, x, sh, p, h, nh, rows_h, m0); break;
        case 1: tokens256<1>(a, x, sh, p, h, nh, rows_h, m0); break;
        default: break;
      }
    }
  }
};

}  // namespace

bool linear_w4a8_packed_avx2(const W4A8Args& a, const uint8_t* packed) {
  if (active_isa() < Isa::kAVX2) return false;
  w4a8_packed_drive<Packed256>(a, packed);
  return true;
}

}  // namespace cpu
}  // namespace tensorslim
