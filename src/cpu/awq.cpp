// AWQ's searches on the CPU: every candidate (a scale exponent, or a clip ratio per group)
// is quantized with the fp32 round-to-nearest rules and scored by the output error it
// causes, d^T G d with G the inputs' Gram matrix; rows run in parallel in chunks, and each
// chunk's quadratic forms come from the AVX-512 / AVX2 kernels (awq_avx512.cpp,
// awq_avx2.cpp: half the multiply-adds, on G's folded upper triangle) or, on older CPUs, one
// Eigen (SSE2, cache-blocked) matrix product D G.
#include "tensorslim/awq.h"

#include <Eigen/Dense>
#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "awq_kernels.h"
#include "parallel.h"
#include "tensorslim/gptq.h"
#include "tensorslim/quantize.h"
#include "tensorslim/status.h"

namespace tensorslim {
namespace {

using RowMatF = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// Quantize-dequantize n values with the group's range [lo, hi] shrunk by `ratio`.
void fake_quant(const float* v, float* out, int64_t n, const IntGrid& grid, bool symmetric,
                float ratio) {
  if (cpu::active_isa() >= cpu::Isa::kAVX512) {
    cpu::fake_quant_avx512(v, out, n, grid.qmin, grid.qmax, grid.divisor, symmetric, ratio);
    return;
  }
  if (cpu::active_isa() >= cpu::Isa::kAVX2) {
    cpu::fake_quant_avx2(v, out, n, grid.qmin, grid.qmax, grid.divisor, symmetric, ratio);
    return;
  }
  float lo = 0.0f, hi = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    lo = std::min(lo, v[i]);
    hi = std::max(hi, v[i]);
  }
  lo *= ratio;
  hi *= ratio;
  const float span = symmetric ? std::max(-lo, hi) : hi - lo;
  float scale = span / static_cast<float>(grid.divisor);
  if (!(scale > 0.0f)) scale = 1.0f;
  const float qmin = static_cast<float>(grid.qmin), qmax = static_cast<float>(grid.qmax);
  const float zp = symmetric ? 0.0f : std::min(std::max(std::nearbyint(-lo / scale), qmin), qmax);
  for (int64_t i = 0; i < n; ++i) {
    const float c = std::min(std::max(std::nearbyint(v[i] / scale) + zp, qmin), qmax);
    out[i] = (c - zp) * scale;
  }
}

void check_common(const TensorView& w, const TensorView& g, const AwqQuant& q, const char* fn) {
  const std::string name(fn);
  TS_CHECK_TYPE(w.device == DeviceType::kCPU && g.device == DeviceType::kCPU,
                name + ": CPU tensors expected");
  check_dtype(w, DType::kFloat32, "w");
  check_ndim(w, 2, "w");
  TS_CHECK_VALUE(w.size(0) > 0 && w.size(1) > 0, name + ": w is empty " + shape_str(w));
  check_dtype(g, DType::kFloat32, "g");
  check_shape2(g, w.size(1), w.size(1), "g");
  TS_CHECK_VALUE(q.bits >= 2 && q.bits <= 8, name + ": bits must be in 2..8");
  // Any positive size: ceil(cols / group_size) groups, the last one short if need be.
  TS_CHECK_VALUE(q.group_size > 0,
                 name + ": group_size must be positive, got " + std::to_string(q.group_size));
}

// G's folded upper triangle: d^T G d = sum_i G_ii d_i^2 + sum_{i<j} 2 G_ij d_i d_j, so the
// vector kernels read only i <= j (doubling is exact in float). Any diagonal block of the
// folded matrix is the folded diagonal block of G (the clip search's per-group blocks).
std::vector<float> fold_upper(const std::vector<float>& g, int64_t K) {
  std::vector<float> u(K * K, 0.0f);
  for (int64_t i = 0; i < K; ++i) {
    u[i * K + i] = g[i * K + i];
    for (int64_t j = i + 1; j < K; ++j) u[i * K + j] = 2.0f * g[i * K + j];
  }
  return u;
}

bool vector_isa() { return cpu::active_isa() >= cpu::Isa::kAVX2; }

// out[r] = d_r^T G d_r. G (K x K, symmetric) starts at g with leading dimension ldg; gu is the
// same block of the folded upper triangle (read by the vector kernels only).
void quad_forms(const RowMatF& d, const float* g, const float* gu, int64_t ldg, double* out) {
  const int64_t K = d.cols();
  if (cpu::active_isa() >= cpu::Isa::kAVX512) {
    cpu::quad_forms_avx512(d.data(), d.rows(), K, K, gu, ldg, out, true);
    return;
  }
  if (cpu::active_isa() >= cpu::Isa::kAVX2) {
    cpu::quad_forms_avx2(d.data(), d.rows(), K, K, gu, ldg, out, true);
    return;
  }
  // Baseline: one Eigen matrix product for the chunk (SSE2 SIMD, cache-blocked).
  const Eigen::Map<const RowMatF, 0, Eigen::OuterStride<>> G(g, K, K, Eigen::OuterStride<>(ldg));
  const RowMatF y = d * G;
  for (int64_t r = 0; r < d.rows(); ++r) out[r] = d.row(r).cast<double>().dot(y.row(r).cast<double>());
}

std::vector<float> load(const TensorView& t) {
  const int64_t rows = t.ndim == 2 ? t.size(0) : 1, cols = t.size(-1);
  const int64_t rs = t.ndim == 2 ? t.stride(0) : 0, cs = t.stride(-1);
  std::vector<float> out(rows * cols);
  const float* p = t.ptr<float>();
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) out[r * cols + c] = p[r * rs + c * cs];
  for (float v : out)
    TS_CHECK_VALUE(std::isfinite(v), "awq: input contains NaN or Inf");
  return out;
}

}  // namespace

int64_t awq_search_scale(const TensorView& w, const TensorView& g, const TensorView& act,
                         const AwqQuant& q, int64_t n_grid, const TensorView& losses) {
  check_common(w, g, q, "awq_search_scale");
  const int64_t rows = w.size(0), cols = w.size(1);
  check_dtype(act, DType::kFloat32, "act");
  check_ndim(act, 1, "act");
  TS_CHECK_VALUE(act.size(0) == cols, "act: expected " + std::to_string(cols) + " values, got " +
                                          shape_str(act));
  TS_CHECK_VALUE(n_grid > 0, "awq_search_scale: n_grid must be positive");
  check_dtype(losses, DType::kFloat32, "losses");
  check_ndim(losses, 1, "losses");
  TS_CHECK_VALUE(losses.size(0) == n_grid, "losses: expected " + std::to_string(n_grid) + " values");
  const IntGrid grid = int_grid(q.bits, q.symmetric);

  const std::vector<float> W = load(w), A = load(act), Gv = load(g);
  const std::vector<float> Gu = vector_isa() ? fold_upper(Gv, cols) : std::vector<float>();
  std::vector<float> s(cols);
  std::vector<double> row_loss(rows);
  int64_t best = 0;
  float* lp = losses.ptr<float>();
  for (int64_t k = 0; k < n_grid; ++k) {
    const float alpha = static_cast<float>(k) / static_cast<float>(n_grid);
    for (int64_t j = 0; j < cols; ++j) s[j] = std::pow(std::max(A[j], 1e-4f), alpha);
    const float smax = *std::max_element(s.begin(), s.end());
    const float smin = *std::min_element(s.begin(), s.end());
    const float norm = std::sqrt(smax * smin);
    for (float& v : s) v /= norm;
    cpu::parallel_for(rows, 16, [&](int64_t r0, int64_t r1) {
      std::vector<float> scaled(cols), deq(cols);
      RowMatF d(r1 - r0, cols);
      for (int64_t r = r0; r < r1; ++r) {
        const float* row = &W[r * cols];
        for (int64_t j = 0; j < cols; ++j) scaled[j] = row[j] * s[j];
        for (int64_t c0 = 0; c0 < cols; c0 += q.group_size)
          fake_quant(&scaled[c0], &deq[c0], std::min(q.group_size, cols - c0), grid, q.symmetric,
                     1.0f);
        for (int64_t j = 0; j < cols; ++j) d(r - r0, j) = row[j] - deq[j] / s[j];
      }
      quad_forms(d, Gv.data(), Gu.data(), cols, &row_loss[r0]);
    });
    double total = 0.0;
    for (double l : row_loss) total += l;
    lp[k * losses.stride(0)] = static_cast<float>(total / rows);
    if (lp[k * losses.stride(0)] < lp[best * losses.stride(0)]) best = k;
  }
  return best;
}

void awq_search_clip(const TensorView& w, const TensorView& g, const AwqQuant& q, int64_t n_grid,
                     double max_shrink, const TensorView& best_ratio, const TensorView& losses) {
  check_common(w, g, q, "awq_search_clip");
  const int64_t rows = w.size(0), cols = w.size(1);
  const int64_t gs = std::min(q.group_size, cols), groups = num_groups(cols, gs);
  TS_CHECK_VALUE(n_grid > 0 && max_shrink > 0.0 && max_shrink < 1.0,
                 "awq_search_clip: need n_grid > 0 and 0 < max_shrink < 1");
  const int64_t n_ratios = static_cast<int64_t>(std::floor(max_shrink * n_grid + 1e-9));
  TS_CHECK_VALUE(n_ratios >= 1, "awq_search_clip: max_shrink * n_grid must be >= 1");
  check_dtype(best_ratio, DType::kFloat32, "best_ratio");
  check_shape2(best_ratio, rows, groups, "best_ratio");
  check_dtype(losses, DType::kFloat32, "losses");
  check_ndim(losses, 3, "losses");
  TS_CHECK_VALUE(losses.size(0) == rows && losses.size(1) == groups && losses.size(2) == n_ratios,
                 "losses: expected shape [" + std::to_string(rows) + ", " + std::to_string(groups) +
                     ", " + std::to_string(n_ratios) + "], got " + shape_str(losses));
  TS_CHECK_VALUE(losses.is_contiguous() && best_ratio.is_contiguous(),
                 "awq_search_clip: outputs must be contiguous");
  const IntGrid grid = int_grid(q.bits, q.symmetric);
  const std::vector<float> W = load(w), Gv = load(g);
  const std::vector<float> Gu = vector_isa() ? fold_upper(Gv, cols) : std::vector<float>();
  float* bp = best_ratio.ptr<float>();
  float* lp = losses.ptr<float>();

  cpu::parallel_for(rows, 16, [&](int64_t r0, int64_t r1) {
    const int64_t nr = r1 - r0;
    std::vector<float> deq(gs);
    std::vector<double> qf(nr);
    RowMatF d(nr, gs);
    for (int64_t k = 0; k < groups; ++k) {
      const int64_t len = std::min(gs, cols - k * gs);  // the last group may be short
      if (d.cols() != len) d.resize(nr, len);
      for (int64_t i = 0; i < n_ratios; ++i) {
        const float ratio = 1.0f - static_cast<float>(i) / static_cast<float>(n_grid);
        for (int64_t r = r0; r < r1; ++r) {
          const float* v = &W[r * cols + k * gs];
          fake_quant(v, deq.data(), len, grid, q.symmetric, ratio);
          for (int64_t j = 0; j < len; ++j) d(r - r0, j) = v[j] - deq[j];
        }
        const int64_t off = k * gs * cols + k * gs;
        quad_forms(d, Gv.data() + off, Gu.empty() ? nullptr : Gu.data() + off, cols, qf.data());
        for (int64_t r = r0; r < r1; ++r) lp[(r * groups + k) * n_ratios + i] = static_cast<float>(qf[r - r0]);
      }
      for (int64_t r = r0; r < r1; ++r) {
        const float* out = lp + (r * groups + k) * n_ratios;
        int64_t best = 0;
        for (int64_t i = 1; i < n_ratios; ++i)
          if (out[i] < out[best]) best = i;
        bp[r * groups + k] = 1.0f - static_cast<float>(best) / static_cast<float>(n_grid);
      }
    }
  });
}

}  // namespace tensorslim
