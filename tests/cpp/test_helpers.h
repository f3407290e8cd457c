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

// The AVX2 kernels with or without vpdpbusd for the scope's life; construct it while the active
// ISA is AVX2 (avx2_vnni() says kNone under any other), e.g. after an IsaScope(kAVX2).
struct Avx2VnniScope {
  explicit Avx2VnniScope(bool on) : saved(cpu::avx2_vnni() != cpu::AvxVnni::kNone) { cpu::set_avx2_vnni(on); }
  ~Avx2VnniScope() { cpu::set_avx2_vnni(saved); }
  bool saved;
};

// The AVX2 kernels' vpdpbusd settings to test here: off, and on where the CPU has a form.
inline std::vector<bool> avx2_vnni_settings() {
  return cpu::avx2_vnni_available() ? std::vector<bool>{false, true} : std::vector<bool>{false};
}

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

// A contiguous float32 [a, b, c, d] view.
inline TensorView view4(void* data, int64_t a, int64_t b, int64_t c, int64_t d) {
  TensorView v;
  v.data = data;
  v.dtype = DType::kFloat32;
  v.ndim = 4;
  const int64_t shape[4] = {a, b, c, d};
  int64_t stride = 1;
  for (int i = 3; i >= 0; --i) {
    v.shape[i] = shape[i];
    v.strides[i] = stride;
    stride *= shape[i];
  }
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

// A random [N, K] weight quantized to fmt in groups of `group`, and its exact dequantization.
// The views point into the vectors (moving the struct keeps them valid).
struct QuantizedWeight {
  std::vector<uint8_t> q, zps;
  std::vector<float> scales, deq;
  TensorView qv, sv, zv;
  bool asym = false;
  const TensorView* zero_points() const { return asym ? &zv : nullptr; }
};

inline QuantizedWeight quantized_weight(Format fmt, int64_t N, int64_t K, int64_t group, uint32_t seed) {
  const FormatInfo& f = format_info(fmt);
  QuantizedWeight w;
  w.asym = f.has_zero_point;
  std::vector<float> x = random_weights(N * K, seed);
  const int64_t groups = num_groups(K, group), row_bytes = packed_row_bytes(f, K);
  w.q.resize(N * row_bytes);
  w.scales.resize(N * groups);
  w.zps.resize(N * groups);
  w.deq.resize(N * K);
  const DType qdt = (f.bits == 8 && !f.has_zero_point) ? DType::kInt8 : DType::kUInt8;
  w.qv = view2(w.q.data(), qdt, N, row_bytes);
  w.sv = view2(w.scales.data(), DType::kFloat32, N, groups);
  w.zv = view2(w.zps.data(), DType::kUInt8, N, groups);
  quantize(view2(x.data(), DType::kFloat32, N, K), fmt, group, w.qv, w.sv, w.zero_points());
  dequantize(w.qv, w.sv, w.zero_points(), fmt, group, view2(w.deq.data(), DType::kFloat32, N, K));
  return w;
}

}  // namespace testing
}  // namespace tensorslim
