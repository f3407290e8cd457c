// AVX2 W4A8 on linear_w4a8_pack's copy (this file is compiled with -mavx2 -mfma): each
// 16-row panel as two halves of 8 lanes (the first and second 32 bytes of every step),
// vpmaddubsw + vpmaddwd, or vpdpbusd where the AVX2 kernels have it (cpu::avx2_vnni), up to 3
// (vpdpbusd: 4) tokens per pass. Layout and driver: w4a8_interleaved.h.
#include <immintrin.h>

#include <type_traits>

#include "half.h"
#include "tensorslim/gemm_w4a8.h"
#include "tensorslim/quantize.h"
#include "vnni_dot.h"
#include "w4a8_interleaved.h"
#include "w4a8_relayout_avx2.h"

namespace tensorslim {
namespace cpu {
namespace {

// Tokens per pass on vpmaddubsw: 3 x 2 int32 chains, the step's 4 unpacked halves and both
// broadcasts fit the 16 ymm registers (4 tokens spilled: MiniLM's 384 x 384 at 8-32 tokens
// 0.87x the panel kernels; 2 tokens: 4096 x 4096 at 128 tokens 0.91x; 3: 1.01-1.79x at every
// shape measured). On vpdpbusd 4 (Dots).
constexpr int kMaxTokens = 4;
constexpr int kHalfRows = 8;

inline __m256i broadcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// acc + the products of the low nibbles with the even codes and the high ones with the odd
// codes, 4 per lane each, as pair sums (both fit int16: 2 * 2 * 15 * 128 < 2^15); one chain
// per token and half, whose add takes a cycle.
struct MaddPairs {
  static constexpr int kTokens = 3;
  static constexpr int chains(int) { return 1; }
  static void step(__m256i (&acc)[1], __m256i lo, __m256i hi, __m256i xe, __m256i xo) {
    const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xe), _mm256_maddubs_epi16(hi, xo));
    acc[0] = _mm256_add_epi32(acc[0], _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
  }
};
// The same as two vpdpbusd (VnniVex256 / VnniEvex256). vpdpbusd waits on its accumulator for
// several cycles, so passes of 1-2 tokens keep the low and high nibbles' sums in two chains;
// 4 tokens (8 chains, 4 halves, 2 broadcasts: 14 registers) chain both. A / B, 4096 x 4096,
// EVEX form on Zen 4, against vpmaddubsw: 2 tokens in two chains per pass 1.14 / 1.34 / 1.45 /
// 1.28x at 1 / 2 / 32 / 128 tokens; 4 tokens in one chain 0.95 / 1.16 / 1.63 / 1.64x.
template <class Vnni>
struct Dots {
  static constexpr int kTokens = 4;
  static constexpr int chains(int tokens) { return tokens <= 2 ? 2 : 1; }
  static void step(__m256i (&acc)[1], __m256i lo, __m256i hi, __m256i xe, __m256i xo) {
    acc[0] = Vnni::dpbusd(Vnni::dpbusd(acc[0], lo, xe), hi, xo);
  }
  static void step(__m256i (&acc)[2], __m256i lo, __m256i hi, __m256i xe, __m256i xo) {
    acc[0] = Vnni::dpbusd(acc[0], lo, xe);
    acc[1] = Vnni::dpbusd(acc[1], hi, xo);
  }
};

// Tokens m .. m + T - 1 of the panel's rows n0 .. n0 + rows - 1: each step's two 32-byte
// halves (rows 0-7, 8-15) in one pass, so the panel streams in once and each token's
// activations are broadcast once for both (two passes, one per half, ran 4096 x 4096 at 1
// token 0.84-0.88x the row-wise GEMV with the weights in memory).
template <int T, bool Prefetch, class Dot>
inline void tokens256(const W4A8Args& a, const Acts& x, const PackedShape& sh, const uint8_t* panel,
                      int64_t n0, int64_t rows, int64_t m) {
  const __m256i low = _mm256_set1_epi8(0x0F);
  const int8_t* xr[T];
  __m256 facc[T][2];
  for (int t = 0; t < T; ++t) {
    xr[t] = x.q + (m + t) * x.Kp;
    facc[t][0] = facc[t][1] = _mm256_setzero_ps();
  }
  const float* scales = reinterpret_cast<const float*>(panel + sh.scales_at);
  for (int64_t g = 0; g < sh.groups; ++g) {
    constexpr int C = Dot::chains(T);
    __m256i acc[T][2][C];
    for (int t = 0; t < T; ++t)
      for (int h = 0; h < 2; ++h)
        for (int c = 0; c < C; ++c) acc[t][h][c] = _mm256_setzero_si256();
    const int64_t j0 = g * sh.gsteps, j1 = j0 + sh.group_steps(g);
    for (int64_t j = j0; j < j1; ++j) {
      if constexpr (Prefetch) _mm_prefetch(reinterpret_cast<const char*>(panel + j * 64 + kPrefetchAhead), _MM_HINT_T1);
      __m256i lo[2], hi[2];
      for (int h = 0; h < 2; ++h) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel + j * 64 + h * 32));
        lo[h] = _mm256_and_si256(v, low);
        hi[h] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
      }
      for (int t = 0; t < T; ++t) {
        const __m256i xe = broadcast4(xr[t] + j * 8), xo = broadcast4(xr[t] + j * 8 + 4);
        for (int h = 0; h < 2; ++h) Dot::step(acc[t][h], lo[h], hi[h], xe, xo);
      }
    }
    for (int h = 0; h < 2; ++h) {
      const __m256i o = a.zero_points
                            ? _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(
                                  panel + sh.zps_at + g * kPackedRows + h * kHalfRows)))
                            : _mm256_set1_epi32(8);
      const __m256 s = _mm256_loadu_ps(scales + g * kPackedRows + h * kHalfRows);
      for (int t = 0; t < T; ++t) {  // d = sum(u * q) - o * sum(q), exact; acc = acc + float(d) * scale
        const __m256i sum = _mm256_set1_epi32(x.sums[(m + t) * sh.groups + g]);
        __m256i dot = acc[t][h][0];
        if constexpr (C == 2) dot = _mm256_add_epi32(dot, acc[t][h][1]);
        const __m256 d = _mm256_cvtepi32_ps(_mm256_sub_epi32(dot, _mm256_mullo_epi32(o, sum)));
        facc[t][h] = _mm256_add_ps(facc[t][h], _mm256_mul_ps(d, s));
      }
    }
  }
  alignas(32) float bias[kPackedRows] = {};
  if (a.bias)
    for (int64_t r = 0; r < rows; ++r) bias[r] = a.bias[n0 + r];
  for (int t = 0; t < T; ++t)
    for (int h = 0; h < 2 && h * kHalfRows < rows; ++h) {
      const int64_t rows_h = std::min<int64_t>(kHalfRows, rows - h * kHalfRows);
      __m256 y = _mm256_mul_ps(facc[t][h], _mm256_set1_ps(a.act_scales[m + t]));
      if (a.bias) y = _mm256_add_ps(y, _mm256_load_ps(bias + h * kHalfRows));  // no bias: no + 0 (-0 stays)
      const int64_t at = (m + t) * a.ldo + n0 + h * kHalfRows;
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

// tokens256 with or without the first pass's prefetches (no branch in the step loop).
template <int T, class Dot>
inline void pass256(const W4A8Args& a, const Acts& x, const PackedShape& sh, const uint8_t* p, int64_t n0,
                    int64_t rows, int64_t m, bool first) {
  if (first) tokens256<T, true, Dot>(a, x, sh, p, n0, rows, m);
  else tokens256<T, false, Dot>(a, x, sh, p, n0, rows, m);
}

template <class Dot>
struct Packed256 {
  static constexpr int64_t kTokens = Dot::kTokens;
  static void relayout_row(const int8_t* src, int64_t K, int64_t Kp, int8_t* dst) { relayout_row256(src, K, Kp, dst); }
  static void panel(const W4A8Args& a, const Acts& x, const PackedShape& sh, const uint8_t* p,
                    int64_t n0, int64_t rows, int64_t m0, int64_t m1, bool first) {
    static_assert(kMaxTokens == 4 && Dot::kTokens <= kMaxTokens, "one case per token count");
    switch (m1 - m0) {
      case 4:
        if constexpr (Dot::kTokens >= 4) pass256<4, Dot>(a, x, sh, p, n0, rows, m0, first);
        return;
      case 3: return pass256<3, Dot>(a, x, sh, p, n0, rows, m0, first);
      case 2: return pass256<2, Dot>(a, x, sh, p, n0, rows, m0, first);
      case 1: return pass256<1, Dot>(a, x, sh, p, n0, rows, m0, first);
      default: return;
    }
  }
};

}  // namespace

bool linear_w4a8_packed_avx2(const W4A8Args& a, const uint8_t* packed) {
  if (active_isa() < Isa::kAVX2) return false;
  with_vnni256(avx2_vnni(), [&](auto dot) {
    using V = decltype(dot);
    w4a8_packed_drive<Packed256<std::conditional_t<std::is_same_v<V, NoVnni>, MaddPairs, Dots<V>>>>(a, packed);
  });
  return true;
}

}  // namespace cpu
}  // namespace tensorslim
