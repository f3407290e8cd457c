#include "tensorslim/tensor_view.h"

#include <sstream>

namespace tensorslim {

const char* dtype_name(DType dt) {
  switch (dt) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
    case DType::kInt8: return "int8";
    case DType::kUInt8: return "uint8";
    case DType::kInt32: return "int32";
    case DType::kUInt16: return "uint16";
    case DType::kInt64: return "int64";
    case DType::kFloat64: return "float64";
  }
  return "unknown";
}

int dtype_size(DType dt) {
  switch (dt) {
    case DType::kFloat32: case DType::kInt32: return 4;
    case DType::kFloat16: case DType::kBFloat16: case DType::kUInt16: return 2;
    case DType::kInt64: return 8;
    case DType::kInt8: case DType::kUInt8: return 1;
    case DType::kFloat64: return 8;
  }
  return 0;
}

std::string shape_str(const TensorView& t) {
  std::ostringstream os;
  os << "[";
  for (int i = 0; i < t.ndim; ++i) os << (i ? ", " : "") << t.shape[i];
  os << "]";
  return os.str();
}

void check_dtype(const TensorView& t, DType dt, const char* what) {
  TS_CHECK_TYPE(t.dtype == dt, std::string(what) + ": expected dtype " + dtype_name(dt) +
                                   ", got " + dtype_name(t.dtype));
}

void check_ndim(const TensorView& t, int ndim, const char* what) {
  TS_CHECK_VALUE(t.ndim == ndim, std::string(what) + ": expected a " + std::to_string(ndim) +
                                     "-D tensor, got shape " + shape_str(t));
}

void check_shape2(const TensorView& t, int64_t rows, int64_t cols, const char* what) {
  check_ndim(t, 2, what);
  TS_CHECK_VALUE(t.shape[0] == rows && t.shape[1] == cols,
                 std::string(what) + ": expected shape [" + std::to_string(rows) + ", " +
                     std::to_string(cols) + "], got " + shape_str(t));
}

void check_contiguous(const TensorView& t, const char* what) {
  TS_CHECK_VALUE(t.is_contiguous(), std::string(what) + ": expected a contiguous tensor");
}

TensorView contiguous_view2(void* data, DType dt, int64_t rows, int64_t cols) {
  TensorView v;
  v.data = data;
  v.dtype = dt;
  v.ndim = 2;
  v.shape[0] = rows;
  v.shape[1] = cols;
  v.strides[0] = cols;
  v.strides[1] = 1;
  return v;
}

TensorView weight_stand_in(const TensorView& like, int64_t N, int64_t K) {
  TensorView w = like;
  w.dtype = DType::kFloat32;
  w.ndim = 2;
  w.shape[0] = N;
  w.shape[1] = K;
  w.strides[0] = K;
  w.strides[1] = 1;
  return w;
}

void check_linear_out(const TensorView& out, DType out_dtype, int64_t M, int64_t N, const TensorView* bias) {
  check_dtype(out, out_dtype, "out");
  check_shape2(out, M, N, "out");
  TS_CHECK_VALUE(out.strides[1] == 1 || N <= 1, "out: rows must be contiguous");
  if (bias) {
    check_dtype(*bias, DType::kFloat32, "bias");
    TS_CHECK_VALUE(bias->ndim == 1 && bias->shape[0] == N,
                   "bias: expected shape [" + std::to_string(N) + "], got " + shape_str(*bias));
    check_contiguous(*bias, "bias");
  }
}

void check_same_device(const TensorView& a, const TensorView& b, const char* what) {
  TS_CHECK_VALUE(a.device == b.device && a.device_index == b.device_index,
                 std::string(what) + ": tensors are on different devices");
}

}  // namespace tensorslim
