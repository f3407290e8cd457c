// AVX-512 W4A8 on linear_w4a8_pack's copy (this file is compiled with -mavx512f/bw/vl/dq;
// VNNI is enabled per function): a panel's 16 rows are the 16 lanes, up to 8 tokens per pass.
// Layout and driver: w4a8_interleaved.h.
#include <immintrin.h>

#include "tensorslim/gemm_w4a8.h"
#include "tensorslim/quantize.h"
#include "vnni_dot.h"
#include "w4a8_interleaved.h"
#include "w4a8_common_avx512.h"

namespace tensorslim {
namespace cpu {
namespace {

constexpr int kMaxTokens = 8;  // tokens per pass: 8 x 2 int32 chains + 8 fp32 sums in registers

inline __m512i broadcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// acc[0] += lo . xe, acc[1] += hi . xo per lane (u8 x s8, four products each, exact).
struct StepVnni {  // two chains: each vpdpbusd waits only on its own
  __attribute__((target("avx512vnni"))) static inline void step(__m512i acc[2], __m512i lo, __m512i xe,
                                                                 __m512i hi, __m512i xo) {
    acc[0] = dpbusd(acc[0], lo, xe);
    acc[1] = dpbusd(acc[1], hi, xo);
  }
};
struct StepBW {  // both halves' pair sums fit int16: 2 * 2 * 15 * 128 < 2^15
  static inline void step(__m512i acc[2], __m512i lo, __m512i xe, __m512i hi, __m512i xo) {
    const __m512i p = _mm512_add_epi16(_mm512_maddubs_epi16(lo, xe), _mm512_maddubs_epi16(hi, xo));
    acc[0] = _mm512_add_epi32(acc[0], _mm512_madd_epi16(p, _mm512_set1_epi16(1)));
  }
};

// Step j of tokens xr[0 .. T-1] into one set of chains.
template <int T, class Step, bool Prefetch>
__attribute__((always_inline)) inline void step_tokens(__m512i (&acc)[T][2], const uint8_t* panel,
                                                       const int8_t* const* xr, int64_t j, __m512i low) {
  if constexpr (Prefetch) _mm_prefetch(reinterpret_cast<const char*>(panel + j * 64 + kPrefetchAhead), _MM_HINT_T1);
  const __m512i v = _mm512_loadu_si512(panel + j * 64);
  const __m512i lo = _mm512_and_si512(v, low), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
  for (int t = 0; t < T; ++t) Step::step(acc[t], lo, broadcast4(xr[t] + j * 8), hi, broadcast4(xr[t] + j * 8 + 4));
}

// Tokens m .. m + T - 1 of the panel's rows n0 .. n0 + rows - 1. Below 4 tokens steps alternate
// between two sets of chains so that consecutive steps do not wait on each other.
template <int T, class Step, bool Prefetch>
__attribute__((always_inline)) inline void tokens512(const W4A8Args& a, const Acts& x,
                                                     const PackedShape& sh, const uint8_t* panel,
                                                     int64_t n0, int64_t rows, int64_t m) {
  const __m512i low = _mm512_set1_epi8(0x0F);
  const int8_t* xr[T];
  __m512 facc[T];
  for (int t = 0; t < T; ++t) {
    xr[t] = x.q + (m + t) * x.Kp;
    facc[t] = _mm512_setzero_ps();
  }
  const float* scales = reinterpret_cast<const float*>(panel + sh.scales_at);
  for (int64_t g = 0; g < sh.groups; ++g) {
    constexpr int P = T < 4 ? 2 : 1;
    __m512i acc[P][T][2];  // [step parity][token][low / high nibbles]
    for (int i = 0; i < P; ++i)
      for (int t = 0; t < T; ++t) acc[i][t][0] = acc[i][t][1] = _mm512_setzero_si512();
    const int64_t j0 = g * sh.gsteps, j1 = j0 + sh.group_steps(g);
    int64_t j = j0;
    if constexpr (P == 2)
      for (; j + 2 <= j1; j += 2) {
        step_tokens<T, Step, Prefetch>(acc[0], panel, xr, j, low);
        step_tokens<T, Step, Prefetch>(acc[P - 1], panel, xr, j + 1, low);
      }
    for (; j < j1; ++j) step_tokens<T, Step, Prefetch>(acc[0], panel, xr, j, low);
    const __m512i o = a.zero_points
                          ? _mm512_cvtepu8_epi32(_mm_loadu_si128(
                                reinterpret_cast<const __m128i*>(panel + sh.zps_at + g * kPackedRows)))
                          : _mm512_set1_epi32(8);
    const __m512 s = _mm512_loadu_ps(scales + g * kPackedRows);
    for (int t = 0; t < T; ++t) {  // d = sum(u * q) - o * sum(q), exact; acc = acc + float(d) * scale
      __m512i dot = _mm512_add_epi32(acc[0][t][0], acc[0][t][1]);
      if constexpr (P == 2) dot = _mm512_add_epi32(dot, _mm512_add_epi32(acc[P - 1][t][0], acc[P - 1][t][1]));
      const __m512i sum = _mm512_set1_epi32(x.sums[(m + t) * sh.groups + g]);
      const __m512 d = _mm512_cvtepi32_ps(_mm512_sub_epi32(dot, _mm512_mullo_epi32(o, sum)));
      facc[t] = _mm512_add_ps(facc[t], _mm512_mul_ps(d, s));
    }
  }
  store_tokens512(a, facc, n0, rows, m);
}

// tokens512 with or without the first pass's prefetches (a template argument, so the step
// loop carries no branch).
template <int T, class Step>
__attribute__((always_inline)) inline void pass512(const W4A8Args& a, const Acts& x, const PackedShape& sh,
                                                   const uint8_t* panel, int64_t n0, int64_t rows, int64_t m,
                                                   bool first) {
  if (first) tokens512<T, Step, true>(a, x, sh, panel, n0, rows, m);
  else tokens512<T, Step, false>(a, x, sh, panel, n0, rows, m);
}

template <class Step>
__attribute__((always_inline)) inline void panel512(const W4A8Args& a, const Acts& x,
                                                    const PackedShape& sh, const uint8_t* panel,
                                                    int64_t n0, int64_t rows, int64_t m0, int64_t m1,
                                                    bool first) {
  static_assert(kMaxTokens == 8, "one case per token count");
  switch (m1 - m0) {
    case 8: return pass512<8, Step>(a, x, sh, panel, n0, rows, m0, first);
    case 7: return pass512<7, Step>(a, x, sh, panel, n0, rows, m0, first);
    case 6: return pass512<6, Step>(a, x, sh, panel, n0, rows, m0, first);
    case 5: return pass512<5, Step>(a, x, sh, panel, n0, rows, m0, first);
    case 4: return pass512<4, Step>(a, x, sh, panel, n0, rows, m0, first);
    case 3: return pass512<3, Step>(a, x, sh, panel, n0, rows, m0, first);
    case 2: return pass512<2, Step>(a, x, sh, panel, n0, rows, m0, first);
    case 1: return pass512<1, Step>(a, x, sh, panel, n0, rows, m0, first);
    default: return;
  }
}

// vpdpbusd is inlined only into a function compiled for VNNI.
__attribute__((target("avx512vnni"))) void panel_vnni(const W4A8Args& a, const Acts& x,
                                                      const PackedShape& sh, const uint8_t* panel,
                                                      int64_t n0, int64_t rows, int64_t m0, int64_t m1,
                                                      bool first) {
  panel512<StepVnni>(a, x, sh, panel, n0, rows, m0, m1, first);
}

template <bool VNNI>
struct Packed512 {
  static constexpr int64_t kTokens = kMaxTokens;
  static void relayout_row(const int8_t* src, int64_t K, int64_t Kp, int8_t* dst) { relayout_row512(src, K, Kp, dst); }
  static void panel(const W4A8Args& a, const Acts& x, const PackedShape& sh, const uint8_t* p,
                    int64_t n0, int64_t rows, int64_t m0, int64_t m1, bool first) {
    if constexpr (VNNI) panel_vnni(a, x, sh, p, n0, rows, m0, m1, first);
    else panel512<StepBW>(a, x, sh, p, n0, rows, m0, m1, first);
  }
};

}  // namespace

bool linear_w4a8_packed_avx512(const W4A8Args& a, const uint8_t* packed) {
  if (active_isa() != Isa::kAVX512) return false;
  if (w4a8_uses_vnni()) w4a8_packed_drive<Packed512<true>>(a, packed);
  else w4a8_packed_drive<Packed512<false>>(a, packed);
  return true;
}

}  // namespace cpu
}  // namespace tensorslim
