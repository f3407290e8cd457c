// quantize / dequantize on the CPU: argument checks, row conversion, packing and
// threading here; the per-group arithmetic lives in the per-ISA kernels.
#include "tensorslim/quantize.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "float_rows.h"
#include "int4_codes.h"
#include "parallel.h"
#include "quant_kernels.h"

namespace tensorslim {
namespace {

struct GroupParams {
  float scale;
  int32_t zero_point;
};

// Scale and zero point of a group whose values span [lo, hi] (see quantize.h).
GroupParams group_params(const FormatInfo& info, float lo, float hi) {
  lo = std::fmin(lo, 0.0f);
  hi = std::fmax(hi, 0.0f);
  GroupParams p{1.0f, 0};
  if (info.has_zero_point) {
    float scale = cpu::asymmetric_scale(lo, hi, static_cast<float>(info.scale_divisor));
    p.scale = scale > 0.0f ? scale : 1.0f;
    float zp = std::nearbyint(-lo / p.scale);
    zp = std::fmin(std::fmax(zp, static_cast<float>(info.qmin)), static_cast<float>(info.qmax));
    p.zero_point = static_cast<int32_t>(zp);
  } else {
    float scale = std::fmax(-lo, hi) / static_cast<float>(info.scale_divisor);
    p.scale = scale > 0.0f ? scale : 1.0f;
  }
  return p;
}

void pack_nibbles(const uint8_t* codes, int64_t cols, uint8_t* out) {
  const int64_t full = cols / 2;
  for (int64_t j = 0; j < full; ++j)
    out[j] = static_cast<uint8_t>((codes[2 * j] & 0xF) | (codes[2 * j + 1] << 4));
  if (cols & 1) out[full] = codes[cols - 1] & 0xF;
}

[[noreturn]] void throw_nonfinite(int64_t row) {
  throw ValueError("quantize: x contains NaN or Inf (row " + std::to_string(row) +
                   "); quantization needs finite values");
}

}  // namespace

int64_t check_quant_args(const TensorView& x, Format fmt, int64_t group_size, const TensorView& q,
                         const TensorView& scales, const TensorView* zero_points) {
  const FormatInfo& info = format_info(fmt);
  check_ndim(x, 2, "x");
  TS_CHECK_TYPE(cpu::is_float_dtype(x.dtype), std::string("x: expected float32, bfloat16 or float16, got ") +
                                       dtype_name(x.dtype));
  const int64_t rows = x.shape[0], cols = x.shape[1];
  int64_t groups;
  if (group_size == -1) {
    groups = 1;
    check_shape2(scales, 1, 1, "scales (per tensor)");
  } else {
    // Any positive size: ceil(cols / group_size) groups per row, the last one holding what
    // is left (cols - (groups - 1) * group_size values); 0 only for a row of no values.
    TS_CHECK_VALUE(group_size > 0 || (group_size == 0 && cols == 0),
                   "group_size must be -1 (per tensor) or a positive number of values per group, "
                   "got " + std::to_string(group_size));
    groups = group_size == 0 ? 1 : num_groups(cols, group_size);
    // INT4 codes pack two per byte: every group but the last must start on a byte.
    TS_CHECK_VALUE(info.bits != 4 || groups <= 1 || group_size % 2 == 0,
                   std::string("group_size must be even for the packed format ") + info.name);
    check_shape2(scales, rows, groups, "scales");
  }
  check_dtype(scales, DType::kFloat32, "scales");
  check_contiguous(scales, "scales");
  const DType code_dtype = (info.bits == 8 && !info.has_zero_point) ? DType::kInt8 : DType::kUInt8;
  check_dtype(q, code_dtype, "q");
  check_shape2(q, rows, packed_row_bytes(info, cols), "q");
  TS_CHECK_VALUE(q.strides[1] == 1 || q.shape[1] <= 1, "q: rows must be contiguous");
  if (info.has_zero_point) {
    TS_CHECK_VALUE(zero_points != nullptr,
                   std::string("format ") + info.name + " needs a zero_points tensor");
    check_dtype(*zero_points, DType::kUInt8, "zero_points");
    check_shape2(*zero_points, scales.shape[0], scales.shape[1], "zero_points");
    check_contiguous(*zero_points, "zero_points");
  } else {
    TS_CHECK_VALUE(zero_points == nullptr,
                   std::string("format ") + info.name + " is symmetric and has no zero points");
  }
  return groups;
}

void quantize(const TensorView& x, Format fmt, int64_t group_size, const TensorView& q,
              const TensorView& scales, const TensorView* zero_points) {
  TS_CHECK_VALUE(x.device == DeviceType::kCPU, "quantize: x is not on the CPU");
  const int64_t groups = check_quant_args(x, fmt, group_size, q, scales, zero_points);
  const FormatInfo& info = format_info(fmt);
  const cpu::QuantKernels& k = cpu::active_quant_kernels();
  const int64_t rows = x.shape[0], cols = x.shape[1];
  const bool per_tensor = group_size == -1;
  const int64_t gsize = per_tensor || groups <= 1 ? cols : group_size;  // the last group may be short
  float* scale_out = scales.ptr<float>();
  uint8_t* zp_out = zero_points ? zero_points->ptr<uint8_t>() : nullptr;

  GroupParams tensor_params{1.0f, 0};
  if (per_tensor) {  // one pass for the range, a second to encode
    std::vector<float> lo(rows, 0.0f), hi(rows, 0.0f);
    cpu::parallel_for(rows, 4, [&](int64_t b, int64_t e) {
      std::vector<float> buf;
      for (int64_t r = b; r < e; ++r)
        if (cols && !k.min_max(cpu::row_as_f32(x, r, buf), cols, &lo[r], &hi[r])) throw_nonfinite(r);
    });
    float l = 0.0f, h = 0.0f;
    for (int64_t r = 0; r < rows; ++r) l = std::fmin(l, lo[r]), h = std::fmax(h, hi[r]);
    tensor_params = group_params(info, l, h);
    scale_out[0] = tensor_params.scale;
    if (zp_out) zp_out[0] = static_cast<uint8_t>(tensor_params.zero_point);
  }
  if (rows == 0 || (cols == 0 && per_tensor)) return;

  cpu::parallel_for(rows, 4, [&](int64_t b, int64_t e) {
    std::vector<float> buf;
    std::vector<uint8_t> codes(info.bits == 4 ? cols : 0);
    for (int64_t r = b; r < e; ++r) {
      const float* row = cpu::row_as_f32(x, r, buf);
      uint8_t* qrow = q.ptr<uint8_t>() + r * q.strides[0];
      uint8_t* dst = info.bits == 4 ? codes.data() : qrow;
      for (int64_t g = 0; g < groups; ++g) {
        const float* xg = row + g * gsize;
        const int64_t len = std::min(gsize, cols - g * gsize);
        GroupParams p = tensor_params;
        if (!per_tensor) {
          float lo = 0.0f, hi = 0.0f;
          if (len && !k.min_max(xg, len, &lo, &hi)) throw_nonfinite(r);
          p = group_params(info, lo, hi);
          scale_out[r * groups + g] = p.scale;
          if (zp_out) zp_out[r * groups + g] = static_cast<uint8_t>(p.zero_point);
        }
        k.encode(xg, len, p.scale, static_cast<float>(p.zero_point),
                 static_cast<float>(info.qmin), static_cast<float>(info.qmax), dst + g * gsize);
      }
      if (info.bits == 4) pack_nibbles(codes.data(), cols, qrow);
    }
  });
}

void dequantize(const TensorView& q, const TensorView& scales, const TensorView* zero_points,
                Format fmt, int64_t group_size, const TensorView& out) {
  TS_CHECK_VALUE(out.device == DeviceType::kCPU && q.device == DeviceType::kCPU,
                 "dequantize: tensors are not on the CPU");
  const int64_t groups = check_quant_args(out, fmt, group_size, q, scales, zero_points);
  TS_CHECK_VALUE(out.strides[1] == 1 || out.shape[1] <= 1, "out: rows must be contiguous");
  const FormatInfo& info = format_info(fmt);
  const cpu::QuantKernels& k = cpu::active_quant_kernels();
  const int64_t rows = out.shape[0], cols = out.shape[1];
  const bool per_tensor = group_size == -1;
  const int64_t gsize = per_tensor || groups <= 1 ? cols : group_size;  // the last group may be short
  const float* sc = scales.ptr<float>();
  const uint8_t* zp = zero_points ? zero_points->ptr<uint8_t>() : nullptr;
  const bool is_signed = !info.has_zero_point;

  // fp32 rows are decoded in place; other dtypes through one fp32 row.
  const bool direct = out.dtype == DType::kFloat32;
  const cpu::Int4GroupDecoder decode_int4 = info.bits == 4 ? cpu::int4_group_decoder() : nullptr;
  cpu::parallel_for(rows, 4, [&](int64_t b, int64_t e) {
    std::vector<float> buf(direct ? 0 : cols);
    std::vector<uint8_t> codes;
    for (int64_t r = b; r < e; ++r) {
      const uint8_t* qrow = q.ptr<uint8_t>() + r * q.strides[0];
      const uint8_t* c = decode_int4 ? nullptr : cpu::row_codes(qrow, cols, info.bits, is_signed, codes);
      float* row = direct ? out.ptr<float>() + r * out.strides[0] : buf.data();
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t idx = per_tensor ? 0 : r * groups + g;
        const int32_t z = zp ? zp[idx] : 0;
        const int64_t len = std::min(gsize, cols - g * gsize);
        if (decode_int4)  // INT4 groups start on a byte: gsize is even when a row has several
          decode_int4(qrow + g * gsize / 2, len, sc[idx], z, is_signed, row + g * gsize);
        else if (is_signed)
          k.decode_s8(reinterpret_cast<const int8_t*>(c) + g * gsize, len, sc[idx], z, row + g * gsize);
        else
          k.decode_u8(c + g * gsize, len, sc[idx], z, row + g * gsize);
      }
      if (!direct) cpu::store_row(row, out, r);
    }
  });
}

}  // namespace tensorslim
