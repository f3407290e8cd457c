// Reads a libFuzzer input as a sequence of small choices, and builds tensor views whose
// buffers cover exactly what their shape and strides address: any read or write outside
// is then a real bug that AddressSanitizer reports.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "tensorslim/tensor_view.h"

namespace tensorslim {
namespace fuzz {

class Input {
 public:
  Input(const uint8_t* data, size_t size) : p_(data), end_(data + size) {}

  uint8_t byte() { return p_ < end_ ? *p_++ : 0; }
  // A value in [lo, hi].
  int64_t range(int64_t lo, int64_t hi) {
    uint32_t v = 0;
    for (int i = 0; i < 4; ++i) v = (v << 8) | byte();
    return lo + static_cast<int64_t>(v % static_cast<uint64_t>(hi - lo + 1));
  }
  float any_float() {
    uint32_t bits = 0;
    for (int i = 0; i < 4; ++i) bits = (bits << 8) | byte();
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  }
  bool done() const { return p_ >= end_; }

 private:
  const uint8_t* p_;
  const uint8_t* end_;
};

// A 1-D or 2-D CPU view with its own buffer, filled from the input.
struct Owned {
  std::unique_ptr<uint8_t[]> buf;
  TensorView view;
};

// Elements a view with these shape / strides reaches (0 when it is empty).
inline int64_t extent(const TensorView& v) {
  int64_t last = 0;
  for (int d = 0; d < v.ndim; ++d) {
    if (v.shape[d] == 0) return 0;
    last += (v.shape[d] - 1) * v.strides[d];
  }
  return last + 1;
}

inline Owned make_view(Input& in, DType dt, int ndim, const int64_t* shape, bool odd_strides) {
  Owned o;
  o.view.dtype = dt;
  o.view.ndim = ndim;
  int64_t stride = 1;
  for (int d = ndim - 1; d >= 0; --d) {
    o.view.shape[d] = shape[d];
    o.view.strides[d] = stride + (odd_strides ? in.range(0, 3) : 0);
    stride = o.view.strides[d] * (shape[d] > 0 ? shape[d] : 1);
  }
  const size_t bytes = static_cast<size_t>(extent(o.view)) * static_cast<size_t>(dtype_size(dt));
  // A zero-length allocation still needs a distinct non-null pointer.
  o.buf.reset(new uint8_t[bytes ? bytes : 1]);
  for (size_t i = 0; i < bytes; ++i) o.buf[i] = in.byte();
  o.view.data = o.buf.get();
  return o;
}

}  // namespace fuzz
}  // namespace tensorslim
