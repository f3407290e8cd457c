// AVX-512 decoding of every low-bit format, 16 values per step, for the fused GEMV of
// lowbit_gemv_tiles.h: weight codes are decoded in registers and multiplied straight away
// with up to 8 activation rows, so the packed weight is read from memory once and never
// written out as floats. The decoders are bit-exact with dequantize_row_reference (tests
// compare them).
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "lowbit_gemv_tiles.h"
#include "tensorslim/lowbit.h"

namespace tensorslim {
namespace cpu {
namespace {

// 16 consecutive N-bit codes (unsigned) starting at byte p, as 16 int32 lanes. `safe`
// says 16 bytes may be read from p (else only the 2N bytes that hold the codes). kMask false
// (N < 4 only): each lane holds its code in the low N bits and the next codes' bits above,
// for a permute that reads the low 4 bits.
template <int N, bool kMask = true>
inline __m512i unpack16(const uint8_t* p, bool safe) {
  static_assert(kMask || N < 4, "unmasked lanes only for codes narrower than a permute index");
  if constexpr (N == 8) {
    return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  } else if constexpr (N == 4) {
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    const __m128i m = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(b, m), hi = _mm_and_si128(_mm_srli_epi16(b, 4), m);
    return _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi));  // low nibble first
  } else if constexpr (N <= 2) {
    uint32_t u = 0;
    std::memcpy(&u, p, 2 * N);  // 16 values = 2N bytes
    const __m512i shifts = _mm512_setr_epi32(0, N, 2 * N, 3 * N, 4 * N, 5 * N, 6 * N, 7 * N, 8 * N,
                                             9 * N, 10 * N, 11 * N, 12 * N, 13 * N, 14 * N, 15 * N);
    const __m512i c = _mm512_srlv_epi32(_mm512_set1_epi32(static_cast<int>(u)), shifts);
    return kMask ? _mm512_and_si512(c, _mm512_set1_epi32((1 << N) - 1)) : c;
  } else {
    // Broadcast the 16 bytes to every 128-bit lane; value j's bits start in byte jN/8 and
    // span at most two bytes, which an in-lane byte shuffle moves into dword j.
    alignas(16) uint8_t tmp[16] = {};
    if (!safe) {
      std::memcpy(tmp, p, 2 * N);
      p = tmp;
    }
    const ShuffleTable<N>& t = kShuffleTable<N>;
    const __m512i bytes = _mm512_shuffle_epi8(
        _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
        _mm512_load_si512(t.shuffle));
    const __m512i c = _mm512_srlv_epi32(bytes, _mm512_load_si512(t.shift));
    return kMask ? _mm512_and_si512(c, _mm512_set1_epi32((1 << N) - 1)) : c;
  }
}

// The integer value of index bits 0..15 taken mod 2^N, sign-extended from N bits for signed rows.
template <int N, bool kSigned>
inline __m512i code_values() {
  alignas(64) int32_t v[16];
  for (int j = 0; j < 16; ++j) {
    const int c = j % (1 << N);
    v[j] = kSigned && c >= (1 << (N - 1)) ? c - (1 << N) : c;
  }
  return _mm512_load_si512(v);
}

// Integers: float(code - zp) * scale. Below 4 bits the 2^N values of a group are computed
// once (the same operations, so the same bits) into a 16-entry table, each stored 16 / 2^N
// times, that vpermps indexes with the unmasked lanes (int3 GEMM at 16 rows of 384 x 1536:
// the decode was the largest part); wider codes are sign-extended from N bits and converted.
template <int N, bool kSigned>
struct IntDecoder : RowBase {
  static constexpr bool kTable = N < 4;
  __m512 s, table;
  __m512i zp;
  void group(int64_t g) {
    s = _mm512_set1_ps(f32_scale(g));
    zp = _mm512_set1_epi32(w->zero_points ? w->zero_points[scale_base + g] : 0);
    if (kTable) table = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(code_values<N, kSigned>(), zp)), s);
  }
  __m512 at(int64_t i) const {
    const int64_t off = i / 16 * 2 * N;
    if constexpr (kTable) return _mm512_permutexvar_ps(unpack16<N, false>(q + off, off + 16 <= row_bytes), table);
    __m512i c = unpack16<N>(q + off, off + 16 <= row_bytes);
    if (kSigned) c = _mm512_srai_epi32(_mm512_slli_epi32(c, 32 - N), 32 - N);
    return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(c, zp)), s);
  }
};

// FP8: the 7-bit magnitude shifted into a float's exponent/mantissa field is the value
// times 2^-(127 - bias) for normals and subnormals alike; Inf/NaN patterns are patched.
// at_fast, for rows without Inf/NaN codes (checked once per row) and scales whose product
// with 2^(127 - bias) is finite: the sign-extended byte shifted and masked puts the sign at
// bit 31 and the magnitude in place, and one multiply by that product scales it (the same
// bits as at(), as on AVX2: the power of two only moves the exponent, so both round the same
// real product once). 4096 x 4096 fp8_e4m3 batch 1: at() alone took 11 vector instructions
// per 16 values, at_fast 5.
template <bool kE4M3>
struct Fp8Decoder : RowBase {
  static constexpr int kShift = kE4M3 ? 20 : 21;                    // magnitude -> bit 20 / 21
  static constexpr float kPow2 = kE4M3 ? 0x1p120f : 0x1p112f;       // 2^(127 - bias)
  static constexpr int kSpecial = kE4M3 ? 0x7F : 0x7C;              // first Inf/NaN magnitude
  __m512 s, folded;
  bool clean, fast;
  void init(const LowbitWeight& lw, int64_t n, int64_t K) {
    RowBase::init(lw, n, K);
    const __m512i m7 = _mm512_set1_epi8(0x7F), sp = _mm512_set1_epi8(kSpecial);
    __mmask64 any = 0;
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
      const __m512i mag = _mm512_and_si512(_mm512_loadu_si512(q + k), m7);
      any |= _mm512_cmpge_epu8_mask(mag, sp);
    }
    clean = any == 0;
    for (; k < K; ++k) clean &= (q[k] & 0x7F) < kSpecial;
  }
  void group(int64_t g) {
    const float sc = f32_scale(g);
    s = _mm512_set1_ps(sc);
    const float f = sc * kPow2;
    fast = clean && f - f == 0.0f;  // finite
    folded = _mm512_set1_ps(f);
  }
  __m512 at_fast(int64_t i) const {
    const __m512i c = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + i)));
    const __m512i bits = _mm512_and_si512(_mm512_slli_epi32(c, kShift),
                                          _mm512_set1_epi32(static_cast<int>(0x80000000u | (0x7Fu << kShift))));
    return _mm512_mul_ps(_mm512_castsi512_ps(bits), folded);
  }
  __m512 at(int64_t i) const {
    const __m512i c = unpack16<8>(q + i, true);
    const __m512i mag = _mm512_and_si512(c, _mm512_set1_epi32(0x7F));
    const __m512i sign = _mm512_slli_epi32(_mm512_and_si512(c, _mm512_set1_epi32(0x80)), 24);
    __m512 v = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_slli_epi32(mag, kShift)), _mm512_set1_ps(kPow2));
    if (kE4M3) {
      v = _mm512_mask_blend_ps(_mm512_cmpeq_epi32_mask(mag, _mm512_set1_epi32(0x7F)), v,
                               _mm512_set1_ps(__builtin_nanf("")));
    } else {
      v = _mm512_mask_blend_ps(_mm512_cmpeq_epi32_mask(mag, _mm512_set1_epi32(0x7C)), v,
                               _mm512_set1_ps(__builtin_inff()));
      v = _mm512_mask_blend_ps(_mm512_cmpgt_epi32_mask(mag, _mm512_set1_epi32(0x7C)), v,
                               _mm512_set1_ps(__builtin_nanf("")));
    }
    v = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(v), sign));
    return _mm512_mul_ps(v, s);
  }
};

// Formats with a value table of at most 16 entries (E2M1, ternary): one permute per 16.
// NVFP4: (value * E4M3 block scale) * tensor scale; MXFP4: value * 2^e.
template <int N, ScaleFormat kScale>
struct TableDecoder : RowBase {
  __m512 table, s, ts;
  void init(const LowbitWeight& lw, int64_t n, int64_t K) {
    RowBase::init(lw, n, K);
    float t[16] = {};
    std::memcpy(t, lw.info->code_values, sizeof(float) << N);
    table = _mm512_loadu_ps(t);
    ts = _mm512_set1_ps(lw.tensor_scale);
  }
  void group(int64_t g) { s = _mm512_set1_ps(scale<kScale>(g)); }
  __m512 at(int64_t i) const {
    __m512 v = _mm512_mul_ps(_mm512_permutexvar_ps(unpack16<N>(q + i / 16 * 2 * N, false), table), s);
    if (kScale == ScaleFormat::kE4M3) v = _mm512_mul_ps(v, ts);
    return v;
  }
};

// Binary: the 16 bits select +scale or -scale.
struct BinaryDecoder : RowBase {
  __m512 pos, neg;
  void group(int64_t g) {
    pos = _mm512_set1_ps(f32_scale(g));
    neg = _mm512_set1_ps(-f32_scale(g));
  }
  __m512 at(int64_t i) const {
    uint16_t bits;
    std::memcpy(&bits, q + i / 8, 2);
    return _mm512_mask_blend_ps(static_cast<__mmask16>(bits), neg, pos);
  }
};

// The 16-lane vector part for lowbit_gemv_tiles.h.
struct Vec512 {
  using Vec = __m512;
  static constexpr int kLanes = 16;
  static constexpr int kMaxRows = 8;  // 8 accumulators + 8 activations of the 32 zmm registers
  static constexpr int weight_rows(int MB) { return MB <= 2 ? 4 : (MB <= 4 ? 2 : 1); }
  static Vec zero() { return _mm512_setzero_ps(); }
  static Vec load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
  static Vec fmadd(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
  static float sum(Vec v) { return _mm512_reduce_add_ps(v); }
};

struct Decoders512 {
  template <int N, bool kSigned>
  using Int = IntDecoder<N, kSigned>;
  template <bool kE4M3>
  using Fp8 = Fp8Decoder<kE4M3>;
  template <int N, ScaleFormat kScale>
  using Table = TableDecoder<N, kScale>;
  using Binary = BinaryDecoder;
};

}  // namespace

void dequantize_row_avx512(const LowbitWeight& w, int64_t n, int64_t K, float* out) {
  with_decoder<Decoders512>(*w.info, DecodeRowFn<Vec512>{w, n, K, out});
}

void linear_lowbit_avx512(const float* x, int64_t ldx, int64_t M, const LowbitWeight& w,
                          int64_t K, const float* bias, float* out, int64_t ldo, int64_t n0,
                          int64_t n1) {
  with_decoder<Decoders512>(*w.info, GemvFn<Vec512>{x, ldx, M, w, K, bias, out, ldo, n0, n1});
}

}  // namespace cpu
}  // namespace tensorslim
