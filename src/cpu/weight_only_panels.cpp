// Integer weight-only products at compute-bound batches: each weight row is decoded once per
// call (INT4 by the ISA's group decoder, else codes through the ISA's decode kernel per group)
// and panel_gemm multiplies it
// with every activation row.
#include <algorithm>
#include <vector>

#include "int4_codes.h"
#include "panel_gemm.h"
#include "quant_kernels.h"
#include "weight_only_native.h"

namespace tensorslim {
namespace cpu {
bool linear_weight_only_panels(const TensorView& x, const TensorView& qweight,
                               const TensorView& scales, const TensorView* zero_points,
                               const TensorView* bias, Format fmt, int64_t group_size,
                               const TensorView& out) {
  if (active_isa() == Isa::kScalar) return false;
  const FormatInfo& info = format_info(fmt);
  const int64_t M = x.shape[0], K = x.shape[1], N = qweight.shape[0];
  const int64_t gsize = group_size == K ? K : group_size;
  const bool is_signed = !info.has_zero_point;
  const QuantKernels& kernels = active_quant_kernels();
  const float* xf = nullptr;
  int64_t ldx = K;
  thread_local AlignedFloats xp;
  if (x.dtype == DType::kFloat32) {
    xf = x.ptr<float>();
    ldx = x.strides[0];
  } else {
    pack_activations(x, false, xp);
    xf = xp.data();
  }
  PanelGemmProblem p;
  p.x = xf;
  p.ldx = ldx;
  p.M = M;
  p.N = N;
  p.K = K;
  p.bias = bias ? bias->ptr<float>() : nullptr;
  p.out = out.data;
  p.ldo = out.strides[0];
  p.out_bf16 = out.dtype == DType::kBFloat16;
  const Int4GroupDecoder decode_int4 = info.bits == 4 ? int4_group_decoder() : nullptr;
  p.decode = [&](int64_t n0, int64_t rows, float* dst) {
    thread_local std::vector<uint8_t> codes;
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t n = n0 + r;
      const uint8_t* qrow = qweight.ptr<uint8_t>() + n * qweight.strides[0];
      const uint8_t* c = decode_int4 ? nullptr : row_codes(qrow, K, info.bits, is_signed, codes);
      const float* sc = scales.ptr<float>() + n * scales.strides[0];
      const uint8_t* zp = zero_points ? zero_points->ptr<uint8_t>() + n * zero_points->strides[0]
                                      : nullptr;
      for (int64_t g = 0, k0 = 0; k0 < K; ++g, k0 += gsize) {
        const int64_t len = std::min(gsize, K - k0);  // the last group may be short
        const int32_t z = zp ? zp[g] : 0;
        if (decode_int4)  // INT4 groups start on a byte: gsize is even when a row has several
          decode_int4(qrow + k0 / 2, len, sc[g], z, is_signed, dst + r * K + k0);
        else if (is_signed)
          kernels.decode_s8(reinterpret_cast<const int8_t*>(c) + k0, len, sc[g], z, dst + r * K + k0);
        else
          kernels.decode_u8(c + k0, len, sc[g], z, dst + r * K + k0);
      }
    }
  };
  return panel_gemm(p);
}

}  // namespace cpu
}  // namespace tensorslim
