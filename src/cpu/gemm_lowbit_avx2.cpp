// AVX2 decoding of every low-bit format, 8 values per step, for the fused GEMV of
// lowbit_gemv_tiles.h (the twin of gemm_lowbit_avx512.cpp). No AVX-512 masks or permutes:
// 16-entry tables take two 8-entry permutes and a blend, binary bits a compare. The
// decoders are bit-exact with dequantize_row_reference (tests compare them).
#include <immintrin.h>

#include <cstring>

#include "lowbit_gemv_tiles.h"
#include "tensorslim/lowbit.h"

namespace tensorslim {
namespace cpu {
namespace {

// 8 consecutive N-bit codes (unsigned) from the N bytes at p, as 8 int32 lanes. Never
// reads past those N bytes (the row's last group may end at the buffer's end).
template <int N>
inline __m256i unpack8(const uint8_t* p) {
  if constexpr (N == 8) {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  } else if constexpr (N <= 4) {  // 8 values fit in 32 bits: one variable shift per lane
    uint32_t u = 0;
    std::memcpy(&u, p, N);
    const __m256i shifts = _mm256_setr_epi32(0, N, 2 * N, 3 * N, 4 * N, 5 * N, 6 * N, 7 * N);
    return _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(u)), shifts),
                            _mm256_set1_epi32((1 << N) - 1));
  } else {
    // 5..7 bytes: copy them to both 128-bit lanes; the in-lane byte shuffle puts the two
    // bytes value j spans into dword j, then shift and mask.
    uint64_t u = 0;
    std::memcpy(&u, p, N);
    const ShuffleTable<N>& t = kShuffleTable<N>;
    const __m256i bytes = _mm256_shuffle_epi8(
        _mm256_broadcastsi128_si256(_mm_cvtsi64_si128(static_cast<long long>(u))),
        _mm256_load_si256(reinterpret_cast<const __m256i*>(t.shuffle)));
    return _mm256_and_si256(
        _mm256_srlv_epi32(bytes, _mm256_load_si256(reinterpret_cast<const __m256i*>(t.shift))),
        _mm256_set1_epi32((1 << N) - 1));
  }
}

// Integers: float(code - zp) * scale; signed codes are sign-extended from N bits.
template <int N, bool kSigned>
struct IntDecoder : RowBase {
  __m256 s;
  __m256i zp;
  void group(int64_t g) {
    s = _mm256_set1_ps(f32_scale(g));
    zp = _mm256_set1_epi32(w->zero_points ? w->zero_points[scale_base + g] : 0);
  }
  __m256 at(int64_t i) const {
    __m256i c = unpack8<N>(q + i / 8 * N);
    if (kSigned) c = _mm256_srai_epi32(_mm256_slli_epi32(c, 32 - N), 32 - N);
    return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(c, zp)), s);
  }
};

// FP8: the 7-bit magnitude shifted into a float's exponent/mantissa field is the value
// times 2^-(127 - bias) for normals and subnormals alike; Inf/NaN patterns are patched.
template <bool kE4M3>
struct Fp8Decoder : RowBase {
  __m256 s;
  void group(int64_t g) { s = _mm256_set1_ps(f32_scale(g)); }
  __m256 at(int64_t i) const {
    const __m256i c = unpack8<8>(q + i);
    const __m256i mag = _mm256_and_si256(c, _mm256_set1_epi32(0x7F));
    const __m256i sign = _mm256_slli_epi32(_mm256_and_si256(c, _mm256_set1_epi32(0x80)), 24);
    __m256 v;
    if (kE4M3) {
      v = _mm256_mul_ps(_mm256_castsi256_ps(_mm256_slli_epi32(mag, 20)), _mm256_set1_ps(0x1p120f));
      v = _mm256_blendv_ps(v, _mm256_set1_ps(__builtin_nanf("")),
                           _mm256_castsi256_ps(_mm256_cmpeq_epi32(mag, _mm256_set1_epi32(0x7F))));
    } else {
      v = _mm256_mul_ps(_mm256_castsi256_ps(_mm256_slli_epi32(mag, 21)), _mm256_set1_ps(0x1p112f));
      v = _mm256_blendv_ps(v, _mm256_set1_ps(__builtin_inff()),
                           _mm256_castsi256_ps(_mm256_cmpeq_epi32(mag, _mm256_set1_epi32(0x7C))));
      v = _mm256_blendv_ps(v, _mm256_set1_ps(__builtin_nanf("")),
                           _mm256_castsi256_ps(_mm256_cmpgt_epi32(mag, _mm256_set1_epi32(0x7C))));
    }
    v = _mm256_castsi256_ps(_mm256_or_si256(_mm256_castps_si256(v), sign));
    return _mm256_mul_ps(v, s);
  }
};

// Formats with a value table of at most 16 entries (E2M1, ternary): entries 0-7 and 8-15
// are two permutes, and code bit 3 (moved to the sign bit) picks between them.
// NVFP4: (value * E4M3 block scale) * tensor scale; MXFP4: value * 2^e.
template <int N, ScaleFormat kScale>
struct TableDecoder : RowBase {
  __m256 lo_table, hi_table, s, ts;
  void init(const LowbitWeight& lw, int64_t n, int64_t K) {
    RowBase::init(lw, n, K);
    float t[16] = {};
    std::memcpy(t, lw.info->code_values, sizeof(float) << N);
    lo_table = _mm256_loadu_ps(t);
    hi_table = _mm256_loadu_ps(t + 8);
    ts = _mm256_set1_ps(lw.tensor_scale);
  }
  void group(int64_t g) { s = _mm256_set1_ps(scale<kScale>(g)); }
  __m256 at(int64_t i) const {
    const __m256i c = unpack8<N>(q + i / 8 * N);
    __m256 v = _mm256_permutevar8x32_ps(lo_table, c);
    if (N == 4)
      v = _mm256_blendv_ps(v, _mm256_permutevar8x32_ps(hi_table, c),
                           _mm256_castsi256_ps(_mm256_slli_epi32(c, 28)));
    v = _mm256_mul_ps(v, s);
    if (kScale == ScaleFormat::kE4M3) v = _mm256_mul_ps(v, ts);
    return v;
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
    const __m256i set = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(q[i / 8]), bit), bit);
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
