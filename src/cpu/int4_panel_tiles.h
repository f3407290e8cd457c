// The ISA-independent half of the INT4 panel decoders (decode_int4_panel_avx2 / _avx512,
// int4_codes.h), shared by int4_decode_avx2.cpp and int4_decode_avx512.cpp: the rows of a
// micro-panel, one per lane, L lanes per vector (two vectors per micro-panel); their group's
// scales and zero points per lane; L * 4 bytes of each row loaded and transposed, so vector j
// holds each row's codes 8j .. 8j + 7; the rows' last whole 8 codes one 4-byte load each; K's
// tail from the bytes a row has. Each code: shifted to the top of its lane and back down with
// its sign (int4) or without (uint4, then minus the zero point), converted, times the scale:
// (code - z) * scale, as the reference.
//
// Everything is in an anonymous namespace: each per-ISA file compiles its own copy with its
// own -m flags. A vector type V provides:
//   V::kLanes, V::I / V::F (integer / float vectors)
//   V::load_i(const int32_t*), V::load_f(const float*), V::load_row(const uint8_t*) (kLanes * 4 bytes)
//   V::transpose(V::I v[kLanes]), V::store(float*, V::F), V::mul(F, F), V::zero_i(), V::zero_f()
//   V::template code<P>(V::I t, bool uint4, V::I z): code P of each lane (minus z for uint4), as floats
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "int4_codes.h"

namespace tensorslim {
namespace cpu {
namespace {

template <class V>
void decode_int4_panel(const Int4PanelRows& w, int64_t n0, int64_t nr, int64_t k0, int64_t kc, float* packed) {
  constexpr int L = V::kLanes, NR = 2 * L;
  const int64_t row_bytes = (w.K + 1) / 2, k1 = k0 + kc;
  const int64_t whole = std::min(k1, w.K / 8 * 8);  // steps of 8 codes that lie inside the row
  const bool uint4 = w.zero_points != nullptr;
  for (int h = 0; h < 2; ++h) {  // rows L * h .. L * h + L - 1 of the panel, one per lane
    float* dst = packed + L * h;
    const int64_t live = std::min<int64_t>(L, nr - L * h);
    if (live <= 0) {
      for (int64_t k = k0; k < k1; ++k) V::store(dst + (k - k0) * NR, V::zero_f());
      continue;
    }
    const uint8_t* rows[L];
    int64_t row_n[L];
    for (int r = 0; r < L; ++r) {
      row_n[r] = n0 + L * h + std::min<int64_t>(r, live - 1);  // past nr: the last row, scale 0
      rows[r] = w.q + row_n[r] * w.ldq;
    }
    int64_t group = -1;
    typename V::F s = V::zero_f();
    typename V::I z = V::zero_i();
    // Values k .. k + 7 of the L rows (a step of 8 lies in one group) into out[p * NR + lane].
    const auto step = [&](typename V::I t, int64_t k, float* out) {
      if (k / w.gsize != group) {
        group = k / w.gsize;
        alignas(64) float sv[L];
        alignas(64) int32_t zv[L];
        for (int r = 0; r < L; ++r) {
          sv[r] = r < live ? w.scales[row_n[r] * w.lds + group] : 0.0f;
          zv[r] = uint4 ? w.zero_points[row_n[r] * w.ldz + group] : 0;
        }
        s = V::load_f(sv);
        z = V::load_i(zv);
      }
      V::store(out, V::mul(V::template code<0>(t, uint4, z), s));
      V::store(out + NR, V::mul(V::template code<1>(t, uint4, z), s));
      V::store(out + 2 * NR, V::mul(V::template code<2>(t, uint4, z), s));
      V::store(out + 3 * NR, V::mul(V::template code<3>(t, uint4, z), s));
      V::store(out + 4 * NR, V::mul(V::template code<4>(t, uint4, z), s));
      V::store(out + 5 * NR, V::mul(V::template code<5>(t, uint4, z), s));
      V::store(out + 6 * NR, V::mul(V::template code<6>(t, uint4, z), s));
      V::store(out + 7 * NR, V::mul(V::template code<7>(t, uint4, z), s));
    };
    int64_t k = k0;
    for (; k + 8 * L <= whole; k += 8 * L) {  // L * 4 bytes of each row, transposed: v[j] = step j
      typename V::I v[L];
      for (int r = 0; r < L; ++r) v[r] = V::load_row(rows[r] + k / 2);
      V::transpose(v);
      for (int j = 0; j < L; ++j) step(v[j], k + 8 * j, dst + (k + 8 * j - k0) * NR);
    }
    for (; k + 8 <= whole; k += 8) {
      alignas(64) int32_t v[L];
      for (int r = 0; r < L; ++r) std::memcpy(&v[r], rows[r] + k / 2, 4);
      step(V::load_i(v), k, dst + (k - k0) * NR);
    }
    if (k < k1) {  // K's last values (fewer than 8): bytes past the row read as zeros
      alignas(64) int32_t v[L] = {};
      for (int r = 0; r < L; ++r) std::memcpy(&v[r], rows[r] + k / 2, std::min<int64_t>(4, row_bytes - k / 2));
      alignas(64) float tail[8 * NR];
      step(V::load_i(v), k, tail);
      for (int64_t p = 0; p < k1 - k; ++p) std::memcpy(dst + (k - k0 + p) * NR, tail + p * NR, L * sizeof(float));
    }
  }
}

}  // namespace
}  // namespace cpu
}  // namespace tensorslim
