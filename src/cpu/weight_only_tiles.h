// The output-side loops of the native weight-only kernels, shared by gemm_avx2.cpp and
// gemm_avx512.cpp; only the vector part differs. Included by those per-ISA files alone, so
// every instantiation is compiled with its own ISA's flags. A kernel type V provides:
//   V::Vec          the accumulator register type
//   V::kMaxBlock    activation rows per pass over a weight row (register budget)
//   V::dot<R, MB, kBits, kSigned>(wrow, sc, zrow, K, gsize, xp, acc)   acc[R][MB] of Vec
//   V::sum(Vec)     its horizontal sum
#pragma once

#include <algorithm>

#include "half.h"
#include "parallel.h"
#include "weight_only_native.h"

namespace tensorslim {
namespace cpu {

// The scalar end of a group that the vector chunks leave (a short last group, or INT8 groups
// not a multiple of the vector width): t[r][m] = sum over k in [k0, kend) of
// (code[r][k] - zp[r][g]) * x[m][k]. Only ever the row's last partial INT4 block, which
// pack_activations leaves in natural order, so k indexes xp directly.
template <int R, int MB, int kBits, bool kSigned>
void weight_only_tail_sums(const uint8_t* const* wrow, const uint8_t* const* zrow, int64_t g,
                           int64_t K, int64_t k0, int64_t kend, const float* xp, float t[R][MB]) {
  for (int r = 0; r < R; ++r) {
    const int32_t zp = zrow[r] ? zrow[r][g] : 0;
    for (int m = 0; m < MB; ++m) t[r][m] = 0.0f;
    for (int64_t k = k0; k < kend; ++k) {
      int32_t code;
      if (kBits == 4) {
        const uint8_t nib = (k & 1) ? (wrow[r][k / 2] >> 4) : (wrow[r][k / 2] & 0xF);
        code = kSigned ? static_cast<int8_t>(static_cast<uint8_t>(nib << 4)) >> 4 : nib;
      } else {
        code = kSigned ? static_cast<int8_t>(wrow[r][k]) : wrow[r][k];
      }
      const float w = static_cast<float>(code - zp);
      for (int m = 0; m < MB; ++m) t[r][m] += w * xp[m * K + k];
    }
  }
}

// Output rows n .. n+R-1 for activation rows m0 .. m0+MB-1.
template <class V, int R, int MB, int kBits, bool kSigned>
void weight_only_tile(const WeightOnlyProblem& p, int64_t n, int64_t m0) {
  const uint8_t* wrow[R];
  const float* sc[R];
  const uint8_t* zrow[R];
  for (int r = 0; r < R; ++r) {
    wrow[r] = p.qweight.ptr<uint8_t>() + (n + r) * p.qweight.strides[0];
    sc[r] = p.scales.ptr<float>() + (n + r) * p.groups;
    zrow[r] = p.zero_points ? p.zero_points->ptr<uint8_t>() + (n + r) * p.groups : nullptr;
  }
  typename V::Vec acc[R][MB];
  V::template dot<R, MB, kBits, kSigned>(wrow, sc, zrow, p.K, p.gsize, p.xp + m0 * p.K, acc);
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) {
      const float y = V::sum(acc[r][m]) + (p.bias ? p.bias->ptr<float>()[n + r] : 0.0f);
      const int64_t off = (m0 + m) * p.out.strides[0] + n + r;
      if (p.out.dtype == DType::kFloat32)
        p.out.ptr<float>()[off] = y;
      else
        p.out.ptr<uint16_t>()[off] = float_to_bf16(y);
    }
}

// Output rows n .. n+R-1 for every activation row, V::kMaxBlock activation rows per pass
// (the weight rows stay in L1 between passes).
template <class V, int R, int kBits, bool kSigned>
void weight_only_rows(const WeightOnlyProblem& p, int64_t n, int64_t M) {
  constexpr int B = V::kMaxBlock;
  for (int64_t m0 = 0; m0 < M; m0 += B) {
    switch (std::min<int64_t>(B, M - m0)) {
      case 1: weight_only_tile<V, R, 1, kBits, kSigned>(p, n, m0); break;
      case 2: weight_only_tile<V, R, std::min(2, B), kBits, kSigned>(p, n, m0); break;
      case 3: weight_only_tile<V, R, std::min(3, B), kBits, kSigned>(p, n, m0); break;
      default: weight_only_tile<V, R, B, kBits, kSigned>(p, n, m0); break;
    }
  }
}

// Four weight rows per step for one activation row, two otherwise (register budget).
template <class V, int kBits, bool kSigned>
void weight_only_run(const WeightOnlyProblem& p, int64_t M) {
  const int64_t N = p.qweight.shape[0], K = p.K;
  // Below ~2M multiply-adds one thread finishes before a second would be awake.
  const int64_t grain = std::max<int64_t>(8, (int64_t{1} << 21) / std::max<int64_t>(K * M, 1));
  parallel_for(N, grain, [&](int64_t b, int64_t e) {
    int64_t n = b;
    if (M == 1)
      for (; n + 4 <= e; n += 4) weight_only_rows<V, 4, kBits, kSigned>(p, n, M);
    else
      for (; n + 2 <= e; n += 2) weight_only_rows<V, 2, kBits, kSigned>(p, n, M);
    for (; n < e; ++n) weight_only_rows<V, 1, kBits, kSigned>(p, n, M);
  });
}

template <class V>
void weight_only_dispatch(const WeightOnlyProblem& p, Format fmt, int64_t M) {
  switch (fmt) {
    case Format::kInt8: return weight_only_run<V, 8, true>(p, M);
    case Format::kUInt8: return weight_only_run<V, 8, false>(p, M);
    case Format::kInt4: return weight_only_run<V, 4, true>(p, M);
    case Format::kUInt4: return weight_only_run<V, 4, false>(p, M);
    default: return;
  }
}

}  // namespace cpu
}  // namespace tensorslim
