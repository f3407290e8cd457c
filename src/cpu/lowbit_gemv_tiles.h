// The format-independent half of the fused low-bit decode GEMV, shared by
// gemm_lowbit_avx2.cpp and gemm_lowbit_avx512.cpp: the unpack table, the walk over a weight
// row's groups, the register tiling and the format -> decoder dispatch. Only the decoders
// and the vector type differ per ISA.
//
// Everything here sits in an anonymous namespace: each per-ISA file gets its own copy,
// compiled with its own -m flags (a shared inline symbol could be resolved by the linker
// to the AVX-512 copy and run on an AVX2-only CPU).
//
// A vector type V provides:
//   V::Vec, V::kLanes               register type and its float lanes
//   V::zero(), V::load(p), V::store(p, v), V::fmadd(a, b, c), V::sum(v)
//   V::kMaxRows                     activation rows per pass (register budget)
//   V::weight_rows(MB)              weight rows decoded per pass for MB activation rows
// A decoder family Ds provides Ds::Int<N, kSigned>, Ds::Fp8<kE4M3>, Ds::Table<N, ScaleFormat>
// and Ds::Binary; each decoder has init(w, n, K), group(g) and at(i) -> V::kLanes values
// starting at value i (a multiple of kLanes inside the current group, with all kLanes values
// in the row). Every group starts on a multiple of kLanes (lowbit_lanes_fit); the values of
// a row's last group past its last whole step (the short group of a row whose length is no
// multiple of the step) are decoded by the scalar dequantize_values_reference, the same bits. A decoder may also
// offer at_fast(i) and a `fast` flag that group(g) sets where at_fast gives the same values:
// the GEMV then takes at_fast for a group when every row of its block allows it (one test
// per group instead of a branch per step).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "tensorslim/lowbit.h"

namespace tensorslim {
namespace cpu {
namespace {

// Byte-shuffle control and shift counts that move N-bit value j (of 16 starting at a byte
// boundary) into 32-bit lane j: value j's bits start in byte jN/8 and span at most two bytes.
// The AVX2 decoders use the first 8 entries (one 128-bit lane), AVX-512 all 16.
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

// E8M0 byte -> 2^(code - 127) without a libm call (code 0 is the subnormal 2^-127).
inline float e8m0_value(uint8_t code) {
  uint32_t bits = code == 0 ? 0x00400000u : (code == 255 ? 0x7FC00000u : uint32_t(code) << 23);
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// What every decoder needs of its weight row.
struct RowBase {
  const LowbitWeight* w;
  const uint8_t* q;
  int64_t row_bytes;
  int64_t scale_base;
  const float* e4m3_values;
  void init(const LowbitWeight& lw, int64_t n, int64_t K) {
    w = &lw;
    e4m3_values = format_info(Format::kFP8E4M3).code_values;
    q = lw.q + n * lw.q_stride;
    row_bytes = packed_row_bytes(*lw.info, K);
    scale_base = n * lw.scale_stride;
  }
  float f32_scale(int64_t g) const { return static_cast<const float*>(w->scales)[scale_base + g]; }
  // The decoded block scale of NVFP4 (E4M3 byte) / MXFP4 (E8M0 byte), or the fp32 scale.
  template <ScaleFormat kScale>
  float scale(int64_t g) const {
    if (kScale == ScaleFormat::kFloat32) return f32_scale(g);
    const uint8_t code = static_cast<const uint8_t*>(w->scales)[scale_base + g];
    if (kScale == ScaleFormat::kE4M3) return e4m3_values[code];
    return e8m0_value(code);
  }
};


template <class D, class = void>
struct HasFastPath : std::false_type {};
template <class D>
struct HasFastPath<D, decltype(static_cast<void>(std::declval<const D&>().at_fast(0)))>
    : std::true_type {};

enum class Decode { kAt, kFast };

template <Decode kHow, class D>
__attribute__((always_inline)) inline auto decode_at(const D& d, int64_t i) {
  if constexpr (kHow == Decode::kFast)
    return d.at_fast(i);
  else
    return d.at(i);
}

// One dequantized row (at_fast where the decoder allows it: the same bits, and the tests
// of this bit-exact path then cover it too).
// The end of group g's whole vector steps (the group's end, unless it is a short last group).
template <class V>
inline int64_t steps_end(const LowbitWeight& w, int64_t K, int64_t g) {
  const int64_t i0 = g * w.group, i1 = std::min(K, i0 + w.group);
  return i0 + (i1 - i0) / V::kLanes * V::kLanes;
}

template <class V, class D>
void decode_row(const LowbitWeight& w, int64_t n, int64_t K, float* out) {
  D d;
  d.init(w, n, K);
  for (int64_t g = 0; g < w.groups; ++g) {
    d.group(g);
    const int64_t i0 = g * w.group, i1 = steps_end<V>(w, K, g);
    if constexpr (HasFastPath<D>::value) {
      if (d.fast) {
        for (int64_t i = i0; i < i1; i += V::kLanes) V::store(out + i, d.at_fast(i));
        continue;
      }
    }
    for (int64_t i = i0; i < i1; i += V::kLanes) V::store(out + i, d.at(i));
  }
  const int64_t tail = w.groups ? steps_end<V>(w, K, w.groups - 1) : K;
  dequantize_values_reference(w, n, tail, K, out + tail);  // no-op when nothing is left
}

// Values [i0, i1) of one group: acc[m][j] += x[m] * w[j] lane by lane.
template <class V, class D, int MB, int R, Decode kHow>
__attribute__((always_inline)) inline void gemv_group(const float* x, int64_t ldx, const D (&d)[R],
                                                      int64_t i0, int64_t i1,
                                                      typename V::Vec (&acc)[MB][R]) {
  for (int64_t i = i0; i < i1; i += V::kLanes) {
    typename V::Vec xv[MB];
    for (int m = 0; m < MB; ++m) xv[m] = V::load(x + m * ldx + i);
    for (int j = 0; j < R; ++j) {
      const typename V::Vec wv = decode_at<kHow>(d[j], i);
      for (int m = 0; m < MB; ++m) acc[m][j] = V::fmadd(xv[m], wv, acc[m][j]);
    }
  }
}

// Values [k0, K) of the row, fewer than one step: decoded by the scalar reference into a
// zero-padded step (and the activations copied into one), then one more step of FMAs. The
// padding lanes add 0 * 0.
template <class V, int MB, int R>
__attribute__((noinline)) void gemv_tail(const float* x, int64_t ldx, const LowbitWeight& w,
                                         int64_t K, int64_t k0, int64_t n,
                                         typename V::Vec (&acc)[MB][R]) {
  alignas(64) float wt[R][V::kLanes] = {};
  alignas(64) float xt[V::kLanes] = {};
  const int64_t len = K - k0;
  for (int j = 0; j < R; ++j) dequantize_values_reference(w, n + j, k0, K, wt[j]);
  for (int m = 0; m < MB; ++m) {
    std::memcpy(xt, x + m * ldx + k0, static_cast<size_t>(len) * sizeof(float));
    const typename V::Vec xv = V::load(xt);
    for (int j = 0; j < R; ++j) acc[m][j] = V::fmadd(xv, V::load(wt[j]), acc[m][j]);
  }
}

// MB activation rows x R weight rows: MB * R independent accumulators hide the FMA latency.
template <class V, class D, int MB, int R>
void gemv_block(const float* x, int64_t ldx, const LowbitWeight& w, int64_t K, const float* bias,
                float* out, int64_t ldo, int64_t n) {
  D d[R];
  for (int j = 0; j < R; ++j) d[j].init(w, n + j, K);
  typename V::Vec acc[MB][R];
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < R; ++j) acc[m][j] = V::zero();
  for (int64_t g = 0; g < w.groups; ++g) {
    for (int j = 0; j < R; ++j) d[j].group(g);
    const int64_t i0 = g * w.group, i1 = steps_end<V>(w, K, g);
    if constexpr (HasFastPath<D>::value) {
      bool fast = true;
      for (int j = 0; j < R; ++j) fast = fast && d[j].fast;
      if (fast) {
        gemv_group<V, D, MB, R, Decode::kFast>(x, ldx, d, i0, i1, acc);
        continue;
      }
    }
    gemv_group<V, D, MB, R, Decode::kAt>(x, ldx, d, i0, i1, acc);
  }
  const int64_t tail = w.groups ? steps_end<V>(w, K, w.groups - 1) : K;
  if (tail < K) gemv_tail<V, MB, R>(x, ldx, w, K, tail, n, acc);
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < R; ++j)
      out[m * ldo + n + j] = V::sum(acc[m][j]) + (bias ? bias[n + j] : 0.0f);
}

template <class V, class D, int MB>
void gemv_rows(const float* x, int64_t ldx, const LowbitWeight& w, int64_t K, const float* bias,
               float* out, int64_t ldo, int64_t n0, int64_t n1) {
  constexpr int R = V::weight_rows(MB);
  int64_t n = n0;
  for (; n + R <= n1; n += R) gemv_block<V, D, MB, R>(x, ldx, w, K, bias, out, ldo, n);
  for (; n < n1; ++n) gemv_block<V, D, MB, 1>(x, ldx, w, K, bias, out, ldo, n);
}

template <class V, class D>
void gemv(const float* x, int64_t ldx, int64_t M, const LowbitWeight& w, int64_t K,
          const float* bias, float* out, int64_t ldo, int64_t n0, int64_t n1) {
  constexpr int B = V::kMaxRows;
  static_assert(B >= 4 && B <= 8, "pass sizes 1..8");
  for (int64_t m0 = 0; m0 < M; m0 += B) {
    const float* xm = x + m0 * ldx;
    float* om = out + m0 * ldo;
    switch (std::min<int64_t>(B, M - m0)) {
      case 1: gemv_rows<V, D, 1>(xm, ldx, w, K, bias, om, ldo, n0, n1); break;
      case 2: gemv_rows<V, D, 2>(xm, ldx, w, K, bias, om, ldo, n0, n1); break;
      case 3: gemv_rows<V, D, 3>(xm, ldx, w, K, bias, om, ldo, n0, n1); break;
      case 4: gemv_rows<V, D, 4>(xm, ldx, w, K, bias, om, ldo, n0, n1); break;
      case 5: gemv_rows<V, D, std::min(5, B)>(xm, ldx, w, K, bias, om, ldo, n0, n1); break;
      case 6: gemv_rows<V, D, std::min(6, B)>(xm, ldx, w, K, bias, om, ldo, n0, n1); break;
      case 7: gemv_rows<V, D, std::min(7, B)>(xm, ldx, w, K, bias, om, ldo, n0, n1); break;
      default: gemv_rows<V, D, B>(xm, ldx, w, K, bias, om, ldo, n0, n1); break;
    }
  }
}

// Calls fn.template operator()<Decoder>() with the decoder type of this format.
template <class Ds, class Fn>
void with_decoder(const FormatInfo& info, const Fn& fn) {
  using S = ScaleFormat;
  switch (info.format) {
    case Format::kFP8E4M3: return fn.template operator()<typename Ds::template Fp8<true>>();
    case Format::kFP8E5M2: return fn.template operator()<typename Ds::template Fp8<false>>();
    case Format::kNVFP4: return fn.template operator()<typename Ds::template Table<4, S::kE4M3>>();
    case Format::kMXFP4: return fn.template operator()<typename Ds::template Table<4, S::kE8M0>>();
    case Format::kTernary: return fn.template operator()<typename Ds::template Table<2, S::kFloat32>>();
    case Format::kBinary: return fn.template operator()<typename Ds::Binary>();
    default: break;
  }
  const bool s = !info.has_zero_point;
#define TS_INT_DECODER(N)                                                          \
  return s ? fn.template operator()<typename Ds::template Int<N, true>>()          \
           : fn.template operator()<typename Ds::template Int<N, false>>()
  switch (info.bits) {
    case 2: TS_INT_DECODER(2);
    case 3: TS_INT_DECODER(3);
    case 4: TS_INT_DECODER(4);
    case 5: TS_INT_DECODER(5);
    case 6: TS_INT_DECODER(6);
    case 7: TS_INT_DECODER(7);
    default: TS_INT_DECODER(8);
  }
#undef TS_INT_DECODER
}

template <class V>
struct DecodeRowFn {
  const LowbitWeight& w;
  int64_t n, K;
  float* out;
  template <class D>
  void operator()() const { decode_row<V, D>(w, n, K, out); }
};

template <class V>
struct GemvFn {
  const float* x;
  int64_t ldx, M;
  const LowbitWeight& w;
  int64_t K;
  const float* bias;
  float* out;
  int64_t ldo, n0, n1;
  template <class D>
  void operator()() const { gemv<V, D>(x, ldx, M, w, K, bias, out, ldo, n0, n1); }
};

}  // namespace
}  // namespace cpu
}  // namespace tensorslim
