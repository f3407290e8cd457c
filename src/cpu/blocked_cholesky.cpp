// Blocked Cholesky and lower-triangular inverse (blocked_cholesky.h): panels of kPanel
// columns (rows); every product with O(n^3) or O(n^2 kPanel) work runs as c -= e * u in
// GPTQ's update kernels, the panels' own small triangles in plain loops.
#include "blocked_cholesky.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "gptq_kernels.h"
#include "parallel.h"
#include "tensorslim/quantize.h"

namespace tensorslim {
namespace cpu {
namespace {

// A multiple of both kernels' tile widths (12 doubles on AVX2, 24 on AVX-512), so that the
// products over a panel's columns have no ragged strip.
constexpr int64_t kPanel = 48;

// c[r, j] -= sum_t e[r, t] * u[t, j] (gptq_kernels.h), on the active ISA.
void update(double* c, int64_t ldc, const double* e, int64_t lde, const double* u, int64_t ldu, int64_t m,
            int64_t n, int64_t k) {
  const Isa isa = active_isa();
#if defined(TENSORSLIM_HAVE_AVX512) && defined(TENSORSLIM_HAVE_AVX2)
  if (isa >= Isa::kAVX512) return gptq_update_avx512(c, ldc, e, lde, u, ldu, m, n, k);
  if (isa >= Isa::kAVX2) return gptq_update_avx2(c, ldc, e, lde, u, ldu, m, n, k);
#endif
  (void)isa;
  for (int64_t r = 0; r < m; ++r)
    for (int64_t t = 0; t < k; ++t) {
      const double a = e[r * lde + t];
      for (int64_t j = 0; j < n; ++j) c[r * ldc + j] -= a * u[t * ldu + j];
    }
}

// Blocks of a lower triangle grow with their index: threads take them in the order 0, last,
// 1, last - 1, ..., so that a contiguous share of that order holds as much work as another.
int64_t balanced(int64_t i, int64_t count) { return i % 2 == 0 ? i / 2 : count - 1 - i / 2; }

// inv [b, b] row-major = -(l^-1) for l lower [b, b] with row stride ldl (unblocked: b^3 / 6).
void negated_small_inverse(const double* l, int64_t ldl, int64_t b, double* inv) {
  std::fill(inv, inv + b * b, 0.0);
  for (int64_t i = 0; i < b; ++i) {
    const double d = l[i * ldl + i];
    inv[i * b + i] = -1.0 / d;
    for (int64_t j = 0; j < i; ++j) {
      double s = 0.0;
      for (int64_t t = j; t < i; ++t) s += l[i * ldl + t] * inv[t * b + j];
      inv[i * b + j] = -s / d;
    }
  }
}

}  // namespace

bool cholesky_lower(double* a, int64_t n) {
  std::vector<double> inv(kPanel * kPanel), invt(kPanel * kPanel), panel, u;
  for (int64_t k0 = 0; k0 < n; k0 += kPanel) {
    const int64_t k1 = std::min(n, k0 + kPanel), b = k1 - k0, rest = n - k1;
    // The diagonal block (earlier panels already subtracted from it), column by column.
    for (int64_t j = k0; j < k1; ++j) {
      double d = a[j * n + j];
      for (int64_t t = k0; t < j; ++t) d -= a[j * n + t] * a[j * n + t];
      if (!(d > 0.0) || !std::isfinite(d)) return false;
      d = std::sqrt(d);
      a[j * n + j] = d;
      for (int64_t i = j + 1; i < k1; ++i) {
        double s = a[i * n + j];
        for (int64_t t = k0; t < j; ++t) s -= a[i * n + t] * a[j * n + t];
        a[i * n + j] = s / d;
      }
    }
    if (rest == 0) break;
    // The panel below: L21 = A21 L11^-T, one product with the panel's inverse (twice the
    // flops of a triangular solve, at the kernel's rate instead of short axpys').
    negated_small_inverse(a + k0 * n + k0, n, b, inv.data());
    for (int64_t t = 0; t < b; ++t)
      for (int64_t j = 0; j < b; ++j) invt[t * b + j] = inv[j * b + t];  // -(L11^-1)^T
    panel.resize(rest * b);
    for (int64_t i = 0; i < rest; ++i) {
      std::memcpy(&panel[i * b], a + (k1 + i) * n + k0, sizeof(double) * b);
      std::fill(a + (k1 + i) * n + k0, a + (k1 + i) * n + k1, 0.0);
    }
    parallel_for(rest, 16, [&](int64_t r0, int64_t r1) {
      update(a + (k1 + r0) * n + k0, n, &panel[r0 * b], b, invt.data(), b, r1 - r0, b, b);
    });
    // The trailing matrix's lower part: a[k1:, k1:] -= L21 L21^T, by row blocks, each up to
    // its own last column (the diagonal block's upper half comes along, unread).
    u.resize(b * rest);
    for (int64_t t = 0; t < b; ++t)
      for (int64_t c = 0; c < rest; ++c) u[t * rest + c] = a[(k1 + c) * n + k0 + t];
    const int64_t blocks = (rest + kPanel - 1) / kPanel;
    parallel_for(blocks, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t i = b0; i < b1; ++i) {
        const int64_t blk = balanced(i, blocks);
        const int64_t r0 = k1 + blk * kPanel, r1 = std::min(n, r0 + kPanel);
        update(a + r0 * n + k1, n, a + r0 * n + k0, n, u.data(), rest, r1 - r0, r1 - k1, b);
      }
    });
  }
  return true;
}

void lower_inverse(const double* l, int64_t n, double* x) {
  std::fill(x, x + n * n, 0.0);
  std::vector<double> inv(kPanel * kPanel), rows;
  for (int64_t i0 = 0; i0 < n; i0 += kPanel) {
    const int64_t i1 = std::min(n, i0 + kPanel), m = i1 - i0;
    negated_small_inverse(l + i0 * n + i0, n, m, inv.data());
    for (int64_t i = 0; i < m; ++i)  // the diagonal block of l^-1
      for (int64_t j = 0; j <= i; ++j) x[(i0 + i) * n + i0 + j] = -inv[i * m + j];
    if (i0 == 0) continue;
    // x[i0:i1, :i0] = -L_ii^-1 (l[i0:i1, :i0] x[:i0, :i0]). First -(l x) into rows, by column
    // strips, each from its first column's row (x is lower: rows above a column hold zeros
    // there) ...
    rows.assign(m * i0, 0.0);
    const int64_t strips = (i0 + kPanel - 1) / kPanel;
    parallel_for(strips, 1, [&](int64_t s0, int64_t s1) {
      for (int64_t i = s0; i < s1; ++i) {
        const int64_t c0 = balanced(i, strips) * kPanel, w = std::min(kPanel, i0 - c0);
        update(rows.data() + c0, i0, l + i0 * n + c0, n, x + c0 * n + c0, n, m, w, i0 - c0);
      }
    });
    // ... then times L_ii^-1 from the left: x[i0:i1, :i0] -= (-L_ii^-1) rows.
    parallel_for(i0, 64, [&](int64_t c0, int64_t c1) {
      update(x + i0 * n + c0, n, inv.data(), m, rows.data() + c0, i0, m, c1 - c0, m);
    });
  }
}

}  // namespace cpu
}  // namespace tensorslim
