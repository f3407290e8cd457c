// AVX2 W4A8 for a few tokens (compiled with -mavx2 -mfma): 8 packed rows read side by side,
// 64 codes (32 bytes) per step, u8 x s8 products through vpmaddubsw + vpmaddwd, or vpdpbusd
// where the AVX2 kernels have it (cpu::avx2_vnni). Layout and driver: w4a8_gemv.h. AVX-512 CPUs
// run it too for groups the AVX-512 file's 128-code chunks do not fit (192, 320, ...).
#include <immintrin.h>

#include <cstring>
#include <type_traits>

#include "aligned_buffer.h"
#include "half.h"
#include "tensorslim/gemm_w4a8.h"
#include "tensorslim/quantize.h"
#include "transpose8_avx2.h"
#include "vnni_dot.h"
#include "w4a8_gemv.h"

namespace tensorslim {
namespace cpu {
namespace {

constexpr int kRows = 8;
constexpr int64_t kChunk = 64;
constexpr int64_t kBytes = kChunk / 2;

// acc + the lane sums of lo * xe + hi * xo; both halves' pair sums fit int16 (2 * 2 * 15 * 128).
struct PairSums {
  static __m256i step(__m256i acc, __m256i lo, __m256i xe, __m256i hi, __m256i xo) {
    const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xe), _mm256_maddubs_epi16(hi, xo));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
  }
};
// The same as two vpdpbusd (VnniVex256 / VnniEvex256); the 8 accumulators keep them busy.
template <class Vnni>
struct Dots {
  static __m256i step(__m256i acc, __m256i lo, __m256i xe, __m256i hi, __m256i xo) {
    return Vnni::dpbusd(Vnni::dpbusd(acc, lo, xe), hi, xo);
  }
};

// out[j] lane r = the sum of v[r]'s lanes of group j: all 8 (GPC 1) or lanes 4j .. 4j+3 (GPC 2:
// groups of 32 codes, one 128-bit block each).
template <int GPC>
inline void row_sums(__m256i v[8], __m256i out[GPC]) {
  __m256i p[4], q[2];
  for (int i = 0; i < 4; ++i)  // per 128-bit block: rows 2i, 2i+1, 2i, 2i+1
    p[i] = _mm256_add_epi32(_mm256_unpacklo_epi32(v[2 * i], v[2 * i + 1]),
                            _mm256_unpackhi_epi32(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 2; ++i)  // per block b: rows 4i .. 4i+3, block b's lanes summed
    q[i] = _mm256_add_epi32(_mm256_unpacklo_epi64(p[2 * i], p[2 * i + 1]),
                            _mm256_unpackhi_epi64(p[2 * i], p[2 * i + 1]));
  const __m256i lo = _mm256_permute2x128_si256(q[0], q[1], 0x20), hi = _mm256_permute2x128_si256(q[0], q[1], 0x31);
  if constexpr (GPC == 2) {
    out[0] = lo;
    out[1] = hi;
  } else {
    out[0] = _mm256_add_epi32(lo, hi);
  }
}

// Tokens m .. m + T - 1 (T = 1 or 2) on RP = kRows / T rows (w[0..] and their tails, the first
// at row n0, `rows` of them real): lane t * RP + r holds token m + t's output of row r, so with
// T = 2 each chunk is loaded and unpacked once for both tokens. `line0`: the first of the next
// block's lines (`next`) that these steps prefetch. scale_t: these rows' scales by group, RP of
// them per kRows floats (block_scales).
template <int T, int GPC, class Dot>
inline void tokens256(const W4A8Args& a, const GemvActs& x, const uint8_t* const* w, const uint8_t (*tail)[kBytes],
                      int64_t whole, int64_t n0, int64_t rows, int64_t m, const char* next, int line0,
                      const float* scale_t) {
  constexpr int RP = kRows / T;
  const __m256i low = _mm256_set1_epi8(0x0F);
  // int4: u = nibble XOR 8 (both nibbles of a byte at once), offset 8; uint4: u = code.
  const __m256i flip = _mm256_set1_epi8(a.zero_points ? 0 : static_cast<char>(0x88));
  const __m256i row_of_lane = _mm256_and_si256(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(RP - 1));
  const __m256i keep = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(rows)), row_of_lane);
  const int8_t* xq[T];
  for (int t = 0; t < T; ++t) xq[t] = x.q + (m + t) * x.chunks * kChunk;
  alignas(32) int32_t zp[kRows];
  __m256 facc = _mm256_setzero_ps();
  for (int64_t u = 0; u < x.units; ++u) {
    __m256i acc[kRows];
    for (int r = 0; r < kRows; ++r) acc[r] = _mm256_setzero_si256();
    const int64_t c1 = std::min(x.chunks, (u + 1) * x.gchunks);
    for (int64_t c = u * x.gchunks; c < c1; ++c) {
      __m256i xe[T], xo[T];
      for (int t = 0; t < T; ++t) {
        xe[t] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq[t] + c * kChunk));
        xo[t] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq[t] + c * kChunk + kBytes));
      }
      for (int r = 0; r < RP; ++r) {
        if (r % 2 == 0) _mm_prefetch(next + (c * kRows + line0 + r) * kBytes, _MM_HINT_T1);  // a line per 2 steps
        const uint8_t* src = c < whole ? w[r] + c * kBytes : tail[r];
        const __m256i v = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)), flip);
        const __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
        for (int t = 0; t < T; ++t) acc[t * RP + r] = Dot::step(acc[t * RP + r], lo, xe[t], hi, xo[t]);
      }
    }
    __m256i dots[GPC];
    row_sums<GPC>(acc, dots);
    for (int j = 0; j < GPC && u * GPC + j < x.groups; ++j) {  // the unit's groups, in order
      const int64_t g = u * GPC + j;
      __m256i o = _mm256_set1_epi32(8);
      if (a.zero_points) {
        for (int i = 0; i < kRows; ++i) zp[i] = a.zero_points[(n0 + std::min<int64_t>(i % RP, rows - 1)) * x.groups + g];
        o = _mm256_load_si256(reinterpret_cast<const __m256i*>(zp));
      }
      __m256i sums = _mm256_set1_epi32(x.sums[m * x.groups + g]);
      if constexpr (T == 2) sums = _mm256_blend_epi32(sums, _mm256_set1_epi32(x.sums[(m + 1) * x.groups + g]), 0xF0);
      const __m256i d = _mm256_sub_epi32(dots[j], _mm256_mullo_epi32(o, sums));
      // T = 2: the 4 rows' scales in both halves
      const __m256 s = T == 1 ? _mm256_load_ps(scale_t + g * kRows)
                              : _mm256_broadcast_ps(reinterpret_cast<const __m128*>(scale_t + g * kRows));
      facc = _mm256_add_ps(facc, _mm256_mul_ps(_mm256_cvtepi32_ps(d), s));
    }
  }
  __m256 as = _mm256_set1_ps(a.act_scales[m]);
  if constexpr (T == 2) as = _mm256_blend_ps(as, _mm256_set1_ps(a.act_scales[m + 1]), 0xF0);
  __m256 y = _mm256_mul_ps(facc, as);
  if (a.bias)  // no bias: no + 0 (-0 stays); T = 2: rows 0-3 in both halves
    y = _mm256_add_ps(y, _mm256_mask_i32gather_ps(_mm256_setzero_ps(), a.bias + n0, row_of_lane,
                                                  _mm256_castsi256_ps(keep), 4));
  alignas(32) float tmp[kRows];
  _mm256_store_ps(tmp, y);
  for (int t = 0; t < T; ++t) {
    const int64_t at = (m + t) * a.ldo + n0;
    for (int64_t r = 0; r < rows; ++r) {
      if (a.out_bf16) static_cast<uint16_t*>(a.out)[at + r] = float_to_bf16(tmp[t * RP + r]);
      else static_cast<float*>(a.out)[at + r] = tmp[t * RP + r];
    }
  }
}

// The block's scales by group: st[g * kRows + r] = scale of row n0 + r (rows past N repeat the
// last), so each group's 8 scales are one aligned load instead of a gather.
inline void block_scales(const W4A8Args& a, int64_t groups, int64_t n0, int64_t rows, float* st) {
  for (int64_t g0 = 0; g0 < groups; g0 += 8) {
    const __m256i in = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(groups - g0)),
                                          _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    __m256i v[8];
    for (int r = 0; r < kRows; ++r)
      v[r] = _mm256_maskload_epi32(
          reinterpret_cast<const int*>(a.scales + (n0 + std::min<int64_t>(r, rows - 1)) * groups + g0), in);
    transpose8(v);
    for (int64_t j = 0; j < 8 && g0 + j < groups; ++j)
      _mm256_store_si256(reinterpret_cast<__m256i*>(st + (g0 + j) * kRows), v[j]);
  }
}

template <int GPC, class Dot>
void block256(const W4A8Args& a, const GemvActs& x, int64_t n0, int64_t rows) {
  const int64_t row_bytes = (a.K + 1) / 2, whole = row_bytes / kBytes;
  const uint8_t* w[kRows];  // rows past N read the last row again; their lanes are not stored
  for (int r = 0; r < kRows; ++r) w[r] = a.qweight + (n0 + std::min<int64_t>(r, rows - 1)) * a.ldw;
  alignas(32) uint8_t tail[kRows][kBytes] = {};  // the rows' last partial chunk, zero-padded
  if (whole * kBytes < row_bytes)
    for (int r = 0; r < kRows; ++r) std::memcpy(tail[r], w[r] + whole * kBytes, row_bytes - whole * kBytes);
  // The next block's rows (contiguous when ldw is the row size) to L2 as the steps go: a
  // linear stream the memory system serves faster than 8 short ones.
  const char* next = reinterpret_cast<const char*>(a.qweight + (n0 + kRows) * a.ldw);
  thread_local AlignedFloats scale_t;
  scale_t.resize((x.groups + 7) / 8 * 8 * kRows);
  block_scales(a, x.groups, n0, rows, scale_t.data());
  int64_t m = 0;
  for (; m + 2 <= a.M; m += 2)  // token pairs share each chunk's load and unpacking
    for (int h = 0; h < 2; ++h)
      if (rows > 4 * h)
        tokens256<2, GPC, Dot>(a, x, w + 4 * h, tail + 4 * h, whole, n0 + 4 * h, std::min<int64_t>(4, rows - 4 * h), m,
                          next, 4 * h, scale_t.data() + 4 * h);
  for (; m < a.M; ++m) tokens256<1, GPC, Dot>(a, x, w, tail, whole, n0, rows, m, next, 0, scale_t.data());
}

template <class Dot>
struct Gemv256 {
  static constexpr int kRows = cpu::kRows;
  static constexpr int64_t kChunk = cpu::kChunk;
  static void block(const W4A8Args& a, const GemvActs& x, int64_t n0, int64_t rows) {
    if (x.gpc == 1) block256<1, Dot>(a, x, n0, rows);
    else block256<2, Dot>(a, x, n0, rows);  // groups of 32: two per chunk
  }
};

}  // namespace

bool linear_w4a8_gemv_avx2(const W4A8Args& a) {
  if (active_isa() < Isa::kAVX2 || !w4a8_gemv_fits(a.K, a.group, kChunk)) return false;
  with_vnni256(avx2_vnni(), [&](auto dot) {
    using V = decltype(dot);
    w4a8_gemv_drive<Gemv256<std::conditional_t<std::is_same_v<V, NoVnni>, PairSums, Dots<V>>>>(a);
  });
  return true;
}

}  // namespace cpu
}  // namespace tensorslim
