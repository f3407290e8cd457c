// SparseGPT on the CPU with Eigen (specification: include/tensorslim/sparsegpt.h). Blocks of
// columns are visited in order; inside a block the rows are independent given H and run in
// parallel. The unstructured mask of a block is chosen over all rows at once, so each block
// starts after every row has finished the previous one.
#include "tensorslim/sparsegpt.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>
#include <vector>

#include "hessian.h"
#include "parallel.h"
#include "tensorslim/status.h"

namespace tensorslim {
namespace {

using cpu::RowMat;

void check_args(const TensorView& w, const TensorView& h, const SparseGptOptions& opt,
                const TensorView& out, const TensorView& keep, const TensorView& scales) {
  for (const TensorView* t : {&w, &h, &out, &keep})
    TS_CHECK_TYPE(t->device == DeviceType::kCPU, "sparsegpt_prune: CPU tensors expected");
  check_dtype(w, DType::kFloat32, "w");
  check_ndim(w, 2, "w");
  const int64_t rows = w.size(0), cols = w.size(1);
  TS_CHECK_VALUE(rows > 0 && cols > 0, "sparsegpt_prune: w is empty " + shape_str(w));
  check_dtype(h, DType::kFloat32, "h");
  check_shape2(h, cols, cols, "h");
  if (opt.n != 0 || opt.m != 0) {
    TS_CHECK_VALUE(opt.m >= 2 && opt.n >= 1 && opt.n < opt.m,
                   "sparsegpt_prune: n:m needs 1 <= n < m, got " + std::to_string(opt.n) + ":" +
                       std::to_string(opt.m));
  } else {
    TS_CHECK_VALUE(opt.sparsity >= 0.0 && opt.sparsity < 1.0,
                   "sparsegpt_prune: sparsity must be in [0, 1), got " + std::to_string(opt.sparsity));
  }
  TS_CHECK_VALUE(opt.bits == 0 || (opt.bits >= 2 && opt.bits <= 8),
                 "sparsegpt_prune: bits must be 0 (float) or 2..8, got " + std::to_string(opt.bits));
  TS_CHECK_VALUE(opt.block_size > 0, "sparsegpt_prune: block_size must be positive");
  TS_CHECK_VALUE(opt.damp >= 0.0 && std::isfinite(opt.damp), "sparsegpt_prune: damp must be >= 0");
  check_dtype(out, DType::kFloat32, "out");
  check_shape2(out, rows, cols, "out");
  check_dtype(keep, DType::kUInt8, "keep");
  check_shape2(keep, rows, cols, "keep");
  TS_CHECK_VALUE(!opt.given_scales || opt.bits > 0, "sparsegpt_prune: given scales need bits > 0");
  if (opt.bits > 0) {
    check_dtype(scales, DType::kFloat32, "scales");
    TS_CHECK_VALUE(scales.ndim == 1 && scales.shape[0] == rows,
                   "sparsegpt_prune: scales: expected shape [" + std::to_string(rows) + "], got " +
                       shape_str(scales));
  }
}

// Unstructured mask of columns [i1, i2): prune the k smallest w^2 / U_cc^2 over all rows,
// ties to the lower row-major index. keep is rows x (i2 - i1).
void block_mask(const RowMat& W, const Eigen::MatrixXd& L, int64_t i1, int64_t i2, double sparsity,
                std::vector<uint8_t>* keep) {
  const int64_t rows = W.rows(), nb = i2 - i1, total = rows * nb;
  const int64_t k = static_cast<int64_t>(std::nearbyint(sparsity * static_cast<double>(total)));
  keep->assign(total, 1);
  if (k == 0) return;
  std::vector<double> score(total);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < nb; ++c) {
      const double d = L(i1 + c, i1 + c), v = W(r, i1 + c);
      score[r * nb + c] = v * v / (d * d);
    }
  std::vector<int64_t> order(total);
  std::iota(order.begin(), order.end(), 0);
  auto less = [&](int64_t a, int64_t b) { return score[a] < score[b] || (score[a] == score[b] && a < b); };
  if (k < total) std::nth_element(order.begin(), order.begin() + (k - 1), order.end(), less);
  for (int64_t i = 0; i < k; ++i) (*keep)[order[i]] = 0;
}

// n:m mask of one row's group starting at column c0 (r real columns): keep the min(n, r)
// largest w^2 / U_cc^2, ties to the lower column.
void group_mask(const double* row, const Eigen::MatrixXd& L, int64_t c0, int64_t r, int n, uint8_t* keep) {
  int64_t idx[64];
  double score[64];
  for (int64_t j = 0; j < r; ++j) {
    const double d = L(c0 + j, c0 + j);
    score[j] = row[c0 + j] * row[c0 + j] / (d * d);
    idx[j] = j;
    keep[j] = 0;
  }
  std::stable_sort(idx, idx + r, [&](int64_t a, int64_t b) { return score[a] > score[b]; });
  for (int64_t j = 0; j < std::min<int64_t>(n, r); ++j) keep[idx[j]] = 1;
}

}  // namespace

SparseGptResult sparsegpt_prune(const TensorView& w, const TensorView& h, const SparseGptOptions& opt,
                                const TensorView& out, const TensorView& keep, const TensorView& scales) {
  check_args(w, h, opt, out, keep, scales);
  TS_CHECK_VALUE(opt.m <= 64, "sparsegpt_prune: m must be at most 64, got " + std::to_string(opt.m));
  const int64_t rows = w.size(0), cols = w.size(1);
  const bool nm = opt.m > 0;
  RowMat W = cpu::load_weight(w, "sparsegpt_prune");
  Eigen::MatrixXd H = cpu::load_hessian(h, "sparsegpt_prune");
  cpu::drop_dead_inputs(&H, &W);

  const double qmax = opt.bits > 0 ? static_cast<double>((1 << (opt.bits - 1)) - 1) : 0.0;
  std::vector<float> scale(rows, 1.0f);
  if (opt.bits > 0)
    for (int64_t r = 0; r < rows; ++r) {
      const float s = opt.given_scales ? scales.ptr<float>()[r * scales.stride(0)]
                                       : static_cast<float>(W.row(r).cwiseAbs().maxCoeff() / qmax);
      TS_CHECK_VALUE(std::isfinite(s) && s >= 0.0f, "sparsegpt_prune: scales[" + std::to_string(r) +
                                                        "] must be finite and >= 0, got " + std::to_string(s));
      scale[r] = s > 0.0f ? s : 1.0f;
    }

  Eigen::MatrixXd L;  // U = L^T (see gptq.cpp)
  const double damp_used = cpu::inverse_cholesky(H, opt.damp, &L, "sparsegpt_prune");
  H.resize(0, 0);

  const int64_t block = nm ? (opt.block_size + opt.m - 1) / opt.m * opt.m : opt.block_size;
  std::vector<double> row_loss(rows, 0.0);
  std::vector<uint8_t> bmask;
  uint8_t* kp = keep.ptr<uint8_t>();
  float* op = out.ptr<float>();

  for (int64_t i1 = 0; i1 < cols; i1 += block) {
    const int64_t i2 = std::min(i1 + block, cols), nb = i2 - i1;
    if (!nm) block_mask(W, L, i1, i2, opt.sparsity, &bmask);
    cpu::parallel_for(rows, 8, [&](int64_t r0, int64_t r1) {
      RowMat err(r1 - r0, nb);
      std::vector<uint8_t> gkeep(nm ? opt.m : 0);
      for (int64_t r = r0; r < r1; ++r) {
        double* row = &W(r, 0);
        uint8_t* krow = kp + r * keep.stride(0);
        for (int64_t i = i1; i < i2; ++i) {
          uint8_t kept;
          if (nm) {
            const int64_t j = (i - i1) % opt.m;
            if (j == 0) group_mask(row, L, i, std::min<int64_t>(opt.m, cols - i), opt.n, gkeep.data());
            kept = gkeep[j];
          } else {
            kept = bmask[r * nb + (i - i1)];
          }
          const double wv = row[i];
          double q = kept ? wv : 0.0;
          if (kept && opt.bits > 0) {
            const double c = std::min(std::max(std::nearbyint(wv / scale[r]), -qmax), qmax);
            q = c * static_cast<double>(scale[r]);
          }
          krow[i * keep.stride(1)] = kept;
          op[r * out.stride(0) + i * out.stride(1)] = static_cast<float>(q);
          const double* urow = L.col(i).data();
          const double e = (wv - q) / L(i, i);
          row_loss[r] += e * e / 2.0;
          for (int64_t j = i + 1; j < i2; ++j) row[j] -= e * urow[j];
          err(r - r0, i - i1) = e;
        }
      }
      if (i2 < cols)
        W.block(r0, i2, r1 - r0, cols - i2).noalias() -= err * L.block(i2, i1, cols - i2, nb).transpose();
    });
  }

  if (opt.bits > 0 && !opt.given_scales) {
    float* sp = scales.ptr<float>();
    for (int64_t r = 0; r < rows; ++r) sp[r * scales.stride(0)] = scale[r];
  }
  double loss = 0.0;
  for (double l : row_loss) loss += l;
  return {damp_used, loss};
}

}  // namespace tensorslim
