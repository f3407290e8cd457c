// The ISA-independent half of the binary / ternary / XNOR kernels, shared by
// binary_avx512.cpp and binary_avx2.cpp: the problem structs, tail helpers, the XNOR
// integer-to-output step and the loop over weight-row x activation-row tiles. Only the
// tiles' vector code differs per ISA.
//
// Everything is in an anonymous namespace: each per-ISA file compiles its own copy with its
// own -m flags (a shared inline symbol could resolve to the AVX-512 copy on an AVX2 CPU).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "parallel.h"
#include "tensorslim/binary.h"

namespace tensorslim {
namespace cpu {
namespace {

// Up to `max_bytes` bytes from p as a little-endian integer (never reads past them).
inline uint32_t load_le(const uint8_t* p, int64_t max_bytes, int want) {
  uint32_t v = 0;
  const int n = static_cast<int>(std::min<int64_t>(max_bytes, want));
  std::memcpy(&v, p, n);
  return v;
}

struct Linear {
  const TensorView& x;
  const TensorView& w;
  const TensorView& scales;
  const TensorView* bias;
  const TensorView& out;
  int64_t K;
};

// Output (m, n) of a binary linear as the reference computes it (+-x summed in double).
// The tiles' 2 * P - S overflows, or is inf - inf, where the +-1 dot product need not (the
// sum of |x| past FLT_MAX / 2); their non-finite results are computed again this way.
inline float binary_out_exact(const Linear& p, int64_t n, int64_t m) {
  const uint8_t* w = p.w.ptr<uint8_t>() + n * p.w.strides[0];
  const float* x = p.x.ptr<float>() + m * p.x.strides[0];
  double acc = 0.0;
  for (int64_t k = 0; k < p.K; ++k) acc += ((w[k >> 3] >> (k & 7)) & 1) ? x[k] : -static_cast<double>(x[k]);
  return static_cast<float>(acc * p.scales.ptr<float>()[n] + (p.bias ? p.bias->ptr<float>()[n] : 0.0f));
}

// a_bits / w_bits rows hold at least ceil(K/8) bytes; only the first K bits count.
struct Xnor {
  const TensorView& a;
  const TensorView& w;
  const TensorView& dots;
  int64_t K;
};

// Mismatching bits of the last, partial byte (K % 8 bits of it count).
inline int last_byte_mismatches(const uint8_t* a, const uint8_t* w, int64_t K) {
  const int rem = static_cast<int>(K & 7);
  if (!rem) return 0;
  const int64_t i = K >> 3;
  return __builtin_popcount(static_cast<unsigned>((a[i] ^ w[i]) & ((1u << rem) - 1u)));
}

// dots = K - 2 * mismatches, mism[r][m] counting the whole bytes.
template <int R, int MB>
void xnor_store(const Xnor& p, int64_t n, int64_t m0, int64_t mism[R][MB]) {
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) {
      const uint8_t* wr = p.w.ptr<uint8_t>() + (n + r) * p.w.strides[0];
      const uint8_t* ar = p.a.ptr<uint8_t>() + (m0 + m) * p.a.strides[0];
      const int64_t diff = mism[r][m] + last_byte_mismatches(ar, wr, p.K);
      p.dots.ptr<int32_t>()[(m0 + m) * p.dots.strides[0] + n + r] = static_cast<int32_t>(p.K - 2 * diff);
    }
}

// Tiles of kRows weight rows x up to kBlock activation rows (kBlock in 2..4), split over
// the threads by weight-row blocks; Tile<R, MB>::run(p, n, m0, extra...) computes one. A
// last block of fewer rows goes one row and one activation row at a time.
template <int kRows, int kBlock, template <int, int> class Tile, class P, class... Extra>
void run_tiles(const P& p, int64_t M, int64_t N, Extra... extra) {
  static_assert(kBlock >= 2 && kBlock <= 4, "tile sizes 1..4");
  parallel_for((N + kRows - 1) / kRows, 4, [&](int64_t b, int64_t e) {
    for (int64_t nb = b; nb < e; ++nb) {
      const int64_t n = nb * kRows;
      const int64_t rows = std::min<int64_t>(kRows, N - n);
      for (int64_t m0 = 0; m0 < M; m0 += kBlock) {
        const int64_t mb = std::min<int64_t>(kBlock, M - m0);
        if (rows == kRows) {
          switch (mb) {
            case 1: Tile<kRows, 1>::run(p, n, m0, extra...); break;
            case 2: Tile<kRows, 2>::run(p, n, m0, extra...); break;
            case 3: Tile<kRows, std::min(3, kBlock)>::run(p, n, m0, extra...); break;
            default: Tile<kRows, kBlock>::run(p, n, m0, extra...); break;
          }
        } else {
          for (int64_t r = 0; r < rows; ++r)
            for (int64_t m = m0; m < m0 + mb; ++m) Tile<1, 1>::run(p, n + r, m, extra...);
        }
      }
    }
  });
}

}  // namespace
}  // namespace cpu
}  // namespace tensorslim
