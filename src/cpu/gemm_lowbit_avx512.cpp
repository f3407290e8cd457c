// AVX-512 decoding of every low-bit format, 16 values per step, and the fused GEMV built
// on it: weight codes are decoded in registers and multiplied straight away with up to 8
// activation rows, so the packed weight is read from memory once and never written out
// as floats. The decoders are bit-exact with dequantize_row_reference (tests compare them).
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "tensorslim/lowbit.h"

namespace tensorslim {
namespace cpu {
namespace {

// Byte-shuffle control and shift counts that pull 16 N-bit values out of 16 bytes.
template <int N>
struct ShuffleTable {
  uint8_t shuffle[64] = {};
  int32_t shift[16] = {};
  constexpr ShuffleTable() {
    for (int j = 0; j < 16; ++j) {
      const int first = j * N / 8;
      shuffle[4 * j] = static_cast<uint8_t>(first);
      shuffle[4 * j + 1] = static_cast<uint8_t>(first + 1 < 16 ? first + 1 : 0x80);
      shuffle[4 * j + 2] = shuffle[4 * j + 3] = 0x80;  // zero
      shift[j] = j * N % 8;
    }
  }
};
template <int N>
alignas(64) constexpr ShuffleTable<N> kShuffleTable{};

// 16 consecutive N-bit codes (unsigned) starting at byte p, as 16 int32 lanes. `safe`
// says 16 bytes may be read from p (else only the 2N bytes that hold the codes).
template <int N>
inline __m512i unpack16(const uint8_t* p, bool safe) {
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
    return _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32(static_cast<int>(u)), shifts),
                            _mm512_set1_epi32((1 << N) - 1));
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
    return _mm512_and_si512(_mm512_srlv_epi32(bytes, _mm512_load_si512(t.shift)),
                            _mm512_set1_epi32((1 << N) - 1));
  }
}

// E8M0 byte -> 2^(code - 127) without a libm call (code 0 is the subnormal 2^-127).
inline float e8m0_value(uint8_t code) {
  uint32_t bits = code == 0 ? 0x00400000u : (code == 255 ? 0x7FC00000u : uint32_t(code) << 23);
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// A decoder walks one weight row: group(g) loads that group's scale, at(i) returns the 16
// decoded values starting at value i (a multiple of 16 inside the current group).
struct RowBase {
  const LowbitWeight* w;
  const uint8_t* q;
  int64_t row_bytes;
  int64_t scale_base;
  void init(const LowbitWeight& lw, int64_t n, int64_t K) {
    w = &lw;
    q = lw.q + n * lw.q_stride;
    row_bytes = packed_row_bytes(*lw.info, K);
    scale_base = n * lw.scale_stride;
  }
  float f32_scale(int64_t g) const { return static_cast<const float*>(w->scales)[scale_base + g]; }
};

// Integers: float(code - zp) * scale; signed codes are sign-extended from N bits.
template <int N, bool kSigned>
struct IntDecoder : RowBase {
  __m512 s;
  __m512i zp;
  void group(int64_t g) {
    s = _mm512_set1_ps(f32_scale(g));
    zp = _mm512_set1_epi32(w->zero_points ? w->zero_points[scale_base + g] : 0);
  }
  __m512 at(int64_t i) const {
    const int64_t off = i / 16 * 2 * N;
    __m512i c = unpack16<N>(q + off, off + 16 <= row_bytes);
    if (kSigned) c = _mm512_srai_epi32(_mm512_slli_epi32(c, 32 - N), 32 - N);
    return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(c, zp)), s);
  }
};

// FP8: the 7-bit magnitude shifted into a float's exponent/mantissa field is the value
// times 2^-(127 - bias) for normals and subnormals alike; Inf/NaN patterns are patched.
template <bool kE4M3>
struct Fp8Decoder : RowBase {
  __m512 s;
  void group(int64_t g) { s = _mm512_set1_ps(f32_scale(g)); }
  __m512 at(int64_t i) const {
    const __m512i c = unpack16<8>(q + i, true);
    const __m512i mag = _mm512_and_si512(c, _mm512_set1_epi32(0x7F));
    const __m512i sign = _mm512_slli_epi32(_mm512_and_si512(c, _mm512_set1_epi32(0x80)), 24);
    __m512 v;
    if (kE4M3) {
      v = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_slli_epi32(mag, 20)), _mm512_set1_ps(0x1p120f));
      v = _mm512_mask_blend_ps(_mm512_cmpeq_epi32_mask(mag, _mm512_set1_epi32(0x7F)), v,
                               _mm512_set1_ps(__builtin_nanf("")));
    } else {
      v = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_slli_epi32(mag, 21)), _mm512_set1_ps(0x1p112f));
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
  const float* e4m3_values;
  void init(const LowbitWeight& lw, int64_t n, int64_t K) {
    RowBase::init(lw, n, K);
    float t[16] = {};
    std::memcpy(t, lw.info->code_values, sizeof(float) << N);
    table = _mm512_loadu_ps(t);
    ts = _mm512_set1_ps(lw.tensor_scale);
    e4m3_values = format_info(Format::kFP8E4M3).code_values;
  }
  void group(int64_t g) {
    float scale;
    if (kScale == ScaleFormat::kFloat32)
      scale = f32_scale(g);
    else if (kScale == ScaleFormat::kE4M3)
      scale = e4m3_values[static_cast<const uint8_t*>(w->scales)[scale_base + g]];
    else
      scale = e8m0_value(static_cast<const uint8_t*>(w->scales)[scale_base + g]);
    s = _mm512_set1_ps(scale);
  }
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

template <class D>
void decode_row(const LowbitWeight& w, int64_t n, int64_t K, float* out) {
  D d;
  d.init(w, n, K);
  for (int64_t g = 0; g < w.groups; ++g) {
    d.group(g);
    for (int64_t i = g * w.group; i < (g + 1) * w.group; i += 16) _mm512_storeu_ps(out + i, d.at(i));
  }
}

// MB activation rows x R weight rows: MB * R independent accumulators hide the FMA latency.
template <class D, int MB, int R>
void gemv_block(const float* x, int64_t ldx, const LowbitWeight& w, int64_t K, const float* bias,
                float* out, int64_t ldo, int64_t n) {
  D d[R];
  for (int j = 0; j < R; ++j) d[j].init(w, n + j, K);
  __m512 acc[MB][R];
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < R; ++j) acc[m][j] = _mm512_setzero_ps();
  for (int64_t g = 0; g < w.groups; ++g) {
    for (int j = 0; j < R; ++j) d[j].group(g);
    for (int64_t i = g * w.group; i < (g + 1) * w.group; i += 16) {
      __m512 xv[MB];
      for (int m = 0; m < MB; ++m) xv[m] = _mm512_loadu_ps(x + m * ldx + i);
      for (int j = 0; j < R; ++j) {
        const __m512 wv = d[j].at(i);
        for (int m = 0; m < MB; ++m) acc[m][j] = _mm512_fmadd_ps(xv[m], wv, acc[m][j]);
      }
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < R; ++j)
      out[m * ldo + n + j] = _mm512_reduce_add_ps(acc[m][j]) + (bias ? bias[n + j] : 0.0f);
}

template <class D, int MB>
void gemv_rows(const float* x, int64_t ldx, const LowbitWeight& w, int64_t K, const float* bias,
               float* out, int64_t ldo, int64_t n0, int64_t n1) {
  constexpr int R = MB == 1 ? 4 : (MB == 2 ? 4 : (MB <= 4 ? 2 : 1));
  int64_t n = n0;
  for (; n + R <= n1; n += R) gemv_block<D, MB, R>(x, ldx, w, K, bias, out, ldo, n);
  for (; n < n1; ++n) gemv_block<D, MB, 1>(x, ldx, w, K, bias, out, ldo, n);
}

template <class D>
void gemv(const float* x, int64_t ldx, int64_t M, const LowbitWeight& w, int64_t K,
          const float* bias, float* out, int64_t ldo, int64_t n0, int64_t n1) {
  for (int64_t m0 = 0; m0 < M; m0 += 8) {
    const float* xm = x + m0 * ldx;
    float* om = out + m0 * ldo;
    switch (std::min<int64_t>(8, M - m0)) {
      case 1: gemv_rows<D, 1>(xm, ldx, w, K, bias, om, ldo, n0, n1); break;
      case 2: gemv_rows<D, 2>(xm, ldx, w, K, bias, om, ldo, n0, n1); break;
      case 3: gemv_rows<D, 3>(xm, ldx, w, K, bias, om, ldo, n0, n1); break;
      case 4: gemv_rows<D, 4>(xm, ldx, w, K, bias, om, ldo, n0, n1); break;
      case 5: gemv_rows<D, 5>(xm, ldx, w, K, bias, om, ldo, n0, n1); break;
      case 6: gemv_rows<D, 6>(xm, ldx, w, K, bias, om, ldo, n0, n1); break;
      case 7: gemv_rows<D, 7>(xm, ldx, w, K, bias, om, ldo, n0, n1); break;
      default: gemv_rows<D, 8>(xm, ldx, w, K, bias, om, ldo, n0, n1); break;
    }
  }
}

// Calls fn.template operator()<Decoder>() with the decoder type of this format.
template <class Fn>
void with_decoder(const FormatInfo& info, const Fn& fn) {
  switch (info.format) {
    case Format::kFP8E4M3: return fn.template operator()<Fp8Decoder<true>>();
    case Format::kFP8E5M2: return fn.template operator()<Fp8Decoder<false>>();
    case Format::kNVFP4: return fn.template operator()<TableDecoder<4, ScaleFormat::kE4M3>>();
    case Format::kMXFP4: return fn.template operator()<TableDecoder<4, ScaleFormat::kE8M0>>();
    case Format::kTernary: return fn.template operator()<TableDecoder<2, ScaleFormat::kFloat32>>();
    case Format::kBinary: return fn.template operator()<BinaryDecoder>();
    default: break;
  }
  const bool s = !info.has_zero_point;
  switch (info.bits) {
    case 2: return s ? fn.template operator()<IntDecoder<2, true>>() : fn.template operator()<IntDecoder<2, false>>();
    case 3: return s ? fn.template operator()<IntDecoder<3, true>>() : fn.template operator()<IntDecoder<3, false>>();
    case 4: return s ? fn.template operator()<IntDecoder<4, true>>() : fn.template operator()<IntDecoder<4, false>>();
    case 5: return s ? fn.template operator()<IntDecoder<5, true>>() : fn.template operator()<IntDecoder<5, false>>();
    case 6: return s ? fn.template operator()<IntDecoder<6, true>>() : fn.template operator()<IntDecoder<6, false>>();
    case 7: return s ? fn.template operator()<IntDecoder<7, true>>() : fn.template operator()<IntDecoder<7, false>>();
    default: return s ? fn.template operator()<IntDecoder<8, true>>() : fn.template operator()<IntDecoder<8, false>>();
  }
}

struct DecodeRowFn {
  const LowbitWeight& w;
  int64_t n, K;
  float* out;
  template <class D>
  void operator()() const { decode_row<D>(w, n, K, out); }
};

struct GemvFn {
  const float* x;
  int64_t ldx, M;
  const LowbitWeight& w;
  int64_t K;
  const float* bias;
  float* out;
  int64_t ldo, n0, n1;
  template <class D>
  void operator()() const { gemv<D>(x, ldx, M, w, K, bias, out, ldo, n0, n1); }
};

}  // namespace

void dequantize_row_avx512(const LowbitWeight& w, int64_t n, int64_t K, float* out) {
  with_decoder(*w.info, DecodeRowFn{w, n, K, out});
}

void linear_lowbit_avx512(const float* x, int64_t ldx, int64_t M, const LowbitWeight& w,
                          int64_t K, const float* bias, float* out, int64_t ldo, int64_t n0,
                          int64_t n1) {
  with_decoder(*w.info, GemvFn{x, ldx, M, w, K, bias, out, ldo, n0, n1});
}

}  // namespace cpu
}  // namespace tensorslim
