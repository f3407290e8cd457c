// Static INT8 convolution from float activations in one call (see include/tensorslim/conv_int8.h):
// the codes go to a per-thread scratch buffer that lives across calls, so a layer's forward
// pays neither a fresh code tensor nor a second trip through Python per convolution.
#include <algorithm>
#include <vector>

#include "../onednn_usable.h"
#include "tensorslim/conv_int8.h"
#include "tensorslim/gemm.h"
#include "tensorslim/gemm_int8.h"

namespace tensorslim {

bool conv_int8_quantizing_run(const TensorView& x, float act_scale, int32_t zero_point, int32_t code_max,
                              const TensorView& qweight, const TensorView& packed, const TensorView& w_scales,
                              const TensorView* bias, const TensorView& out, const ConvInt8Geometry& g,
                              const TensorView* residual) {
  check_dtype(x, DType::kFloat32, "x");
  check_contiguous(x, "x");
  TS_CHECK_VALUE(x.ndim == 3 || x.ndim == 4, "conv_int8: x must be [N, W, C] or [N, H, W, C], got " +
                                                 shape_str(x));
  TS_CHECK_VALUE(code_max == 127 || code_max == 255, "conv_int8: code_max must be 127 or 255, got " +
                                                         std::to_string(code_max));
  if (!cpu::onednn_usable()) return false;  // before any work: the caller runs the two ops instead
  const int64_t n = x.numel(), C = x.shape[x.ndim - 1];
  thread_local std::vector<uint8_t> codes;
  if (static_cast<int64_t>(codes.size()) < n) codes.resize(static_cast<size_t>(n));
  TensorView x2 = x, q2;
  x2.ndim = 2;
  x2.shape[0] = C > 0 ? n / C : 0;
  x2.shape[1] = C;
  x2.strides[0] = C;
  x2.strides[1] = 1;
  q2 = x2;
  q2.dtype = DType::kUInt8;
  q2.data = codes.data();
  quantize_static(x2, nullptr, act_scale, zero_point, q2, GemmBackend::kAuto);
  if (code_max < 255)  // 7-bit codes for kernels that add products in int16 (see conv_int8.h)
    std::transform(codes.begin(), codes.begin() + n, codes.begin(),
                   [code_max](uint8_t c) { return std::min<uint8_t>(c, static_cast<uint8_t>(code_max)); });
  TensorView qx = x;
  qx.dtype = DType::kUInt8;
  qx.data = codes.data();
  return conv_int8_run(qx, qweight, packed, w_scales, bias, act_scale, zero_point, out, g, residual);
}

}  // namespace tensorslim
