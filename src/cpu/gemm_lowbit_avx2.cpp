// AVX2 decoding of every low-bit format, 8 values per step, for the fused GEMV of
// lowbit_gemv_tiles.h (the twin of gemm_lowbit_avx512.cpp). No AVX-512 masks or 16-lane
// permutes: codes of up to 4 bits (integers, E2M1, ternary) are looked up in per-group
// tables with one or two 8-entry permutes, FP8 is moved into fp32 bit fields, binary bits
// become lanes by a compare. The decoders are bit-exact with dequantize_row_reference
// (tests compare them), and so is the FP8 GEMV's faster variant (at_fast).
#include <immintrin.h>

#include <cstring>

#include "lowbit_gemv_tiles.h"
#include "tensorslim/lowbit.h"

namespace tensorslim {
namespace cpu {
namespace {

// 8 consecutive N-bit codes (unsigned) from the N bytes at p, as 8 int32 lanes. `safe`
// says 8 bytes may be read from p; else only the N that hold the codes are (the row's last
// group may end at the buffer's end), assembled byte by byte: a narrow copy into a wider
// stack word would stall on store forwarding at every step.
template <int N>
inline uint64_t load_codes(const uint8_t* p, bool safe) {
  uint64_t u = 0;
  if (safe || N == 1 || N == 2 || N == 4 || N == 8) {
    constexpr int bytes = N == 1 || N == 2 || N == 4 || N == 8 ? N : 8;
    if constexpr (bytes == 1) u = p[0];
    if constexpr (bytes == 2) { uint16_t v; std::memcpy(&v, p, 2); u = v; }
    if constexpr (bytes == 4) { uint32_t v; std::memcpy(&v, p, 4); u = v; }
    if constexpr (bytes == 8) std::memcpy(&u, p, 8);
    return u;
  }
  for (int b = 0; b < N; ++b) u |= uint64_t{p[b]} << (8 * b);
  return u;
}

// kMask = false leaves the bits above each code's N in place (table lookups ignore them).
template <int N, bool kMask = true>
inline __m256i unpack8(const uint8_t* p, bool safe) {
  if constexpr (N == 8) {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  } else if constexpr (N <= 4) {  // 8 values fit in 32 bits: one variable shift per lane
    const uint32_t u = static_cast<uint32_t>(load_codes<N>(p, safe));
    const __m256i shifts = _mm256_setr_epi32(0, N, 2 * N, 3 * N, 4 * N, 5 * N, 6 * N, 7 * N);
    const __m256i c = _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(u)), shifts);
    return kMask ? _mm256_and_si256(c, _mm256_set1_epi32((1 << N) - 1)) : c;
  } else {
    // 5..7 bytes: copy them to both 128-bit lanes; the in-lane byte shuffle puts the two
    // bytes value j spans into dword j, then shift and mask.
    const uint64_t u = load_codes<N>(p, safe);
    const ShuffleTable<N>& t = kShuffleTable<N>;
    const __m256i bytes = _mm256_shuffle_epi8(
        _mm256_broadcastsi128_si256(_mm_cvtsi64_si128(static_cast<long long>(u))),
        _mm256_load_si256(reinterpret_cast<const __m256i*>(t.shuffle)));
    return _mm256_and_si256(
        _mm256_srlv_epi32(bytes, _mm256_load_si256(reinterpret_cast<const __m256i*>(t.shift))),
        _mm256_set1_epi32((1 << N) - 1));
  }
}

// Code -> value for codes of N <= 4 bits through a table of 2^N fp32 entries in two
// registers: the permute reads the index's low 3 bits, and code bit 3 (shifted to the sign
// bit) picks the half. Bits above the code are ignored (a 4-entry table is stored twice).
template <int N>
inline __m256 lookup(__m256 lo, __m256 hi, __m256i c) {
  const __m256 v = _mm256_permutevar8x32_ps(lo, c);
  if constexpr (N < 4) {
    (void)hi;
    return v;
  } else {
    return _mm256_blendv_ps(v, _mm256_permutevar8x32_ps(hi, c), _mm256_castsi256_ps(_mm256_slli_epi32(c, 28)));
  }
}

// The integer value of code bits j = first .. first+7 (taken mod 2^N), sign-extended from N
// bits for signed rows.
template <int N, bool kSigned>
inline __m256i code_values(int first) {
  alignas(32) int32_t v[8];
  for (int j = 0; j < 8; ++j) {
    const int c = (first + j) % (1 << N);
    v[j] = kSigned && c >= (1 << (N - 1)) ? c - (1 << N) : c;
  }
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(v));
}

// Integers: float(code - zp) * scale. Up to 4 bits, the 2^N values of a group are computed
// once (the same operations, so the same bits) and codes are looked up; wider codes are
// sign-extended from N bits and converted.
template <int N, bool kSigned>
struct IntDecoder : RowBase {
  static constexpr bool kTable = N <= 4;
  __m256 s, lo, hi;
  __m256i zp;
  void group(int64_t g) {
    s = _mm256_set1_ps(f32_scale(g));
    zp = _mm256_set1_epi32(w->zero_points ? w->zero_points[scale_base + g] : 0);
    if (kTable) {
      lo = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(code_values<N, kSigned>(0), zp)), s);
      hi = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(code_values<N, kSigned>(8), zp)), s);
    }
  }
  __m256 at(int64_t i) const {
    const int64_t off = (i >> 3) * N;  // i >= 0: a shift, not a signed division
    if (kTable) return lookup<N>(lo, hi, unpack8<N, false>(q + off, off + 8 <= row_bytes));
    __m256i c = unpack8<N>(q + off, off + 8 <= row_bytes);
    if (kSigned) c = _mm256_srai_epi32(_mm256_slli_epi32(c, 32 - N), 32 - N);
    return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(c, zp)), s);
  }
};

// FP8: the 7-bit magnitude shifted into a float's exponent/mantissa field is the value
// times 2^-(127 - bias) for normals and subnormals alike; Inf/NaN patterns are patched.
// at_fast, for rows without Inf/NaN codes (checked once per row) and scales whose product
// with 2^(127 - bias) is finite: the sign-extended byte shifted and masked puts the sign at
// bit 31 and the magnitude in place in three instructions, and one multiply by that product
// scales it (the same bits as at(): the power of two only moves the exponent, so both
// round the same real product once).
template <bool kE4M3>
struct Fp8Decoder : RowBase {
  static constexpr int kShift = kE4M3 ? 20 : 21;                    // magnitude -> bit 20 / 21
  static constexpr float kPow2 = kE4M3 ? 0x1p120f : 0x1p112f;       // 2^(127 - bias)
  static constexpr int kSpecial = kE4M3 ? 0x7F : 0x7C;              // first Inf/NaN magnitude
  __m256 s, folded;
  bool clean, fast;
  void init(const LowbitWeight& lw, int64_t n, int64_t K) {
    RowBase::init(lw, n, K);
    clean = true;
    const __m256i m7 = _mm256_set1_epi8(0x7F), sp = _mm256_set1_epi8(kSpecial);
    __m256i any = _mm256_setzero_si256();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {  // magnitude >= kSpecial  <=>  max(magnitude, kSpecial) == magnitude
      const __m256i mag = _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + k)), m7);
      any = _mm256_or_si256(any, _mm256_cmpeq_epi8(_mm256_max_epu8(mag, sp), mag));
    }
    for (; k < K; ++k) clean &= (q[k] & 0x7F) < kSpecial;
    clean &= _mm256_testz_si256(any, any) != 0;
  }
  void group(int64_t g) {
    const float sc = f32_scale(g);
    s = _mm256_set1_ps(sc);
    const float f = sc * kPow2;
    fast = clean && f - f == 0.0f;  // finite
    folded = _mm256_set1_ps(f);
  }
  __m256 at_fast(int64_t i) const {
    // Sign-extended byte << kShift: the magnitude lands in place and the sign (with copies
    // above the magnitude, cleared here) at bit 31.
    const __m256i c = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + i)));
    const __m256i bits = _mm256_and_si256(_mm256_slli_epi32(c, kShift),
                                          _mm256_set1_epi32(static_cast<int>(0x80000000u | (0x7Fu << kShift))));
    return _mm256_mul_ps(_mm256_castsi256_ps(bits), folded);
  }
  __m256 at(int64_t i) const {
    const __m256i c = unpack8<8>(q + i, true);
    const __m256i mag = _mm256_and_si256(c, _mm256_set1_epi32(0x7F));
    const __m256i sign = _mm256_slli_epi32(_mm256_and_si256(c, _mm256_set1_epi32(0x80)), 24);
    __m256 v = _mm256_mul_ps(_mm256_castsi256_ps(_mm256_slli_epi32(mag, kShift)), _mm256_set1_ps(kPow2));
    if (kE4M3) {
      v = _mm256_blendv_ps(v, _mm256_set1_ps(__builtin_nanf("")),
                           _mm256_castsi256_ps(_mm256_cmpeq_epi32(mag, _mm256_set1_epi32(0x7F))));
    } else {
      v = _mm256_blendv_ps(v, _mm256_set1_ps(__builtin_inff()),
                           _mm256_castsi256_ps(_mm256_cmpeq_epi32(mag, _mm256_set1_epi32(0x7C))));
      v = _mm256_blendv_ps(v, _mm256_set1_ps(__builtin_nanf("")),
                           _mm256_castsi256_ps(_mm256_cmpgt_epi32(mag, _mm256_set1_epi32(0x7C))));
    }
    v = _mm256_castsi256_ps(_mm256_or_si256(_mm256_castps_si256(v), sign));
    return _mm256_mul_ps(v, s);
  }
};

// Formats with a value table of at most 16 entries (E2M1, ternary): the group's scale is
// applied to the table (per entry the same operations as per value, so the same bits):
// NVFP4 (value * E4M3 block scale) * tensor scale, MXFP4 value * 2^e, ternary value * scale.
// (Scaling each group's sum once instead would be cheaper for these 16 / 32-value groups,
// but x * code before the scale can overflow where the scaled product does not.)
template <int N, ScaleFormat kScale>
struct TableDecoder : RowBase {
  __m256 lo_base, hi_base, ts, lo, hi;
  void init(const LowbitWeight& lw, int64_t n, int64_t K) {
    RowBase::init(lw, n, K);
    alignas(32) float t[16];  // 2^N values, repeated to 16 (the permute ignores high bits)
    for (int j = 0; j < 16; ++j) t[j] = lw.info->code_values[j % (1 << N)];
    lo_base = _mm256_load_ps(t);
    hi_base = _mm256_load_ps(t + 8);
    ts = _mm256_set1_ps(lw.tensor_scale);
  }
  void group(int64_t g) {
    const __m256 s = _mm256_set1_ps(scale<kScale>(g));
    lo = _mm256_mul_ps(lo_base, s);
    hi = _mm256_mul_ps(hi_base, s);
    if (kScale == ScaleFormat::kE4M3) lo = _mm256_mul_ps(lo, ts), hi = _mm256_mul_ps(hi, ts);
  }
  __m256 at(int64_t i) const {
    const int64_t off = (i >> 3) * N;
    return lookup<N>(lo, hi, unpack8<N, false>(q + off, off + 8 <= row_bytes));
  }
};

// Binary: the 8 bits of one byte select +scale or -scale.
struct BinaryDecoder : RowBase {
  __m256 pos, neg;
  void group(int64_t g) {
    pos = _mm256_set1_ps(f32_scale(g));
    neg = _mm256_set1_ps(-f32_scale(g));
  }
  __m256 at(int64_t i) const {
    const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    const __m256i set = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(q[i >> 3]), bit), bit);
    return _mm256_blendv_ps(neg, pos, _mm256_castsi256_ps(set));
  }
};

// The 8-lane vector part for lowbit_gemv_tiles.h.
struct Vec256 {
  using Vec = __m256;
  static constexpr int kLanes = 8;
  // 16 ymm registers: one activation row x 4 weight rows, 2 x 2, or up to 4 x 1 (plus the
  // activations and the decoders' constants).
  static constexpr int kMaxRows = 4;
  static constexpr int weight_rows(int MB) { return MB == 1 ? 4 : (MB == 2 ? 2 : 1); }
  static Vec zero() { return _mm256_setzero_ps(); }
  static Vec load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, Vec v) { _mm256_storeu_ps(p, v); }
  static Vec fmadd(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
  static float sum(Vec v) {
    __m128 r = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    return _mm_cvtss_f32(r);
  }
};

struct Decoders256 {
  template <int N, bool kSigned>
  using Int = IntDecoder<N, kSigned>;
  template <bool kE4M3>
  using Fp8 = Fp8Decoder<kE4M3>;
  template <int N, ScaleFormat kScale>
  using Table = TableDecoder<N, kScale>;
  using Binary = BinaryDecoder;
};

}  // namespace

void dequantize_row_avx2(const LowbitWeight& w, int64_t n, int64_t K, float* out) {
  with_decoder<Decoders256>(*w.info, DecodeRowFn<Vec256>{w, n, K, out});
}

void linear_lowbit_avx2(const float* x, int64_t ldx, int64_t M, const LowbitWeight& w, int64_t K,
                        const float* bias, float* out, int64_t ldo, int64_t n0, int64_t n1) {
  with_decoder<Decoders256>(*w.info, GemvFn<Vec256>{x, ldx, M, w, K, bias, out, ldo, n0, n1});
}

}  // namespace cpu
}  // namespace tensorslim
