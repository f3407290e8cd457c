// Small helpers to build TensorViews over std::vector storage in the C++ tests.
#pragma once

#include <cstdint>
#include <random>
#include <vector>

#include "tensorslim/quantize.h"
#include "tensorslim/tensor_view.h"

namespace tensorslim {
namespace testing {

// The scalar reference and every vector ISA this machine runs, for tests that compare them.
inline std::vector<cpu::Isa> machine_isas() {
  std::vector<cpu::Isa> out = {cpu::Isa::kScalar};
  if (cpu::best_isa() >= cpu::Isa::kAVX2) out.push_back(cpu::Isa::kAVX2);
  if (cpu::best_isa() >= cpu::Isa::kAVX512) out.push_back(cpu::Isa::kAVX512);
  return out;
}

// Runs a scope at one ISA and puts the previous one back.
struct IsaScope {
  explicit IsaScope(cpu::Isa isa) : saved(cpu::active_isa()) { cpu::set_isa(isa); }
  IsaScope() : saved(cpu::active_isa()) {}
  ~IsaScope() { cpu::set_isa(saved); }
  cpu::Isa saved;
};

inline TensorView view2(void* data, DType dt, int64_t rows, int64_t cols, int64_t row_stride = -1,
                        int64_t col_stride = 1) {
  TensorView v;
  v.data = data;
  v.dtype = dt;
  v.ndim = 2;
  v.shape[0] = rows;
  v.shape[1] = cols;
  v.strides[0] = row_stride < 0 ? cols : row_stride;
  v.strides[1] = col_stride;
  return v;
}

inline TensorView view1(void* data, DType dt, int64_t n) {
  TensorView v;
  v.data = data;
  v.dtype = dt;
  v.ndim = 1;
  v.shape[0] = n;
  v.strides[0] = 1;
  return v;
}

// Gaussian values with a few large outliers, as trained weights have.
inline std::vector<float> random_weights(int64_t n, uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> v(n);
  for (auto& x : v) x = normal(gen);
  for (int64_t i = 0; i < n; i += 97) v[i] *= 8.0f;
  return v;
}

}  // namespace testing
}  // namespace tensorslim
