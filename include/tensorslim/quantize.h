// Integer quantization of a 2-D tensor, row by row, in groups along the last dim.
//
// Reference semantics (every path matches bit for bit):
//   symmetric:  scale = amax / qmax (1 if amax == 0);  q = clamp(rne(x / scale), qmin, qmax)
//   asymmetric: lo = min(min x, 0), hi = max(max x, 0); scale = (hi - lo) / (qmax - qmin)
//               (1 if 0); zp = clamp(rne(-lo / scale), qmin, qmax);
//               q = clamp(rne(x / scale) + zp, qmin, qmax)
//   dequantize: x' = float(q - zp) * scale
// rne is round-half-to-even; all arithmetic is IEEE fp32 without contraction.
#pragma once

#include <cstdint>

#include "tensorslim/formats.h"
#include "tensorslim/tensor_view.h"

namespace tensorslim {

// group_size: -1 = one scale for the whole tensor, >= cols = one per row (per channel /
// per token), otherwise per group of group_size values: ceil(cols / group_size) groups per
// row, the last one holding cols - (groups - 1) * group_size values when group_size does
// not divide cols (as compressed-tensors stores them). INT4 group sizes are even (when
// there are two groups or more) so every group starts on a byte.
// x: [rows, cols] f32/bf16/f16, any strides.  q: [rows, packed_row_bytes] int8/uint8.
// scales: [rows, num_groups(cols, group)] f32 ([1, 1] per tensor).  zero_points: same shape, uint8,
// only for formats with a zero point (else nullptr).
void quantize(const TensorView& x, Format fmt, int64_t group_size, const TensorView& q,
              const TensorView& scales, const TensorView* zero_points);

// out: [rows, cols] f32/bf16/f16 contiguous rows.
void dequantize(const TensorView& q, const TensorView& scales, const TensorView* zero_points,
                Format fmt, int64_t group_size, const TensorView& out);

// Groups per row of cols values: ceil(cols / group_size) (group_size > 0).
inline int64_t num_groups(int64_t cols, int64_t group_size) {
  return (cols + group_size - 1) / group_size;
}

// Validates shapes, dtypes and the group size; returns the number of groups per row.
int64_t check_quant_args(const TensorView& x_or_out, Format fmt, int64_t group_size,
                         const TensorView& q, const TensorView& scales,
                         const TensorView* zero_points);

namespace cpu {

enum class Isa : int32_t { kScalar = 0, kAVX2 = 1, kAVX512 = 2 };
const char* isa_name(Isa isa);
Isa best_isa();                // what this CPU supports
Isa active_isa();              // what kernels use now (best, or a forced lower one)
bool cpu_has_avx512_vnni();    // vpdpbusd on zmm (AVX512_VNNI), whatever the active ISA
bool cpu_has_avx512_bf16();    // vdpbf16ps on zmm (AVX512_BF16), whatever the active ISA
bool cpu_has_avx512_vbmi();    // vpermt2b / vpmultishiftqb on zmm (AVX512_VBMI), whatever the active ISA
bool cpu_is_intel();           // CPUID vendor "GenuineIntel" (where a kernel's shape was measured per vendor)
void set_isa(Isa isa);         // force a path (tests compare each one with the reference)

// 256-bit vpdpbusd inside the AVX2 kernels (INT8 panels, W4A8's packed kernel): the VEX form
// where the CPU has AVX-VNNI (Intel from Alder Lake on, which have no AVX-512), or the EVEX form
// of AVX512-VNNI, so an AVX-512 CPU running its AVX2 paths can stand in for one. On by default
// where the CPU has AVX-VNNI; TENSORSLIM_AVX2_VNNI=0|1 or set_avx2_vnni change that.
enum class AvxVnni : int32_t { kNone = 0, kVex = 1, kEvex = 2 };
bool cpu_has_avx_vnni();       // AVX-VNNI (VEX vpdpbusd on ymm), whatever the active ISA
AvxVnni avx2_vnni();           // the form the AVX2 kernels use now: kNone unless the active ISA is AVX2 and it is on
bool avx2_vnni_available();    // whether this CPU has a form (set_avx2_vnni(true) works)
void set_avx2_vnni(bool on);   // on needs AVX-VNNI or AVX512-VNNI (ValueError otherwise)

}  // namespace cpu
}  // namespace tensorslim
