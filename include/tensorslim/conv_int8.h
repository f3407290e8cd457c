// INT8 convolution (Conv1d / Conv2d, groups, stride, padding, dilation) on oneDNN.
//
// Specification (ops/conv_int8.py's reference implements it in plain PyTorch):
//   acc[n, o, p] = sum over the window of (qx - zero_point) * qweight     (exact, int32;
//                  padded positions contribute 0, as a real input of 0 would)
//   out[n, o, p] = float(acc) * (act_scale * w_scale[o]) + bias[o]
//   then, where the geometry asks for it (the epilogue a model applies to the conv's output,
//   done while the output is in registers): out += residual[n, o, p]; out = act(out) with act
//   ReLU max(x, 0), ReLU6 min(max(x, 0), 6), SiLU x * sigmoid(x) or GELU x * Phi(x) (erf).
// Layouts: qx [N, *spatial, C] u8 (channels last), qweight [OC, C / groups, *kernel] s8 (as
// torch stores it), out and residual [N, *out_spatial, OC] f32 (channels last). Padding is
// symmetric.
//
// oneDNN's u8 x s8 kernels are exact only with VNNI or AMX; without it they add pairs of
// products in saturating int16. conv_int8_impl names the kernel so the caller can choose:
// with VNNI/AMX full 8-bit codes, otherwise codes in [0, 127] (2 * 127 * 127 < 32767).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "tensorslim/tensor_view.h"

namespace tensorslim {

enum class ConvActivation : int { kNone = 0, kReLU, kReLU6, kSiLU, kGELU };

struct ConvInt8Geometry {
  std::vector<int64_t> stride, padding, dilation;  // one per spatial dim; dilation 1 = dense
  int64_t groups = 1;
  bool has_zero_point = false;  // zero_point != 0 (a kernel without zero-point handling otherwise)
  bool has_bias = false;
  bool has_residual = false;  // epilogue: add residual (same shape as out)
  ConvActivation activation = ConvActivation::kNone;  // epilogue: then this
};

// oneDNN's implementation name for this convolution ("" when there is none or oneDNN is unusable).
std::string conv_int8_impl(const TensorView& qx, const TensorView& qweight, const TensorView& out,
                           const ConvInt8Geometry& g);

// Bytes of qweight in the layout that implementation reads (0 when there is none). The packed
// layout is that of the convolution without its epilogue; a run with an epilogue whose kernel
// reads another layout returns false.
int64_t conv_int8_packed_bytes(const TensorView& qx, const TensorView& qweight, const TensorView& out,
                               const ConvInt8Geometry& g);

// qweight reordered into `packed` (u8 bytes, conv_int8_packed_bytes long).
void conv_int8_pack(const TensorView& qx, const TensorView& qweight, const TensorView& out,
                    const ConvInt8Geometry& g, const TensorView& packed);

// Runs the convolution with packed weights; false, with nothing written to out, when oneDNN has
// no implementation here. residual: given exactly when g.has_residual.
bool conv_int8_run(const TensorView& qx, const TensorView& qweight, const TensorView& packed,
                   const TensorView& w_scales, const TensorView* bias, float act_scale,
                   int32_t zero_point, const TensorView& out, const ConvInt8Geometry& g,
                   const TensorView* residual = nullptr);

// conv_int8_run on the codes min(quantize_static(x, act_scale, zero_point), code_max) of fp32
// channels-last x [N, *spatial, C], made in a scratch buffer (code_max 127 for the kernels that
// need 7-bit codes, else 255). False, with nothing written to out, where oneDNN cannot run it.
bool conv_int8_quantizing_run(const TensorView& x, float act_scale, int32_t zero_point, int32_t code_max,
                              const TensorView& qweight, const TensorView& packed, const TensorView& w_scales,
                              const TensorView* bias, const TensorView& out, const ConvInt8Geometry& g,
                              const TensorView* residual = nullptr);

}  // namespace tensorslim
