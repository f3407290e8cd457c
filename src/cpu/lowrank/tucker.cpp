// Tucker-2 of a conv kernel over its output- and input-channel modes. The leading left
// singular vectors of an unfolding are the top eigenvectors of its Gram matrix, which for
// these small modes (channels, not pixels) is far cheaper than an SVD of the wide unfolding.
#include <Eigen/Eigenvalues>
#include <cmath>
#include <string>
#include <vector>

#include "dense.h"
#include "tensorslim/lowrank.h"

namespace tensorslim {
namespace {

using lowrank::Mat;
using Taps = std::vector<Mat<double>>;

// Eigen-decomposition of a symmetric Gram matrix, largest first.
struct Spectrum {
  Eigen::VectorXd values;  // eigenvalues, descending, clamped at 0
  Mat<double> vectors;     // matching columns
};

Spectrum leading(const Mat<double>& gram) {
  Eigen::SelfAdjointEigenSolver<Mat<double>> es(gram);
  TS_CHECK_VALUE(es.info() == Eigen::Success, "tucker2: eigen-decomposition did not converge");
  const int64_t n = gram.rows();
  Spectrum s{Eigen::VectorXd(n), Mat<double>(n, n)};
  for (int64_t j = 0; j < n; ++j) {  // Eigen sorts ascending
    s.values(j) = std::max(0.0, es.eigenvalues()(n - 1 - j));
    s.vectors.col(j) = es.eigenvectors().col(n - 1 - j);
  }
  return s;
}

// Gram matrices of the mode-0 and mode-1 unfoldings of (taps x1 v_in) and (taps x0 u_out^T).
Mat<double> gram_out(const Taps& taps, const Mat<double>* v_in) {
  Mat<double> g = Mat<double>::Zero(taps[0].rows(), taps[0].rows());
  for (const auto& t : taps) {
    const Mat<double> y = v_in ? Mat<double>(t * *v_in) : t;
    g.noalias() += y * y.transpose();
  }
  return g;
}

Mat<double> gram_in(const Taps& taps, const Mat<double>* u_out) {
  Mat<double> g = Mat<double>::Zero(taps[0].cols(), taps[0].cols());
  for (const auto& t : taps) {
    const Mat<double> z = u_out ? Mat<double>(u_out->transpose() * t) : t;
    g.noalias() += z.transpose() * z;
  }
  return g;
}

void check_rank(int64_t r, int64_t dim, const char* what) {
  TS_CHECK_VALUE(r >= 1 && r <= dim, std::string("tucker2: ") + what + " rank " + std::to_string(r) +
                                         " must be in 1.." + std::to_string(dim));
}

}  // namespace

void tucker2_spectra(const TensorView& w, const TensorView& s_out, const TensorView& s_in) {
  const Taps taps = lowrank::read_kernel(w);
  lowrank::write1(leading(gram_out(taps, nullptr)).values.cwiseSqrt(), s_out, "s_out");
  lowrank::write1(leading(gram_in(taps, nullptr)).values.cwiseSqrt(), s_in, "s_in");
}

double tucker2(const TensorView& w, int als_sweeps, const TensorView& u_out, const TensorView& u_in,
               const TensorView& core) {
  const Taps taps = lowrank::read_kernel(w);
  const int64_t O = w.size(0), I = w.size(1), kh = w.size(2), kw = w.size(3);
  check_ndim(u_out, 2, "u_out");
  check_ndim(u_in, 2, "u_in");
  const int64_t ro = u_out.size(1), ri = u_in.size(1);
  check_rank(ro, O, "output-channel");
  check_rank(ri, I, "input-channel");
  TS_CHECK_VALUE(als_sweeps >= 0, "tucker2: als_sweeps must be >= 0");

  // HOSVD start, then HOOI: each factor re-fitted to the kernel projected on the other.
  Mat<double> U = leading(gram_out(taps, nullptr)).vectors.leftCols(ro);
  Mat<double> V = leading(gram_in(taps, nullptr)).vectors.leftCols(ri);
  for (int sweep = 0; sweep < als_sweeps; ++sweep) {
    U = leading(gram_out(taps, &V)).vectors.leftCols(ro);
    V = leading(gram_in(taps, &U)).vectors.leftCols(ri);
  }

  TS_CHECK_TYPE(core.device == DeviceType::kCPU, "core: CPU tensor expected");
  check_dtype(core, DType::kFloat32, "core");
  check_ndim(core, 4, "core");
  TS_CHECK_VALUE(core.size(0) == ro && core.size(1) == ri && core.size(2) == kh && core.size(3) == kw,
                 "core: expected shape [" + std::to_string(ro) + ", " + std::to_string(ri) + ", " +
                     std::to_string(kh) + ", " + std::to_string(kw) + "], got " + shape_str(core));
  double err2 = 0.0, norm2 = 0.0;
  float* cp = core.ptr<float>();
  for (int64_t y = 0; y < kh; ++y) {
    for (int64_t x = 0; x < kw; ++x) {
      const Mat<double>& t = taps[y * kw + x];
      const Mat<double> c = U.transpose() * t * V;
      err2 += (t - U * c * V.transpose()).squaredNorm();
      norm2 += t.squaredNorm();
      for (int64_t o = 0; o < ro; ++o)
        for (int64_t i = 0; i < ri; ++i)
          cp[o * core.stride(0) + i * core.stride(1) + y * core.stride(2) + x * core.stride(3)] =
              static_cast<float>(c(o, i));
    }
  }
  lowrank::write2(U, u_out, "u_out");
  lowrank::write2(V, u_in, "u_in");
  return norm2 > 0.0 ? std::sqrt(err2 / norm2) : 0.0;
}

}  // namespace tensorslim
