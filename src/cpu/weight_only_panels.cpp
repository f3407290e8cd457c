// Integer weight-only products at compute-bound batches: each weight value is decoded once per
// call (INT4 by the ISA's group decoder, 8-bit codes by the ISA's decode kernel), one K block of
// a panel's rows at a time, and panel_gemm multiplies it with every activation row.
#include <algorithm>

#include "int4_codes.h"
#include "panel_gemm.h"
#include "quant_kernels.h"
#include "weight_only_native.h"

namespace tensorslim {
namespace cpu {

// Rows from which bf16 activations take the bf16 micro-tiles. Zen 4, fp32 / bf16 tiles (ms):
// 1536 x 384 INT4 at 9 / 16 / 64 / 128 rows 0.105 / 0.099, 0.174 / 0.122, 0.577 / 0.267,
// 1.086 / 0.459; 384 x 1536 INT8 at 9 / 16 / 64 rows 0.104 / 0.119, 0.155 / 0.139, 0.506 /
// 0.282; 4096 x 4096 INT4 at 64 / 256 rows 10.79 / 6.88, 39.48 / 22.77 (torch's bf16 GEMM on
// the dense weight: 6.13, 20.42).
constexpr int64_t kBf16PanelMinRows = 16;

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
  // bf16 activations with AVX512-BF16 from kBf16PanelMinRows: the bf16 micro-tiles, on the
  // weights rounded to bf16 (a bf16 model's own precision), at twice fp32's multiply-adds.
  const bool bf16 = x.dtype == DType::kBFloat16 && M >= kBf16PanelMinRows && panel_gemm_takes_bf16();
  if (x.dtype == DType::kFloat32 || bf16) {
    xf = x.dtype == DType::kFloat32 ? x.ptr<float>() : nullptr;
    ldx = x.strides[0];
  } else {
    pack_activations(x, false, xp);
    xf = xp.data();
  }
  PanelGemmProblem p;
  p.x = xf;
  p.x_bf16 = bf16 ? x.ptr<uint16_t>() : nullptr;
  p.ldx = ldx;
  p.M = M;
  p.N = N;
  p.K = K;
  p.bias = bias ? bias->ptr<float>() : nullptr;
  p.out = out.data;
  p.ldo = out.strides[0];
  p.out_bf16 = out.dtype == DType::kBFloat16;
  // INT4 groups go through the ISA's group decoder (non-null wherever panel_gemm runs), 8-bit
  // codes through the decode kernels. A K block [k0, k0 + kc) may start or end inside a group:
  // its part of the group is decoded with the group's scale (k0 is even, as INT4 needs).
  const Int4GroupDecoder decode_int4 = int4_group_decoder();
  if (info.bits == 4 && !decode_int4) return false;
  p.decode_ranges = true;
  // The row's bytes of the next K block: a block reads a few lines from each of the panel's
  // rows, short streams the hardware prefetcher leaves to wait on memory (without this the
  // decode took ~35% of 4096 x 4096 INT4 at 32 rows on AVX2, against ~8% with whole rows).
  const auto prefetch_next_block = [&](const uint8_t* qrow, int64_t k0, int64_t kc) {
    for (int64_t b = (k0 + kc) * info.bits / 8, b1 = std::min(K, k0 + 2 * kc) * info.bits / 8; b < b1; b += 64)
      __builtin_prefetch(qrow + b);
  };
  p.decode = [&](int64_t n0, int64_t rows, int64_t k0, int64_t kc, float* dst) {
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t n = n0 + r;
      const uint8_t* qrow = qweight.ptr<uint8_t>() + n * qweight.strides[0];
      const float* sc = scales.ptr<float>() + n * scales.strides[0];
      const uint8_t* zp = zero_points ? zero_points->ptr<uint8_t>() + n * zero_points->strides[0]
                                      : nullptr;
      prefetch_next_block(qrow, k0, kc);
      for (int64_t k = k0, k1 = k0 + kc; k < k1;) {
        const int64_t g = k / gsize, len = std::min((g + 1) * gsize, k1) - k;
        const int32_t z = zp ? zp[g] : 0;
        float* out = dst + r * kc + (k - k0);
        if (info.bits == 4)
          decode_int4(qrow + k / 2, len, sc[g], z, is_signed, out);
        else if (is_signed)
          kernels.decode_s8(reinterpret_cast<const int8_t*>(qrow) + k, len, sc[g], z, out);
        else
          kernels.decode_u8(qrow + k, len, sc[g], z, out);
        k += len;
      }
    }
  };
  // INT4 with groups of whole 8-value steps: decoded straight into the micro-panels
  // (decode_int4_panel_*), the next block's bytes prefetched as above.
  const Int4PanelRows rows4{qweight.ptr<uint8_t>(), qweight.strides[0], scales.ptr<float>(), scales.strides[0],
                            zero_points ? zero_points->ptr<uint8_t>() : nullptr,
                            zero_points ? zero_points->strides[0] : 0, gsize, K};
  const auto panel4 = active_isa() == Isa::kAVX512 ? decode_int4_panel_avx512
                      : active_isa() == Isa::kAVX2 ? decode_int4_panel_avx2 : nullptr;
  if (info.bits == 4 && panel4 && (gsize % 8 == 0 || gsize >= K))
    p.decode_packed = [&](int64_t n0, int64_t rows, int64_t k0, int64_t kc, float* packed) {
      for (int64_t r = 0; r < rows; ++r) prefetch_next_block(qweight.ptr<uint8_t>() + (n0 + r) * qweight.strides[0], k0, kc);
      panel4(rows4, n0, rows, k0, kc, packed);
    };
  return panel_gemm(p);
}

}  // namespace cpu
}  // namespace tensorslim
