// The ISA-independent loop of the E2M1 GEMV (fp4_gemv.h), included by fp4_gemv_avx2.cpp and
// fp4_gemv_avx512.cpp, each compiling its own copy (anonymous namespace, as
// lowbit_gemv_tiles.h explains).
//
// A vector type V provides Vec, kLanes, zero / set1 / load / mul / fmadd / sum, Table and
// table(code_values) (the format's 16 values as its decode reads them), decode(p, table, lo,
// hi): the values of the 2 * kLanes codes in the kLanes bytes at p, low nibbles (even k) in
// lo and high nibbles (odd k) in hi, scales<kScale>(bytes, tensor_scale, out): kLanes scale
// bytes decoded as the reference decodes them, and pair(p): p[0] in the first kLanes / 2
// lanes and p[1] in the others (NVFP4 blocks of 16 on 16 lanes: a step of 32 values spans
// two groups).
#pragma once

#include <algorithm>
#include <cstdint>

#include "fp4_gemv.h"
#include "lowbit_gemv_tiles.h"

namespace tensorslim {
namespace cpu {
namespace {

// The scales of groups [0, count) of a row whose scale bytes start at s, decoded into out:
// L at a time by V::scales (bit-exact with the table / E8M0 rule), the rest one by one.
template <class V, ScaleFormat kScale>
inline void fp4_scales(const uint8_t* s, int64_t count, float tensor_scale, float* out) {
  int64_t g = 0;
  for (; g + V::kLanes <= count; g += V::kLanes) V::template scales<kScale>(s + g, tensor_scale, out + g);
  const float* e4m3 = format_info(Format::kFP8E4M3).code_values;
  for (; g < count; ++g) out[g] = kScale == ScaleFormat::kE4M3 ? e4m3[s[g]] * tensor_scale : e8m0_value(s[g]);
}

// Groups decoded ahead per row: their scales sit in a small buffer, read by one broadcast
// (or, for two NVFP4 groups per step, one pair load) per step: decoding a scale byte per
// group and row inside the loop cost more vector work than the codes (MXFP4 on AVX-512).
constexpr int64_t kFp4ScaleChunk = 64;

// R weight rows from row n, MB activation rows: per scale step (a group, or one step of 2L
// values holding two NVFP4 groups) the unscaled products go to part, then acc += part * scale.
template <class V, ScaleFormat kScale, int MB, int R>
void fp4_rows(const Fp4Acts& a, const LowbitWeight& w, const float* bias, float* out, int64_t ldo, int64_t n) {
  using Vec = typename V::Vec;
  constexpr int64_t L = V::kLanes, B = 2 * L;
  const bool split = w.group < B;  // two groups per step (NVFP4 on 16 lanes)
  const int64_t step = std::max<int64_t>(w.group, B), K = a.K, per_step = split ? 2 : 1;
  const typename V::Table table = V::table(w.info->code_values);
  const uint8_t* q[R];
  const uint8_t* s[R];
  for (int j = 0; j < R; ++j) {
    q[j] = w.q + (n + j) * w.q_stride;
    s[j] = static_cast<const uint8_t*>(w.scales) + (n + j) * w.scale_stride;
  }
  // The next R rows follow these in memory: they go to L2 as one linear stream as the steps
  // go (R short streams alone leave memory idle between pages, as in the W4A8 row kernels).
  const char* next = reinterpret_cast<const char*>(w.q + (n + R) * w.q_stride);
  alignas(64) float sc[R][kFp4ScaleChunk];
  Vec acc[MB][R];
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < R; ++j) acc[m][j] = V::zero();
  for (int64_t g0 = 0; g0 < w.groups; g0 += kFp4ScaleChunk) {
    const int64_t gn = std::min(kFp4ScaleChunk, w.groups - g0);
    for (int j = 0; j < R; ++j) fp4_scales<V, kScale>(s[j] + g0, gn, w.tensor_scale, sc[j]);
    for (int64_t gi = 0; gi < gn; gi += per_step) {
      const int64_t k0 = (g0 + gi) * w.group;
      Vec part[MB][R];
      for (int64_t k = k0; k < k0 + step; k += B) {
        if (R > 1) __builtin_prefetch(next + k / 2 * R, 0, 2);
        Vec xl[MB], xh[MB];
        for (int m = 0; m < MB; ++m) {
          xl[m] = V::load(a.x + m * K + k);
          xh[m] = V::load(a.x + m * K + k + L);
        }
        for (int j = 0; j < R; ++j) {
          Vec lo, hi;
          V::decode(q[j] + k / 2, table, lo, hi);
          for (int m = 0; m < MB; ++m) {
            part[m][j] = k == k0 ? V::mul(xl[m], lo) : V::fmadd(xl[m], lo, part[m][j]);
            part[m][j] = V::fmadd(xh[m], hi, part[m][j]);
          }
        }
      }
      for (int j = 0; j < R; ++j) {
        const Vec sv = split ? V::pair(sc[j] + gi) : V::set1(sc[j][gi]);
        for (int m = 0; m < MB; ++m) acc[m][j] = V::fmadd(part[m][j], sv, acc[m][j]);
      }
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < R; ++j) out[m * ldo + n + j] = V::sum(acc[m][j]) + (bias ? bias[n + j] : 0.0f);
}

template <class V, ScaleFormat kScale, int MB>
void fp4_pass(const Fp4Acts& a, const LowbitWeight& w, const float* bias, float* out, int64_t ldo, int64_t n0,
              int64_t n1) {
  constexpr int R = V::weight_rows(MB);
  int64_t n = n0;
  for (; n + R <= n1; n += R) fp4_rows<V, kScale, MB, R>(a, w, bias, out, ldo, n);
  for (; n < n1; ++n) fp4_rows<V, kScale, MB, 1>(a, w, bias, out, ldo, n);
}

// Passes of up to V::kMaxRows activation rows.
template <class V, ScaleFormat kScale>
void fp4_gemv(const Fp4Acts& a, const LowbitWeight& w, const float* bias, float* out, int64_t ldo, int64_t n0,
              int64_t n1) {
  static_assert(V::kMaxRows == 2 || V::kMaxRows == 4, "pass sizes");
  for (int64_t m0 = 0; m0 < a.M; m0 += V::kMaxRows) {
    const Fp4Acts am{a.x + m0 * a.K, std::min<int64_t>(V::kMaxRows, a.M - m0), a.K};
    float* om = out + m0 * ldo;
    switch (am.M) {
      case 1: fp4_pass<V, kScale, 1>(am, w, bias, om, ldo, n0, n1); break;
      case 2: fp4_pass<V, kScale, 2>(am, w, bias, om, ldo, n0, n1); break;
      case 3: fp4_pass<V, kScale, std::min(3, V::kMaxRows)>(am, w, bias, om, ldo, n0, n1); break;
      default: fp4_pass<V, kScale, V::kMaxRows>(am, w, bias, om, ldo, n0, n1); break;
    }
  }
}

template <class V>
void fp4_dispatch(const Fp4Acts& a, const LowbitWeight& w, const float* bias, float* out, int64_t ldo, int64_t n0,
                  int64_t n1) {
  if (w.info->scale_format == ScaleFormat::kE4M3) fp4_gemv<V, ScaleFormat::kE4M3>(a, w, bias, out, ldo, n0, n1);
  else fp4_gemv<V, ScaleFormat::kE8M0>(a, w, bias, out, ldo, n0, n1);
}

}  // namespace
}  // namespace cpu
}  // namespace tensorslim
