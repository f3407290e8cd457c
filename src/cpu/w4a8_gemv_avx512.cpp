// AVX-512 W4A8 for a few tokens (this file is compiled with -mavx512f/bw/vl/dq; VNNI is
// enabled per function): 16 packed rows read side by side, 128 codes (64 bytes) per step.
// Layout and driver: w4a8_gemv.h.
#include <immintrin.h>

#include "half.h"
#include "tensorslim/gemm_w4a8.h"
#include "tensorslim/quantize.h"
#include "w4a8_gemv.h"

namespace tensorslim {
namespace cpu {
namespace {

constexpr int kRows = 16;
constexpr int64_t kChunk = 128;
constexpr int64_t kBytes = kChunk / 2;

inline __mmask64 bytes_mask(int64_t n) {
  if (n <= 0) return 0;
  return n >= 64 ? ~__mmask64{0} : (__mmask64{1} << n) - 1;
}

// acc + the lane sums of lo * xe + hi * xo (u8 x s8, exact).
struct PairVnni {
  __attribute__((target("avx512vnni"))) static inline __m512i step(__m512i acc, __m512i lo, __m512i xe,
                                                                    __m512i hi, __m512i xo) {
    return _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(acc, lo, xe), hi, xo);
  }
};
struct PairBW {  // both halves' pair sums fit int16: 2 * 2 * 15 * 128 < 2^15
  static inline __m512i step(__m512i acc, __m512i lo, __m512i xe, __m512i hi, __m512i xo) {
    const __m512i p = _mm512_add_epi16(_mm512_maddubs_epi16(lo, xe), _mm512_maddubs_epi16(hi, xo));
    return _mm512_add_epi32(acc, _mm512_madd_epi16(p, _mm512_set1_epi16(1)));
  }
};

// out[j] lane r = the sum of v[r]'s lanes of group j: all 16 (GPC 1), lanes 8j .. 8j+7
// (GPC 2: groups of 64 codes) or 4j .. 4j+3 (GPC 4: groups of 32), one 128-bit block each.
template <int GPC>
inline void row_sums(__m512i v[16], __m512i out[GPC]) {
  __m512i p[8], q[4], r[2];
  for (int i = 0; i < 8; ++i)  // per 128-bit block: rows 2i, 2i+1, 2i, 2i+1
    p[i] = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]),
                            _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i)  // per block b: rows 4i .. 4i+3, block b's lanes summed
    q[i] = _mm512_add_epi32(_mm512_unpacklo_epi64(p[2 * i], p[2 * i + 1]),
                            _mm512_unpackhi_epi64(p[2 * i], p[2 * i + 1]));
  if constexpr (GPC == 4) {  // out[b] = block b of q[0], q[1], q[2], q[3]
    // blocks 0-1 (0x44) and 2-3 (0xEE) of two q's side by side, then every other block
    const __m512i a0 = _mm512_shuffle_i32x4(q[0], q[1], 0x44), a1 = _mm512_shuffle_i32x4(q[2], q[3], 0x44);
    const __m512i b0 = _mm512_shuffle_i32x4(q[0], q[1], 0xEE), b1 = _mm512_shuffle_i32x4(q[2], q[3], 0xEE);
    out[0] = _mm512_shuffle_i32x4(a0, a1, 0x88);
    out[1] = _mm512_shuffle_i32x4(a0, a1, 0xDD);
    out[2] = _mm512_shuffle_i32x4(b0, b1, 0x88);
    out[3] = _mm512_shuffle_i32x4(b0, b1, 0xDD);
    return;
  }
  for (int i = 0; i < 2; ++i)  // blocks 0-1: rows 8i .. 8i+3, blocks 2-3: rows 8i+4 .. 8i+7, per half
    r[i] = _mm512_add_epi32(_mm512_shuffle_i32x4(q[2 * i], q[2 * i + 1], 0x88),
                            _mm512_shuffle_i32x4(q[2 * i], q[2 * i + 1], 0xDD));
  const __m512i lo = _mm512_shuffle_i32x4(r[0], r[1], 0x88), hi = _mm512_shuffle_i32x4(r[0], r[1], 0xDD);
  if constexpr (GPC == 2) {
    out[0] = lo;
    out[1] = hi;
  } else {
    out[0] = _mm512_add_epi32(lo, hi);
  }
}

// Tokens m and m + 1 on 8 rows (w[0..7], the first at row n0, `rows` of them real): lanes
// 0-7 hold token m's outputs, 8-15 token m + 1's, so each chunk is loaded and unpacked once
// for both. `line0` is the first of the next block's lines these steps prefetch.
template <int GPC, class Pair>
__attribute__((always_inline)) inline void two_tokens512(const W4A8Args& a, const GemvActs& x,
                                                         const uint8_t* const* w, int64_t n0, int64_t rows,
                                                         int64_t m, const char* next, int line0) {
  const int64_t row_bytes = (a.K + 1) / 2;
  const __m512i low = _mm512_set1_epi8(0x0F);
  const __m512i flip = _mm512_set1_epi8(a.zero_points ? 0 : 8);
  const __mmask16 keep8 = static_cast<__mmask16>((1u << rows) - 1);
  const __mmask16 keep = static_cast<__mmask16>(keep8 | keep8 << 8);
  const __m512i row_of_lane = _mm512_and_si512(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32(7));
  const __m512i srow = _mm512_mullo_epi32(row_of_lane, _mm512_set1_epi32(static_cast<int>(x.groups)));
  const int8_t* xq0 = x.q + m * x.chunks * kChunk;
  const int8_t* xq1 = xq0 + x.chunks * kChunk;
  alignas(64) int32_t zp[kRows];
  __m512 facc = _mm512_setzero_ps();
  for (int64_t u = 0; u < x.units; ++u) {
    __m512i acc[kRows];
    for (int r = 0; r < kRows; ++r) acc[r] = _mm512_setzero_si512();
    const int64_t c1 = std::min(x.chunks, (u + 1) * x.gchunks);
    for (int64_t c = u * x.gchunks; c < c1; ++c) {
      const __m512i xe0 = _mm512_loadu_si512(xq0 + c * kChunk), xo0 = _mm512_loadu_si512(xq0 + c * kChunk + kBytes);
      const __m512i xe1 = _mm512_loadu_si512(xq1 + c * kChunk), xo1 = _mm512_loadu_si512(xq1 + c * kChunk + kBytes);
      const __mmask64 in = bytes_mask(row_bytes - c * kBytes);
      for (int r = 0; r < 8; ++r) {
        _mm_prefetch(next + (c * kRows + line0 + r) * 64, _MM_HINT_T1);
        const __m512i v = _mm512_maskz_loadu_epi8(in, w[r] + c * kBytes);
        const __m512i lo = _mm512_ternarylogic_epi32(v, flip, low, 0x28);
        const __m512i hi = _mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 4), flip, low, 0x28);
        acc[r] = Pair::step(acc[r], lo, xe0, hi, xo0);
        acc[8 + r] = Pair::step(acc[8 + r], lo, xe1, hi, xo1);
      }
    }
    __m512i dots[GPC];
    row_sums<GPC>(acc, dots);
    for (int j = 0; j < GPC && u * GPC + j < x.groups; ++j) {  // the unit's groups, in order
      const int64_t g = u * GPC + j;
      __m512i o = _mm512_set1_epi32(8);
      if (a.zero_points) {
        for (int i = 0; i < kRows; ++i) zp[i] = a.zero_points[(n0 + std::min<int64_t>(i & 7, rows - 1)) * x.groups + g];
        o = _mm512_load_si512(zp);
      }
      const __m512i sums = _mm512_mask_blend_epi32(0xFF00, _mm512_set1_epi32(x.sums[m * x.groups + g]),
                                                   _mm512_set1_epi32(x.sums[(m + 1) * x.groups + g]));
      const __m512i d = _mm512_sub_epi32(dots[j], _mm512_mullo_epi32(o, sums));
      const __m512 s = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), keep, srow, a.scales + n0 * x.groups + g, 4);
      facc = _mm512_add_ps(facc, _mm512_mul_ps(_mm512_cvtepi32_ps(d), s));
    }
  }
  const __m512 as = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(a.act_scales[m]), _mm512_set1_ps(a.act_scales[m + 1]));
  __m512 y = _mm512_mul_ps(facc, as);
  if (a.bias) {  // no bias: no + 0 (-0 stays)
    const __m512 b8 = _mm512_maskz_loadu_ps(keep8, a.bias + n0);
    y = _mm512_add_ps(y, _mm512_shuffle_f32x4(b8, b8, 0x44));  // rows 0-7 in both halves
  }
  for (int t = 0; t < 2; ++t) {
    const int64_t at = (m + t) * a.ldo + n0;
    const __m256 yt = t == 0 ? _mm512_castps512_ps256(y) : _mm512_extractf32x8_ps(y, 1);
    if (!a.out_bf16) {
      _mm256_mask_storeu_ps(static_cast<float*>(a.out) + at, static_cast<__mmask8>(keep8), yt);
    } else {
      alignas(32) float tmp[8];
      _mm256_store_ps(tmp, yt);
      uint16_t* o16 = static_cast<uint16_t*>(a.out) + at;
      for (int64_t r = 0; r < rows; ++r) o16[r] = float_to_bf16(tmp[r]);
    }
  }
}

template <int GPC, class Pair>
__attribute__((always_inline)) inline void block512(const W4A8Args& a, const GemvActs& x, int64_t n0,
                                                    int64_t rows) {
  const int64_t row_bytes = (a.K + 1) / 2;
  const __m512i low = _mm512_set1_epi8(0x0F);
  // int4: u = nibble XOR 8, offset 8; uint4: u = code.
  const __m512i flip = _mm512_set1_epi8(a.zero_points ? 0 : 8);
  const __mmask16 keep = static_cast<__mmask16>(rows >= kRows ? 0xFFFF : (1u << rows) - 1);
  const __m512i srow = _mm512_mullo_epi32(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32(static_cast<int>(x.groups)));
  const uint8_t* w[kRows];  // rows past N read the last row again; their lanes are not stored
  for (int r = 0; r < kRows; ++r) w[r] = a.qweight + (n0 + std::min<int64_t>(r, rows - 1)) * a.ldw;
  alignas(64) int32_t zp[kRows];
  // The next block's rows (contiguous when ldw is the row size), one line per step, to L2: a
  // linear stream the memory system serves faster than 16 short ones.
  const char* next = reinterpret_cast<const char*>(a.qweight + (n0 + kRows) * a.ldw);
  int64_t m = 0;
  for (; m + 2 <= a.M; m += 2)  // token pairs share each chunk's load and unpacking
    for (int h = 0; h < 2; ++h)
      if (rows > 8 * h)
        two_tokens512<GPC, Pair>(a, x, w + 8 * h, n0 + 8 * h, std::min<int64_t>(8, rows - 8 * h), m, next, 8 * h);
  for (; m < a.M; ++m) {
    const int8_t* xq = x.q + m * x.chunks * kChunk;
    __m512 facc = _mm512_setzero_ps();
    for (int64_t u = 0; u < x.units; ++u) {
      __m512i acc[kRows];
      for (int r = 0; r < kRows; ++r) acc[r] = _mm512_setzero_si512();
      const int64_t c1 = std::min(x.chunks, (u + 1) * x.gchunks);
      for (int64_t c = u * x.gchunks; c < c1; ++c) {
        const __m512i xe = _mm512_loadu_si512(xq + c * kChunk);
        const __m512i xo = _mm512_loadu_si512(xq + c * kChunk + kBytes);
        const __mmask64 in = bytes_mask(row_bytes - c * kBytes);
        for (int r = 0; r < kRows; ++r) {
          _mm_prefetch(reinterpret_cast<const char*>(next + (c * kRows + r) * 64), _MM_HINT_T1);
          const __m512i v = _mm512_maskz_loadu_epi8(in, w[r] + c * kBytes);
          // (nibble ^ flip) & 0x0F in one op: ternary-logic table 0x28 = (A ^ B) & C
          acc[r] = Pair::step(acc[r], _mm512_ternarylogic_epi32(v, flip, low, 0x28), xe,
                              _mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 4), flip, low, 0x28), xo);
        }
      }
      __m512i dots[GPC];
      row_sums<GPC>(acc, dots);
      for (int j = 0; j < GPC && u * GPC + j < x.groups; ++j) {  // the unit's groups, in order
        const int64_t g = u * GPC + j;
        __m512i o = _mm512_set1_epi32(8);
        if (a.zero_points) {
          for (int r = 0; r < kRows; ++r) zp[r] = r < rows ? a.zero_points[(n0 + r) * x.groups + g] : 0;
          o = _mm512_load_si512(zp);
        }
        const __m512i d = _mm512_sub_epi32(dots[j], _mm512_mullo_epi32(o, _mm512_set1_epi32(x.sums[m * x.groups + g])));
        const __m512 s = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), keep, srow, a.scales + n0 * x.groups + g, 4);
        facc = _mm512_add_ps(facc, _mm512_mul_ps(_mm512_cvtepi32_ps(d), s));
      }
    }
    __m512 y = _mm512_mul_ps(facc, _mm512_set1_ps(a.act_scales[m]));
    if (a.bias) y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(keep, a.bias + n0));  // no bias: no + 0 (-0 stays)
    const int64_t at = m * a.ldo + n0;
    if (!a.out_bf16) {
      _mm512_mask_storeu_ps(static_cast<float*>(a.out) + at, keep, y);
    } else {
      alignas(64) float t[kRows];
      _mm512_store_ps(t, y);
      uint16_t* o16 = static_cast<uint16_t*>(a.out) + at;
      for (int64_t r = 0; r < rows; ++r) o16[r] = float_to_bf16(t[r]);
    }
  }
}

// vpdpbusd is inlined only into a function compiled for VNNI.
template <int GPC>
__attribute__((target("avx512vnni"))) void block_vnni(const W4A8Args& a, const GemvActs& x, int64_t n0,
                                                      int64_t rows) {
  block512<GPC, PairVnni>(a, x, n0, rows);
}
template <int GPC>
void block_bw(const W4A8Args& a, const GemvActs& x, int64_t n0, int64_t rows) {
  block512<GPC, PairBW>(a, x, n0, rows);
}

template <bool VNNI>
struct Gemv512 {
  static constexpr int kRows = cpu::kRows;
  static constexpr int64_t kChunk = cpu::kChunk;
  static void block(const W4A8Args& a, const GemvActs& x, int64_t n0, int64_t rows) {
    switch (x.gpc) {  // groups per chunk: 1, or 2 / 4 for groups of 64 / 32
      case 1: return VNNI ? block_vnni<1>(a, x, n0, rows) : block_bw<1>(a, x, n0, rows);
      case 2: return VNNI ? block_vnni<2>(a, x, n0, rows) : block_bw<2>(a, x, n0, rows);
      default: return VNNI ? block_vnni<4>(a, x, n0, rows) : block_bw<4>(a, x, n0, rows);
    }
  }
};

}  // namespace

bool linear_w4a8_gemv_avx512(const W4A8Args& a) {
  if (active_isa() != Isa::kAVX512 || !w4a8_gemv_fits(a.K, a.group, kChunk)) return false;
  if (w4a8_uses_vnni()) w4a8_gemv_drive<Gemv512<true>>(a);
  else w4a8_gemv_drive<Gemv512<false>>(a);
  return true;
}

}  // namespace cpu
}  // namespace tensorslim
