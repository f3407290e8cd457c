// Copies between float32 views and Eigen matrices, shared by the low-rank cores.
#pragma once

#include <Eigen/Dense>
#include <string>
#include <vector>

#include "tensorslim/tensor_view.h"

namespace tensorslim {
namespace lowrank {

template <typename T>
using Mat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;

// A 2-D float32 CPU view read into a matrix; NaN/Inf is a ValueError naming `what`.
template <typename T>
Mat<T> read2(const TensorView& v, const char* what) {
  TS_CHECK_TYPE(v.device == DeviceType::kCPU, std::string(what) + ": CPU tensor expected");
  check_dtype(v, DType::kFloat32, what);
  check_ndim(v, 2, what);
  Mat<T> m(v.size(0), v.size(1));
  const float* p = v.ptr<float>();
  for (int64_t r = 0; r < m.rows(); ++r)
    for (int64_t c = 0; c < m.cols(); ++c) m(r, c) = p[r * v.stride(0) + c * v.stride(1)];
  TS_CHECK_VALUE(m.allFinite(), std::string(what) + " contains NaN or Inf");
  return m;
}

// A matrix written into a float32 CPU view of exactly its shape. Evaluated once first: reading
// a lazy product coefficient by coefficient would recompute the whole product each time.
template <typename Derived>
void write2(const Eigen::MatrixBase<Derived>& expr, const TensorView& v, const char* what) {
  const typename Derived::PlainObject m = expr;
  TS_CHECK_TYPE(v.device == DeviceType::kCPU, std::string(what) + ": CPU tensor expected");
  check_dtype(v, DType::kFloat32, what);
  check_shape2(v, m.rows(), m.cols(), what);
  float* p = v.ptr<float>();
  for (int64_t r = 0; r < m.rows(); ++r)
    for (int64_t c = 0; c < m.cols(); ++c)
      p[r * v.stride(0) + c * v.stride(1)] = static_cast<float>(m(r, c));
}

template <typename Derived>
void write1(const Eigen::MatrixBase<Derived>& expr, const TensorView& v, const char* what) {
  const typename Derived::PlainObject x = expr;
  TS_CHECK_TYPE(v.device == DeviceType::kCPU, std::string(what) + ": CPU tensor expected");
  check_dtype(v, DType::kFloat32, what);
  check_ndim(v, 1, what);
  TS_CHECK_VALUE(v.size(0) == x.size(), std::string(what) + ": expected " +
                                            std::to_string(x.size()) + " values, got " + shape_str(v));
  float* p = v.ptr<float>();
  for (int64_t i = 0; i < x.size(); ++i) p[i * v.stride(0)] = static_cast<float>(x(i));
}

// A conv kernel w [O, I, kh, kw] (float32, CPU) as kh*kw matrices [O, I], one per tap.
inline std::vector<Mat<double>> read_kernel(const TensorView& w) {
  TS_CHECK_TYPE(w.device == DeviceType::kCPU, "w: CPU tensor expected");
  check_dtype(w, DType::kFloat32, "w");
  check_ndim(w, 4, "w");
  const int64_t O = w.size(0), I = w.size(1), kh = w.size(2), kw = w.size(3);
  TS_CHECK_VALUE(O > 0 && I > 0 && kh > 0 && kw > 0, "w: empty conv kernel " + shape_str(w));
  std::vector<Mat<double>> taps(kh * kw, Mat<double>(O, I));
  const float* p = w.ptr<float>();
  for (int64_t o = 0; o < O; ++o)
    for (int64_t i = 0; i < I; ++i)
      for (int64_t y = 0; y < kh; ++y)
        for (int64_t x = 0; x < kw; ++x)
          taps[y * kw + x](o, i) =
              p[o * w.stride(0) + i * w.stride(1) + y * w.stride(2) + x * w.stride(3)];
  for (const auto& t : taps) TS_CHECK_VALUE(t.allFinite(), "w contains NaN or Inf");
  return taps;
}

}  // namespace lowrank
}  // namespace tensorslim
