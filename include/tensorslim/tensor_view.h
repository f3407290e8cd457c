// A non-owning view of a tensor: the only way data crosses into the core.
// The caller (torch, through the bindings) owns and allocates every buffer.
#pragma once

#include <cstdint>
#include <string>

#include "tensorslim/status.h"

namespace tensorslim {

enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kInt8 = 3, kUInt8 = 4, kInt32 = 5,
                              kUInt16 = 6, kInt64 = 7,  // sparse column indices, row pointers
                              kFloat64 = 8 };  // only the distillation losses' reference path
enum class DeviceType : int32_t { kCPU = 0, kCUDA = 1 };

const char* dtype_name(DType dt);
int dtype_size(DType dt);

constexpr int kMaxDims = 8;

struct TensorView {
  void* data = nullptr;
  DType dtype = DType::kFloat32;
  int ndim = 0;
  int64_t shape[kMaxDims] = {};
  int64_t strides[kMaxDims] = {};  // in elements, as torch gives them
  DeviceType device = DeviceType::kCPU;
  int device_index = 0;
  void* stream = nullptr;  // cudaStream_t for CUDA views, unused on CPU

  int64_t numel() const {
    int64_t n = 1;
    for (int i = 0; i < ndim; ++i) n *= shape[i];
    return n;
  }
  int64_t size(int d) const { return shape[d < 0 ? d + ndim : d]; }
  int64_t stride(int d) const { return strides[d < 0 ? d + ndim : d]; }
  bool is_contiguous() const {
    if (numel() == 0) return true;  // torch gives empty tensors arbitrary strides
    int64_t expect = 1;
    for (int i = ndim - 1; i >= 0; --i) {
      if (shape[i] != 1 && strides[i] != expect) return false;
      expect *= shape[i];
    }
    return true;
  }
  template <typename T>
  T* ptr() const { return static_cast<T*>(data); }
};

// Argument checks shared by every kernel entry point; `what` names the tensor.
void check_dtype(const TensorView& t, DType dt, const char* what);
void check_ndim(const TensorView& t, int ndim, const char* what);
void check_shape2(const TensorView& t, int64_t rows, int64_t cols, const char* what);
void check_contiguous(const TensorView& t, const char* what);
void check_same_device(const TensorView& a, const TensorView& b, const char* what);
// A contiguous [rows, cols] CPU view of dtype dt over data (a workspace the caller owns).
TensorView contiguous_view2(void* data, DType dt, int64_t rows, int64_t cols);
// A contiguous float32 [N, K] view on like's device (no data): the weight a linear kernel's
// packed codes stand for, so they can be checked with the quantize argument checks.
TensorView weight_stand_in(const TensorView& like, int64_t N, int64_t K);
// A linear kernel's output [M, N] (dtype out_dtype, rows contiguous) and optional fp32 bias [N].
void check_linear_out(const TensorView& out, DType out_dtype, int64_t M, int64_t N, const TensorView* bias);
std::string shape_str(const TensorView& t);

}  // namespace tensorslim
