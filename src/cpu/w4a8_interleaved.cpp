// linear_w4a8_pack's layout (gemm_w4a8.h): its size, the copy, and the check that a buffer
// handed back to linear_w4a8 is that copy of the weights it comes with.
#include <cstring>
#include <string>

#include "tensorslim/gemm_w4a8.h"
#include "tensorslim/lowbit.h"
#include "w4a8_interleaved.h"

namespace tensorslim {
namespace {

int64_t packed_bytes_of(const cpu::PackedShape& s) { return cpu::kPackedHeader + s.panels * s.panel_bytes; }

}  // namespace

int64_t linear_w4a8_packed_bytes(int64_t N, int64_t K, int64_t group_size, Format fmt) {
  TS_CHECK_VALUE(fmt == Format::kInt4 || fmt == Format::kUInt4,
                 std::string("linear_w4a8_packed_bytes: weights must be int4 or uint4, got ") +
                     format_info(fmt).name);
  cpu::PackedShape s;
  return cpu::packed_shape(N, K, group_size, fmt == Format::kUInt4, s) ? packed_bytes_of(s) : 0;
}

void linear_w4a8_pack(const TensorView& qweight, const TensorView& scales,
                      const TensorView* zero_points, Format fmt, int64_t K, int64_t group_size,
                      const TensorView& packed) {
  for (const TensorView* t : {&qweight, &scales, &packed})
    TS_CHECK_VALUE(t->device == DeviceType::kCPU, "linear_w4a8_pack: tensors are not on the CPU");
  TS_CHECK_VALUE(fmt == Format::kInt4 || fmt == Format::kUInt4,
                 std::string("linear_w4a8_pack: weights must be int4 or uint4, got ") +
                     format_info(fmt).name);
  check_ndim(qweight, 2, "qweight");
  const int64_t N = qweight.shape[0];
  const bool asym = fmt == Format::kUInt4;
  check_lowbit_args(weight_stand_in(qweight, N, K), fmt, group_size, qweight, scales, zero_points,
                    nullptr);
  cpu::PackedShape s;
  TS_CHECK_VALUE(cpu::packed_shape(N, K, group_size, asym, s),
                 "linear_w4a8_pack: no packed layout for K=" + std::to_string(K) + ", group " +
                     std::to_string(group_size) + " (the group must be a multiple of 8 or K)");
  check_dtype(packed, DType::kUInt8, "packed");
  TS_CHECK_VALUE(packed.is_contiguous() && packed.numel() == packed_bytes_of(s),
                 "packed: expected " + std::to_string(packed_bytes_of(s)) +
                     " contiguous bytes (linear_w4a8_packed_bytes), got " + shape_str(packed));
  uint8_t* out = packed.ptr<uint8_t>();
  std::memset(out, 0, packed.numel());
  cpu::PackedHeader h{};
  std::memcpy(h.magic, cpu::kPackedMagic, sizeof(h.magic));
  h.N = N, h.K = K, h.group = group_size, h.asym = asym;
  std::memcpy(out, &h, sizeof(h));
  const int64_t row_bytes = (K + 1) / 2;
  const uint8_t flip = asym ? 0x00 : 0x88;  // int4 code c stored as u = c + 8, both nibbles
  const uint8_t* zps = zero_points ? zero_points->ptr<uint8_t>() : nullptr;
  for (int64_t p = 0; p < s.panels; ++p) {
    uint8_t* panel = out + cpu::kPackedHeader + p * s.panel_bytes;
    float* sc = reinterpret_cast<float*>(panel + s.scales_at);
    for (int64_t r = 0; r < cpu::kPackedRows && p * cpu::kPackedRows + r < N; ++r) {
      const int64_t n = p * cpu::kPackedRows + r;
      const uint8_t* row = qweight.ptr<uint8_t>() + n * qweight.strides[0];
      for (int64_t b = 0; b < row_bytes; ++b) {
        uint8_t v = row[b] ^ flip;
        if (2 * b + 1 >= K) v &= 0x0F;  // odd K: the last byte's high nibble is past the row
        panel[b / 4 * 64 + r * 4 + b % 4] = v;
      }
      for (int64_t g = 0; g < s.groups; ++g) {
        sc[g * cpu::kPackedRows + r] = scales.ptr<float>()[n * scales.strides[0] + g];
        if (zps) panel[s.zps_at + g * cpu::kPackedRows + r] = zps[n * zero_points->strides[0] + g];
      }
    }
  }
}

bool linear_w4a8_packing_pays() { return cpu::linear_w4a8_native_fits(8, 8); }

namespace cpu {

const uint8_t* checked_w4a8_packed(const TensorView& packed, int64_t N, int64_t K, int64_t group,
                                   bool asym) {
  const std::string what = "packed: not linear_w4a8_pack's copy of these [" + std::to_string(N) +
                           ", " + std::to_string(K) + "] weights (group " + std::to_string(group) +
                           (asym ? ", uint4" : ", int4") + ")";
  TS_CHECK_VALUE(packed.device == DeviceType::kCPU, "packed: not on the CPU");
  check_dtype(packed, DType::kUInt8, "packed");
  PackedShape s;
  TS_CHECK_VALUE(packed_shape(N, K, group, asym, s) && packed.is_contiguous() &&
                     packed.numel() == packed_bytes_of(s),
                 what + ": its size is " + shape_str(packed));
  PackedHeader h;
  std::memcpy(&h, packed.data, sizeof(h));
  TS_CHECK_VALUE(std::memcmp(h.magic, kPackedMagic, sizeof(h.magic)) == 0 && h.N == N && h.K == K &&
                     h.group == group && h.asym == asym,
                 what + ": its header names another shape or layout");
  return packed.ptr<uint8_t>();
}

}  // namespace cpu
}  // namespace tensorslim
