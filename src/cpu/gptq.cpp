// GPTQ on the CPU with Eigen: Cholesky of the damped inverse Hessian, then rows processed
// in parallel (rows are independent given H), each column quantized in turn with its error
// spread over the rest of its block, and the block's errors applied to the later columns
// as one matrix product (the paper's lazy batch update).
#include "tensorslim/gptq.h"

#include <Eigen/Dense>
#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>
#include <vector>

#include "gptq_kernels.h"
#include "hessian.h"
#include "parallel.h"
#include "tensorslim/quantize.h"
#include "tensorslim/status.h"

namespace tensorslim {
namespace {

using cpu::RowMat;

struct GroupParam {
  float scale;
  int32_t zp;
};

GroupParam find_params(const double* v, int64_t n, const IntGrid& grid, bool symmetric) {
  double lo = 0.0, hi = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    lo = std::min(lo, v[i]);
    hi = std::max(hi, v[i]);
  }
  const double span = symmetric ? std::max(-lo, hi) : hi - lo;
  float scale = static_cast<float>(span / grid.divisor);
  if (!(scale > 0.0f)) scale = 1.0f;
  int32_t zp = 0;
  if (!symmetric) {
    const double z = std::nearbyint(-lo / static_cast<double>(scale));
    zp = static_cast<int32_t>(std::min<double>(std::max<double>(z, grid.qmin), grid.qmax));
  }
  return {scale, zp};
}

void check_args(const TensorView& w, const TensorView& h, const GptqOptions& opt,
                const TensorView& codes, const TensorView& scales, const TensorView& zps) {
  for (const TensorView* t : {&w, &h, &codes, &scales, &zps})
    TS_CHECK_TYPE(t->device == DeviceType::kCPU, "gptq_quantize: CPU tensors expected");
  check_dtype(w, DType::kFloat32, "w");
  check_ndim(w, 2, "w");
  const int64_t rows = w.size(0), cols = w.size(1);
  TS_CHECK_VALUE(rows > 0 && cols > 0, "gptq_quantize: w is empty " + shape_str(w));
  check_dtype(h, DType::kFloat32, "h");
  check_shape2(h, cols, cols, "h");
  TS_CHECK_VALUE(opt.bits >= 2 && opt.bits <= 8,
                 "gptq_quantize: bits must be in 2..8, got " + std::to_string(opt.bits));
  TS_CHECK_VALUE(opt.group_size > 0, "gptq_quantize: group_size must be positive, got " +
                                         std::to_string(opt.group_size));
  TS_CHECK_VALUE(opt.block_size > 0, "gptq_quantize: block_size must be positive");
  TS_CHECK_VALUE(opt.damp >= 0.0 && std::isfinite(opt.damp), "gptq_quantize: damp must be >= 0");
  const int64_t groups = num_groups(cols, opt.group_size);
  check_dtype(codes, DType::kInt32, "codes");
  check_shape2(codes, rows, cols, "codes");
  check_dtype(scales, DType::kFloat32, "scales");
  check_shape2(scales, rows, groups, "scales");
  check_dtype(zps, DType::kUInt8, "zero_points");
  check_shape2(zps, rows, groups, "zero_points");
}

// y[0, n) -= a * x[0, n), on the active ISA.
void axpy(cpu::Isa isa, double* y, const double* x, double a, int64_t n) {
  if (isa >= cpu::Isa::kAVX512) return cpu::gptq_axpy_avx512(y, x, a, n);
  if (isa >= cpu::Isa::kAVX2) return cpu::gptq_axpy_avx2(y, x, a, n);
  for (int64_t j = 0; j < n; ++j) y[j] -= a * x[j];
}

}  // namespace

IntGrid int_grid(int bits, bool symmetric) {
  TS_CHECK_VALUE(bits >= 2 && bits <= 8, "bits must be in 2..8, got " + std::to_string(bits));
  if (symmetric) {
    const int32_t qmax = (1 << (bits - 1)) - 1;
    return {-qmax - 1, qmax, qmax};
  }
  const int32_t qmax = (1 << bits) - 1;
  return {0, qmax, qmax};
}

GptqResult gptq_quantize(const TensorView& w, const TensorView& h, const GptqOptions& opt,
                         const TensorView& codes, const TensorView& scales,
                         const TensorView& zps) {
  check_args(w, h, opt, codes, scales, zps);
  const int64_t rows = w.size(0), cols = w.size(1);
  // ceil(cols / g) groups, the last one short when g does not divide cols.
  const int64_t g = std::min(opt.group_size, cols), groups = num_groups(cols, g);
  auto group_len = [&](int64_t start) { return std::min(g, cols - start); };
  const IntGrid grid = int_grid(opt.bits, opt.symmetric);

  RowMat W = cpu::load_weight(w, "gptq_quantize");
  Eigen::MatrixXd H = cpu::load_hessian(h, "gptq_quantize");
  cpu::drop_dead_inputs(&H, &W);

  std::vector<int64_t> perm(cols);
  std::iota(perm.begin(), perm.end(), 0);
  if (opt.act_order)
    std::stable_sort(perm.begin(), perm.end(), [&](int64_t a, int64_t b) { return H(a, a) > H(b, b); });

  const bool static_groups = opt.act_order || g == cols;
  std::vector<GroupParam> params(rows * groups);
  if (static_groups) {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t k = 0; k < groups; ++k)
        params[r * groups + k] = find_params(&W(r, k * g), group_len(k * g), grid, opt.symmetric);
  }
  if (opt.act_order) {
    RowMat Wp(rows, cols);
    Eigen::MatrixXd Hp(cols, cols);
    for (int64_t j = 0; j < cols; ++j) Wp.col(j) = W.col(perm[j]);
    for (int64_t i = 0; i < cols; ++i)
      for (int64_t j = 0; j < cols; ++j) Hp(i, j) = H(perm[i], perm[j]);
    W.swap(Wp);
    H.swap(Hp);
  }

  Eigen::MatrixXd L;  // U = L^T: U(i, j) = L(j, i), row i of U is column i of L
  const double damp_used = cpu::inverse_cholesky(H, opt.damp, &L, "gptq_quantize");
  H.resize(0, 0);

  // Dynamic groups are measured when they start, so a block must hold whole groups.
  const int64_t block = static_groups ? opt.block_size : (opt.block_size + g - 1) / g * g;
  std::vector<double> row_loss(rows, 0.0);
  int32_t* cp = codes.ptr<int32_t>();
  const cpu::Isa isa = cpu::active_isa();

  cpu::parallel_for(rows, 8, [&](int64_t r0, int64_t r1) {
    const int64_t nr = r1 - r0;
    RowMat err(nr, block);
    for (int64_t i1 = 0; i1 < cols; i1 += block) {
      const int64_t i2 = std::min(i1 + block, cols), nb = i2 - i1;
      for (int64_t i = i1; i < i2; ++i) {
        const double d = L(i, i);
        const double* urow = L.col(i).data();
        const int64_t orig = perm[i], k = orig / g;
        for (int64_t r = r0; r < r1; ++r) {
          double* row = &W(r, 0);
          GroupParam& p = params[r * groups + k];
          if (!static_groups && i % g == 0) p = find_params(row + i, group_len(i), grid, opt.symmetric);
          const double wv = row[i];
          const double scale = p.scale;
          double c = std::nearbyint(wv / scale) + p.zp;
          c = std::min<double>(std::max<double>(c, grid.qmin), grid.qmax);
          const double q = (c - p.zp) * scale;
          cp[r * codes.stride(0) + orig * codes.stride(1)] = static_cast<int32_t>(c);
          const double e = (wv - q) / d;
          row_loss[r] += e * e / 2.0;
          axpy(isa, row + i + 1, urow + i + 1, e, i2 - i - 1);
          err(r - r0, i - i1) = e;
        }
      }
      if (i2 >= cols) continue;
      // L is column-major: its columns i1.. from row i2 are the rows of U's block.
      const double* u = L.data() + i1 * cols + i2;
      if (isa >= cpu::Isa::kAVX512)
        cpu::gptq_update_avx512(&W(r0, i2), cols, err.data(), block, u, cols, nr, cols - i2, nb);
      else if (isa >= cpu::Isa::kAVX2)
        cpu::gptq_update_avx2(&W(r0, i2), cols, err.data(), block, u, cols, nr, cols - i2, nb);
      else
        W.block(r0, i2, nr, cols - i2).noalias() -=
            err.leftCols(nb) * L.block(i2, i1, cols - i2, nb).transpose();
    }
  });

  float* sp = scales.ptr<float>();
  uint8_t* zp = zps.ptr<uint8_t>();
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < groups; ++k) {
      sp[r * scales.stride(0) + k * scales.stride(1)] = params[r * groups + k].scale;
      zp[r * zps.stride(0) + k * zps.stride(1)] = static_cast<uint8_t>(params[r * groups + k].zp);
    }
  double loss = 0.0;
  for (double l : row_loss) loss += l;
  return {damp_used, loss};
}

}  // namespace tensorslim
