// AVX2 W4A8 for a few tokens (compiled with -mavx2 -mfma): 8 packed rows read side by side,
// 64 codes (32 bytes) per step, u8 x s8 products through vpmaddubsw + vpmaddwd. Layout and
// driver: w4a8_gemv.h. AVX-512 CPUs run it too for groups the AVX-512 file's 128-code chunks
// do not fit (64, 192, ...).
#include <immintrin.h>

#include <cstring>

#include "half.h"
#include "tensorslim/gemm_w4a8.h"
#include "tensorslim/quantize.h"
#include "w4a8_gemv.h"

namespace tensorslim {
namespace cpu {
namespace {

constexpr int kRows = 8;
constexpr int64_t kChunk = 64;
constexpr int64_t kBytes = kChunk / 2;

// acc + the lane sums of lo * xe + hi * xo; both halves' pair sums fit int16 (2 * 2 * 15 * 128).
inline __m256i pair_step(__m256i acc, __m256i lo, __m256i xe, __m256i hi, __m256i xo) {
  const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xe), _mm256_maddubs_epi16(hi, xo));
  return _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
}

// Lane r of the result = the sum of v[r]'s 8 lanes.
inline __m256i reduce_rows(__m256i v[8]) {
  __m256i p[4], q[2];
  for (int i = 0; i < 4; ++i)  // per 128-bit block: rows 2i, 2i+1, 2i, 2i+1
    p[i] = _mm256_add_epi32(_mm256_unpacklo_epi32(v[2 * i], v[2 * i + 1]),
                            _mm256_unpackhi_epi32(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 2; ++i)  // per block: rows 4i .. 4i+3
    q[i] = _mm256_add_epi32(_mm256_unpacklo_epi64(p[2 * i], p[2 * i + 1]),
                            _mm256_unpackhi_epi64(p[2 * i], p[2 * i + 1]));
  return _mm256_add_epi32(_mm256_permute2x128_si256(q[0], q[1], 0x20), _mm256_permute2x128_si256(q[0], q[1], 0x31));
}

void block256(const W4A8Args& a, const GemvActs& x, int64_t n0, int64_t rows) {
  const int64_t row_bytes = (a.K + 1) / 2, whole = row_bytes / kBytes;
  const __m256i low = _mm256_set1_epi8(0x0F);
  // int4: u = nibble XOR 8 (both nibbles of a byte at once), offset 8; uint4: u = code.
  const __m256i flip = _mm256_set1_epi8(a.zero_points ? 0 : static_cast<char>(0x88));
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i keep = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(rows)), lane);
  const __m256i srow = _mm256_mullo_epi32(lane, _mm256_set1_epi32(static_cast<int>(x.groups)));
  const uint8_t* w[kRows];  // rows past N read the last row again; their lanes are not stored
  for (int r = 0; r < kRows; ++r) w[r] = a.qweight + (n0 + std::min<int64_t>(r, rows - 1)) * a.ldw;
  alignas(32) uint8_t tail[kRows][kBytes] = {};  // the rows' last partial chunk, zero-padded
  if (whole * kBytes < row_bytes)
    for (int r = 0; r < kRows; ++r) std::memcpy(tail[r], w[r] + whole * kBytes, row_bytes - whole * kBytes);
  alignas(32) int32_t zp[kRows];
  // The next block's rows (contiguous when ldw is the row size) to L2 as the steps go: a
  // linear stream the memory system serves faster than 8 short ones.
  const char* next = reinterpret_cast<const char*>(a.qweight + (n0 + kRows) * a.ldw);
  for (int64_t m = 0; m < a.M; ++m) {
    const int8_t* xq = x.q + m * x.chunks * kChunk;
    __m256 facc = _mm256_setzero_ps();
    for (int64_t g = 0; g < x.groups; ++g) {
      __m256i acc[kRows];
      for (int r = 0; r < kRows; ++r) acc[r] = _mm256_setzero_si256();
      const int64_t c1 = std::min(x.chunks, (g + 1) * x.gchunks);
      for (int64_t c = g * x.gchunks; c < c1; ++c) {
        const __m256i xe = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + c * kChunk));
        const __m256i xo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + c * kChunk + kBytes));
        for (int r = 0; r < kRows; ++r) {
          if (r % 2 == 0) _mm_prefetch(next + (c * kRows + r) * kBytes, _MM_HINT_T1);  // a line per 2 steps
          const uint8_t* src = c < whole ? w[r] + c * kBytes : tail[r];
          const __m256i v = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)), flip);
          acc[r] = pair_step(acc[r], _mm256_and_si256(v, low), xe,
                             _mm256_and_si256(_mm256_srli_epi16(v, 4), low), xo);
        }
      }
      __m256i o = _mm256_set1_epi32(8);
      if (a.zero_points) {
        for (int r = 0; r < kRows; ++r) zp[r] = r < rows ? a.zero_points[(n0 + r) * x.groups + g] : 0;
        o = _mm256_load_si256(reinterpret_cast<const __m256i*>(zp));
      }
      const __m256i d = _mm256_sub_epi32(reduce_rows(acc), _mm256_mullo_epi32(o, _mm256_set1_epi32(x.sums[m * x.groups + g])));
      const __m256 s = _mm256_mask_i32gather_ps(_mm256_setzero_ps(), a.scales + n0 * x.groups + g, srow,
                                                _mm256_castsi256_ps(keep), 4);
      facc = _mm256_add_ps(facc, _mm256_mul_ps(_mm256_cvtepi32_ps(d), s));
    }
    __m256 y = _mm256_mul_ps(facc, _mm256_set1_ps(a.act_scales[m]));
    if (a.bias) y = _mm256_add_ps(y, _mm256_maskload_ps(a.bias + n0, keep));  // no bias: no + 0 (-0 stays)
    const int64_t at = m * a.ldo + n0;
    if (!a.out_bf16) {
      _mm256_maskstore_ps(static_cast<float*>(a.out) + at, keep, y);
    } else {
      alignas(32) float t[kRows];
      _mm256_store_ps(t, y);
      uint16_t* o16 = static_cast<uint16_t*>(a.out) + at;
      for (int64_t r = 0; r < rows; ++r) o16[r] = float_to_bf16(t[r]);
    }
  }
}

struct Gemv256 {
  static constexpr int kRows = cpu::kRows;
  static constexpr int64_t kChunk = cpu::kChunk;
  static void block(const W4A8Args& a, const GemvActs& x, int64_t n0, int64_t rows) { block256(a, x, n0, rows); }
};

}  // namespace

bool linear_w4a8_gemv_avx2(const W4A8Args& a) {
  if (active_isa() < Isa::kAVX2 || !w4a8_gemv_fits(a.K, a.group, kChunk)) return false;
  w4a8_gemv_drive<Gemv256>(a);
  return true;
}

}  // namespace cpu
}  // namespace tensorslim
