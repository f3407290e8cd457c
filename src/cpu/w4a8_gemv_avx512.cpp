// AVX-512 W4A8 for a few tokens (this file is compiled with -mavx512f/bw/vl/dq; VNNI is
// enabled per function): 16 packed rows read side by side, 128 codes (64 bytes) per step.
// Layout and driver: w4a8_gemv.h.
#include <immintrin.h>

#include "aligned_buffer.h"
#include "half.h"
#include "tensorslim/gemm_w4a8.h"
#include "tensorslim/quantize.h"
#include "transpose16_avx512.h"
#include "vnni_dot.h"
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
    return dpbusd(dpbusd(acc, lo, xe), hi, xo);
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

// Tokens m .. m + T - 1 (T = 1 or 2) on RP = kRows / T rows (w[0..], the first at row n0, `rows`
// of them real): lane t * RP + r holds token m + t's output of row r, so with T = 2 each chunk is
// loaded and unpacked once for both tokens. `line0`: the first of the next block's lines
// (`next`) that these steps prefetch. scale_t: these rows' scales by group, RP of them per
// kRows floats (block_scales).
template <int T, int GPC, class Pair>
__attribute__((always_inline)) inline void tokens512(const W4A8Args& a, const GemvActs& x, const uint8_t* const* w,
                                                     int64_t n0, int64_t rows, int64_t m, const char* next,
                                                     int line0, const float* scale_t) {
  constexpr int RP = kRows / T;
  const int64_t row_bytes = (a.K + 1) / 2;
  const __m512i low = _mm512_set1_epi8(0x0F);
  // int4: u = nibble XOR 8, offset 8; uint4: u = code.
  const __m512i flip = _mm512_set1_epi8(a.zero_points ? 0 : 8);
  const __mmask16 keep_rows = static_cast<__mmask16>((1u << rows) - 1);
  const __mmask16 keep = T == 1 ? keep_rows : static_cast<__mmask16>(keep_rows | keep_rows << RP);
  const int8_t* xq[T];
  for (int t = 0; t < T; ++t) xq[t] = x.q + (m + t) * x.chunks * kChunk;
  alignas(64) int32_t zp[kRows];
  __m512 facc = _mm512_setzero_ps();
  for (int64_t u = 0; u < x.units; ++u) {
    __m512i acc[kRows];
    for (int r = 0; r < kRows; ++r) acc[r] = _mm512_setzero_si512();
    const int64_t c1 = std::min(x.chunks, (u + 1) * x.gchunks);
    for (int64_t c = u * x.gchunks; c < c1; ++c) {
      __m512i xe[T], xo[T];
      for (int t = 0; t < T; ++t) {
        xe[t] = _mm512_loadu_si512(xq[t] + c * kChunk);
        xo[t] = _mm512_loadu_si512(xq[t] + c * kChunk + kBytes);
      }
      const __mmask64 in = bytes_mask(row_bytes - c * kBytes);
      for (int r = 0; r < RP; ++r) {
        _mm_prefetch(next + (c * kRows + line0 + r) * 64, _MM_HINT_T1);
        const __m512i v = _mm512_maskz_loadu_epi8(in, w[r] + c * kBytes);
        // (nibble ^ flip) & 0x0F in one op: ternary-logic table 0x28 = (A ^ B) & C
        const __m512i lo = _mm512_ternarylogic_epi32(v, flip, low, 0x28);
        const __m512i hi = _mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 4), flip, low, 0x28);
        for (int t = 0; t < T; ++t) acc[t * RP + r] = Pair::step(acc[t * RP + r], lo, xe[t], hi, xo[t]);
      }
    }
    __m512i dots[GPC];
    row_sums<GPC>(acc, dots);
    for (int j = 0; j < GPC && u * GPC + j < x.groups; ++j) {  // the unit's groups, in order
      const int64_t g = u * GPC + j;
      __m512i o = _mm512_set1_epi32(8);
      if (a.zero_points) {
        for (int i = 0; i < kRows; ++i) zp[i] = a.zero_points[(n0 + std::min<int64_t>(i % RP, rows - 1)) * x.groups + g];
        o = _mm512_load_si512(zp);
      }
      __m512i sums = _mm512_set1_epi32(x.sums[m * x.groups + g]);
      if constexpr (T == 2) sums = _mm512_mask_set1_epi32(sums, 0xFF00, x.sums[(m + 1) * x.groups + g]);
      const __m512i d = _mm512_sub_epi32(dots[j], _mm512_mullo_epi32(o, sums));
      // T = 2: the 8 rows' scales in both halves
      const __m512 s = T == 1 ? _mm512_load_ps(scale_t + g * kRows)
                              : _mm512_broadcast_f32x8(_mm256_loadu_ps(scale_t + g * kRows));
      facc = _mm512_add_ps(facc, _mm512_mul_ps(_mm512_cvtepi32_ps(d), s));
    }
  }
  __m512 as = _mm512_set1_ps(a.act_scales[m]);
  if constexpr (T == 2) as = _mm512_mask_blend_ps(0xFF00, as, _mm512_set1_ps(a.act_scales[m + 1]));
  __m512 y = _mm512_mul_ps(facc, as);
  if (a.bias) {  // no bias: no + 0 (-0 stays)
    const __m512 b = _mm512_maskz_loadu_ps(keep_rows, a.bias + n0);
    y = _mm512_add_ps(y, T == 1 ? b : _mm512_shuffle_f32x4(b, b, 0x44));  // T = 2: rows 0-7 in both halves
  }
  alignas(64) float tmp[kRows];
  if (a.out_bf16) _mm512_store_ps(tmp, y);
  for (int t = 0; t < T; ++t) {
    const int64_t at = (m + t) * a.ldo + n0;
    if (!a.out_bf16) {
      if constexpr (T == 1) _mm512_mask_storeu_ps(static_cast<float*>(a.out) + at, keep, y);
      else _mm256_mask_storeu_ps(static_cast<float*>(a.out) + at, static_cast<__mmask8>(keep_rows),
                                 t == 0 ? _mm512_castps512_ps256(y) : _mm512_extractf32x8_ps(y, 1));
    } else {
      uint16_t* o16 = static_cast<uint16_t*>(a.out) + at;
      for (int64_t r = 0; r < rows; ++r) o16[r] = float_to_bf16(tmp[t * RP + r]);
    }
  }
}

// The block's scales by group: st[g * kRows + r] = scale of row n0 + r (rows past N repeat the
// last), so each group's 16 scales are one aligned load (a gather per group cost ~13% of
// batch 1, 4096 x 4096).
inline void block_scales(const W4A8Args& a, int64_t groups, int64_t n0, int64_t rows, float* st) {
  for (int64_t g0 = 0; g0 < groups; g0 += 16) {
    const __mmask16 in = groups - g0 >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (groups - g0)) - 1);
    __m512i v[16];
    for (int r = 0; r < kRows; ++r)
      v[r] = _mm512_maskz_loadu_epi32(in, a.scales + (n0 + std::min<int64_t>(r, rows - 1)) * groups + g0);
    transpose16(v);
    for (int64_t j = 0; j < 16 && g0 + j < groups; ++j) _mm512_store_si512(st + (g0 + j) * kRows, v[j]);
  }
}

template <int GPC, class Pair>
__attribute__((always_inline)) inline void block512(const W4A8Args& a, const GemvActs& x, int64_t n0,
                                                    int64_t rows) {
  const uint8_t* w[kRows];  // rows past N read the last row again; their lanes are not stored
  for (int r = 0; r < kRows; ++r) w[r] = a.qweight + (n0 + std::min<int64_t>(r, rows - 1)) * a.ldw;
  thread_local AlignedFloats scale_t;
  scale_t.resize((x.groups + 15) / 16 * 16 * kRows);
  block_scales(a, x.groups, n0, rows, scale_t.data());
  // The next block's rows (contiguous when ldw is the row size), one line per step, to L2: a
  // linear stream the memory system serves faster than 16 short ones.
  const char* next = reinterpret_cast<const char*>(a.qweight + (n0 + kRows) * a.ldw);
  int64_t m = 0;
  for (; m + 2 <= a.M; m += 2)  // token pairs share each chunk's load and unpacking
    for (int h = 0; h < 2; ++h)
      if (rows > 8 * h)
        tokens512<2, GPC, Pair>(a, x, w + 8 * h, n0 + 8 * h, std::min<int64_t>(8, rows - 8 * h), m, next, 8 * h,
                                scale_t.data() + 8 * h);
  for (; m < a.M; ++m) tokens512<1, GPC, Pair>(a, x, w, n0, rows, m, next, 0, scale_t.data());
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
