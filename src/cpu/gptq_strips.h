// The strip loop of gptq_update_avx2 / gptq_update_avx512, written once. Included only by
// those per-ISA files, so each instantiation is compiled with its own ISA's flags. K provides
// kCols (columns per register tile), tile<R>(c, ldc, e, lde, u, ldu, k) for R = 1 and 4 rows,
// and axpy(y, x, a, n) (y -= a * x) for the last columns.
#pragma once

#include <cstdint>
#include <cstring>

namespace tensorslim {
namespace cpu {

template <class K>
void gptq_update_in_strips(double* c, int64_t ldc, const double* e, int64_t lde, const double* u,
                           int64_t ldu, int64_t m, int64_t n, int64_t k) {
  // Each strip of u is copied contiguous, kChunk of its rows at a time: u's rows lie ldu
  // apart, which for ldu a multiple of 512 (4 KB; 1536 inputs: 12 KB) puts every row in the
  // same L1 set, and the tile loop then ran at a quarter of its FMA rate (Cholesky and
  // inverse of a 1536 x 1536 Hessian, blocked_cholesky.h: 54 and 70 ms before).
  constexpr int64_t kChunk = 128;
  constexpr int64_t kCols = K::kCols;
  alignas(64) double strip[kChunk * kCols];
  int64_t j = 0;
  for (; j + kCols <= n; j += kCols)
    for (int64_t t0 = 0; t0 < k; t0 += kChunk) {
      const int64_t kc = k - t0 < kChunk ? k - t0 : kChunk;
      for (int64_t t = 0; t < kc; ++t) std::memcpy(strip + t * kCols, u + (t0 + t) * ldu + j, sizeof(double) * kCols);
      int64_t r = 0;
      for (; r + 4 <= m; r += 4) K::template tile<4>(c + r * ldc + j, ldc, e + r * lde + t0, lde, strip, kCols, kc);
      for (; r < m; ++r) K::template tile<1>(c + r * ldc + j, ldc, e + r * lde + t0, lde, strip, kCols, kc);
    }
  for (int64_t r = 0; r < m; ++r)  // the last columns, one row at a time
    for (int64_t t = 0; t < k; ++t) K::axpy(c + r * ldc + j, u + t * ldu + j, e[r * lde + t], n - j);
}

}  // namespace cpu
}  // namespace tensorslim
