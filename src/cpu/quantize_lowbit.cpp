// quantize_lowbit / dequantize_lowbit: the scalar reference for every row of the format
// table (lowbit.h states the semantics). Statistics, encoding and dequantization use the
// AVX-512 / AVX2 pieces when the ISA allows (bit-exact, tested).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "float_rows.h"
#include "parallel.h"
#include "quant_kernels.h"
#include "tensorslim/lowbit.h"
#include "tensorslim/quantize.h"

namespace tensorslim {
namespace {

bool is_integer_row(const FormatInfo& f) { return !f.is_float && f.code_values == nullptr; }

// Statistics of a run of values; false if any is NaN or Inf.
struct Stats {
  float lo = 0.0f, hi = 0.0f;  // min(min x, 0), max(max x, 0)
  double abs_sum = 0.0;
  int64_t n = 0;
  float amax() const { return std::fabs(std::fmax(-lo, hi)); }  // fabs: +0, never -0
  void merge(const Stats& o) {
    lo = std::fmin(lo, o.lo), hi = std::fmax(hi, o.hi), abs_sum += o.abs_sum, n += o.n;
  }
};

// Sums only when the format needs them (binary, ternary); min/max vectorized when allowed.
bool stats_of(const float* x, int64_t n, Stats* s, bool need_sum, cpu::Isa isa) {
  Stats r;
#if defined(TENSORSLIM_HAVE_AVX512) && defined(TENSORSLIM_HAVE_AVX2)
  if (isa != cpu::Isa::kScalar && !need_sum) {
    r.n = n;
    *s = r;
    return isa == cpu::Isa::kAVX512 ? cpu::lowbit_min_max_avx512(x, n, &s->lo, &s->hi)
                                    : cpu::lowbit_min_max_avx2(x, n, &s->lo, &s->hi);
  }
#endif
  (void)isa, (void)need_sum;
  for (int64_t i = 0; i < n; ++i) {
    if (!std::isfinite(x[i])) return false;
    r.lo = std::fmin(r.lo, x[i]);
    r.hi = std::fmax(r.hi, x[i]);
    r.abs_sum += std::fabs(x[i]);
  }
  r.n = n;
  *s = r;
  return true;
}

// Ternary: sum and count of |x| above the threshold t.
void above_threshold(const float* x, int64_t n, float t, double* sum, int64_t* count) {
  for (int64_t i = 0; i < n; ++i)
    if (std::fabs(x[i]) > t) *sum += std::fabs(x[i]), ++*count;
}

float mean_abs(const Stats& s) { return s.n ? static_cast<float>(s.abs_sum / s.n) : 0.0f; }

// What encoding one group needs, and what is stored for it.
struct GroupParams {
  float scale = 1.0f;       // decoded scale the codes multiply (NVFP4: block scale * ts)
  int32_t zero_point = 0;   // uint<N>
  float threshold = 0.0f;   // ternary
  uint8_t scale_code = 0;   // E4M3 / E8M0 byte (NVFP4 / MXFP4); the others store `scale`
};

// Parameters from the group's statistics (ternary also needs its values for the second pass).
GroupParams group_params(const FormatInfo& info, const Stats& s, float tensor_scale,
                         const float* x, int64_t n) {
  GroupParams p;
  switch (info.format) {
    case Format::kFP8E4M3:
    case Format::kFP8E5M2: {
      const float scale = s.amax() / info.max_value;
      p.scale = scale > 0.0f ? scale : 1.0f;
      break;
    }
    case Format::kNVFP4:
      p.scale_code = e4m3_encode(s.amax() / 6.0f / tensor_scale);
      p.scale = e4m3_decode(p.scale_code) * tensor_scale;
      break;
    case Format::kMXFP4: {
      int e = -127;
      if (s.amax() > 0.0f) {
        int ex;
        std::frexp(s.amax(), &ex);  // floor(log2 amax) = ex - 1; minus E2M1's emax (2)
        e = ex - 3;
      }
      p.scale_code = e8m0_from_exponent(e);
      p.scale = e8m0_decode(p.scale_code);
      break;
    }
    case Format::kBinary:
      p.scale = mean_abs(s);
      break;
    case Format::kTernary: {
      p.threshold = 0.7f * mean_abs(s);
      double sum = 0.0;
      int64_t count = 0;
      if (x) above_threshold(x, n, p.threshold, &sum, &count);
      p.scale = count ? static_cast<float>(sum / count) : 0.0f;
      break;
    }
    default:
      if (info.has_zero_point) {
        const float scale = cpu::asymmetric_scale(s.lo, s.hi, static_cast<float>(info.scale_divisor));
        p.scale = scale > 0.0f ? scale : 1.0f;
        float zp = std::nearbyint(-s.lo / p.scale);
        zp = std::fmin(std::fmax(zp, static_cast<float>(info.qmin)), static_cast<float>(info.qmax));
        p.zero_point = static_cast<int32_t>(zp);
      } else {
        const float scale = s.amax() / static_cast<float>(info.scale_divisor);
        p.scale = scale > 0.0f ? scale : 1.0f;
      }
  }
  return p;
}

void encode_group(const FormatInfo& info, const GroupParams& p, const float* x, int64_t n,
                  int32_t* codes, cpu::Isa isa) {
#if defined(TENSORSLIM_HAVE_AVX512) && defined(TENSORSLIM_HAVE_AVX2)
  if (isa == cpu::Isa::kAVX512 &&
      cpu::lowbit_encode_avx512(info, p.scale, p.zero_point, p.threshold, x, n, codes))
    return;
  if (isa == cpu::Isa::kAVX2 &&
      cpu::lowbit_encode_avx2(info, p.scale, p.zero_point, p.threshold, x, n, codes))
    return;
#endif
  (void)isa;
  const float arg = info.format == Format::kTernary ? p.threshold : p.scale;
  for (int64_t i = 0; i < n; ++i) codes[i] = info.encode(x[i], arg, p.zero_point);
}

[[noreturn]] void throw_nonfinite(const FormatInfo& info, int64_t row) {
  throw ValueError(std::string("quantize (") + info.name + "): x contains NaN or Inf (row " +
                   std::to_string(row) + "); quantization needs finite values");
}

}  // namespace

namespace cpu {

void pack_codes(const int32_t* codes, int64_t n, int bits, uint8_t* packed) {
  const uint32_t mask = (1u << bits) - 1;
  std::memset(packed, 0, static_cast<size_t>((n * bits + 7) / 8));
  for (int64_t i = 0; i < n; ++i) {
    const int64_t pos = i * bits;
    const uint32_t v = (static_cast<uint32_t>(codes[i]) & mask) << (pos & 7);
    packed[pos >> 3] |= static_cast<uint8_t>(v);
    if ((pos & 7) + bits > 8) packed[(pos >> 3) + 1] |= static_cast<uint8_t>(v >> 8);
  }
}

void unpack_codes(const uint8_t* packed, int64_t n, int bits, bool sign_extend, int32_t* codes) {
  const uint32_t mask = (1u << bits) - 1;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t pos = i * bits;
    uint32_t v = packed[pos >> 3];
    if ((pos & 7) + bits > 8) v |= static_cast<uint32_t>(packed[(pos >> 3) + 1]) << 8;
    v = (v >> (pos & 7)) & mask;
    codes[i] = sign_extend ? static_cast<int32_t>(v << (32 - bits)) >> (32 - bits)
                           : static_cast<int32_t>(v);
  }
}

void dequantize_values_reference(const LowbitWeight& w, int64_t n, int64_t k0, int64_t k1,
                                 float* out) {
  const FormatInfo& info = *w.info;
  if (k1 <= k0) return;
  const bool sign_extend = is_integer_row(info) && !info.has_zero_point;
  const uint8_t* row = w.q + n * w.q_stride;
  std::vector<int32_t> codes(k1 - k0);
  if ((k0 * info.bits) % 8 == 0) {
    unpack_codes(row + k0 * info.bits / 8, k1 - k0, info.bits, sign_extend, codes.data());
  } else {  // a start inside a byte: read the whole prefix's stream (tests use any k0)
    std::vector<int32_t> all(k1);
    unpack_codes(row, k1, info.bits, sign_extend, all.data());
    std::copy(all.begin() + k0, all.end(), codes.begin());
  }
  // Group by group: [b, e) is the part of group g inside [k0, k1).
  for (int64_t g = k0 / w.group, b = k0; b < k1; ++g) {
    const int64_t e = std::min(k1, (g + 1) * w.group);
    const int64_t idx = n * w.scale_stride + g;
    const int32_t* c = codes.data() + (b - k0);
    float* o = out + (b - k0);
    const int64_t len = e - b;
    b = e;
    if (info.scale_format == ScaleFormat::kE4M3) {  // NVFP4: (value * block scale) * ts
      const float bs = e4m3_decode(static_cast<const uint8_t*>(w.scales)[idx]);
      for (int64_t i = 0; i < len; ++i) o[i] = (info.code_values[c[i]] * bs) * w.tensor_scale;
      continue;
    }
    const float scale = info.scale_format == ScaleFormat::kE8M0
                            ? e8m0_decode(static_cast<const uint8_t*>(w.scales)[idx])
                            : static_cast<const float*>(w.scales)[idx];
    if (info.code_values) {
      for (int64_t i = 0; i < len; ++i) o[i] = info.code_values[c[i]] * scale;
    } else {
      const int32_t zp = w.zero_points ? w.zero_points[idx] : 0;
      for (int64_t i = 0; i < len; ++i) o[i] = static_cast<float>(c[i] - zp) * scale;
    }
  }
}

void dequantize_row_reference(const LowbitWeight& w, int64_t n, int64_t K, float* out) {
  dequantize_values_reference(w, n, 0, K, out);
}

}  // namespace cpu

int64_t check_lowbit_args(const TensorView& x, Format fmt, int64_t group_size,
                          const TensorView& q, const TensorView& scales,
                          const TensorView* zero_points, const TensorView* tensor_scale) {
  const FormatInfo& info = format_info(fmt);
  const std::string fname = info.name;
  check_ndim(x, 2, "x");
  TS_CHECK_TYPE(cpu::is_float_dtype(x.dtype),
                std::string("x: expected float32, bfloat16 or float16, got ") + dtype_name(x.dtype));
  const int64_t rows = x.shape[0], cols = x.shape[1];
  if (info.block_size) {  // any row length: the last block may be short
    TS_CHECK_VALUE(group_size == info.block_size,
                   "format " + fname + " uses blocks of " + std::to_string(info.block_size) +
                       ": group_size must be " + std::to_string(info.block_size) + ", got " +
                       std::to_string(group_size));
  }
  int64_t groups;
  if (group_size == -1) {
    groups = 1;
    check_shape2(scales, 1, 1, "scales (per tensor)");
  } else {
    TS_CHECK_VALUE(group_size > 0,
                   "group_size " + std::to_string(group_size) +
                       " must be -1 (per tensor), the row length " + std::to_string(cols) +
                       " (per row) or a positive group size");
    // ceil(cols / group): the last group holds what is left (all of a row shorter than it).
    groups = lowbit_groups(cols, group_size);
    TS_CHECK_VALUE(groups <= 1 || (group_size * info.bits) % 8 == 0,
                   "format " + fname + ": group_size * " + std::to_string(info.bits) +
                       " bits must be a whole number of bytes, got group_size " +
                       std::to_string(group_size));
    check_shape2(scales, rows, groups, "scales");
  }
  const DType scale_dtype =
      info.scale_format == ScaleFormat::kFloat32 ? DType::kFloat32 : DType::kUInt8;
  check_dtype(scales, scale_dtype, "scales");
  if (scales.numel()) check_contiguous(scales, "scales");  // an empty one has any strides
  const DType code_dtype =
      (is_integer_row(info) && info.bits == 8 && !info.has_zero_point) ? DType::kInt8 : DType::kUInt8;
  check_dtype(q, code_dtype, "q");
  check_shape2(q, rows, packed_row_bytes(info, cols), "q");
  TS_CHECK_VALUE(q.strides[1] == 1 || q.shape[1] <= 1, "q: rows must be contiguous");
  if (info.has_zero_point) {
    TS_CHECK_VALUE(zero_points != nullptr, "format " + fname + " needs a zero_points tensor");
    check_dtype(*zero_points, DType::kUInt8, "zero_points");
    check_shape2(*zero_points, scales.shape[0], scales.shape[1], "zero_points");
    if (zero_points->numel()) check_contiguous(*zero_points, "zero_points");
  } else {
    TS_CHECK_VALUE(zero_points == nullptr, "format " + fname + " has no zero points");
  }
  if (info.has_tensor_scale) {
    TS_CHECK_VALUE(tensor_scale != nullptr, "format " + fname + " needs a tensor_scale tensor");
    check_dtype(*tensor_scale, DType::kFloat32, "tensor_scale");
    TS_CHECK_VALUE(tensor_scale->numel() == 1,
                   "tensor_scale: expected one value, got shape " + shape_str(*tensor_scale));
  } else {
    TS_CHECK_VALUE(tensor_scale == nullptr, "format " + fname + " has no tensor scale");
  }
  return groups;
}

void quantize_lowbit(const TensorView& x, Format fmt, int64_t group_size, const TensorView& q,
                     const TensorView& scales, const TensorView* zero_points,
                     const TensorView* tensor_scale) {
  TS_CHECK_VALUE(x.device == DeviceType::kCPU && q.device == DeviceType::kCPU,
                 "quantize_lowbit: tensors are not on the CPU");
  const int64_t groups =
      check_lowbit_args(x, fmt, group_size, q, scales, zero_points, tensor_scale);
  const FormatInfo& info = format_info(fmt);
  const int64_t rows = x.shape[0], cols = x.shape[1];
  const bool per_tensor = group_size == -1;
  const int64_t gsize = values_per_group(cols, group_size);
  const bool byte_scales = info.scale_format != ScaleFormat::kFloat32;
  const bool need_sum = info.format == Format::kBinary || info.format == Format::kTernary;
  const cpu::Isa isa = cpu::active_isa();
  uint8_t* zp_out = zero_points ? zero_points->ptr<uint8_t>() : nullptr;

  auto store_params = [&](int64_t idx, const GroupParams& p) {
    if (byte_scales)
      scales.ptr<uint8_t>()[idx] = p.scale_code;
    else
      scales.ptr<float>()[idx] = p.scale;
    if (zp_out) zp_out[idx] = static_cast<uint8_t>(p.zero_point);
  };

  // Whole-tensor statistics: per-tensor scales, and NVFP4's tensor scale.
  GroupParams tensor_params;
  float ts = 1.0f;
  if (per_tensor || info.has_tensor_scale) {
    std::vector<Stats> row_stats(rows);
    cpu::parallel_for(rows, 4, [&](int64_t b, int64_t e) {
      std::vector<float> buf;
      for (int64_t r = b; r < e; ++r)
        if (!stats_of(cpu::row_as_f32(x, r, buf), cols, &row_stats[r], need_sum, isa))
          throw_nonfinite(info, r);
    });
    Stats all;
    for (const Stats& s : row_stats) all.merge(s);
    if (info.has_tensor_scale) {
      const float t = all.amax() / (6.0f * 448.0f);
      ts = t > 0.0f ? t : 1.0f;
      tensor_scale->ptr<float>()[0] = ts;
    }
    if (per_tensor) {
      tensor_params = group_params(info, all, ts, nullptr, 0);
      if (info.format == Format::kTernary) {  // second pass: mean |x| above the threshold
        double sum = 0.0;
        int64_t count = 0;
        std::vector<float> buf;
        for (int64_t r = 0; r < rows; ++r) {  // per-row sums, then their sum (as for Stats)
          double row_sum = 0.0;
          above_threshold(cpu::row_as_f32(x, r, buf), cols, tensor_params.threshold, &row_sum, &count);
          sum += row_sum;
        }
        tensor_params.scale = count ? static_cast<float>(sum / count) : 0.0f;
      }
      store_params(0, tensor_params);
    }
  }
  if (rows == 0 || cols == 0) return;

  cpu::parallel_for(rows, 4, [&](int64_t b, int64_t e) {
    std::vector<float> buf;
    std::vector<int32_t> codes(cols);
    for (int64_t r = b; r < e; ++r) {
      const float* row = cpu::row_as_f32(x, r, buf);
      for (int64_t g = 0; g < groups; ++g) {
        const float* xg = row + g * gsize;
        const int64_t len = lowbit_group_values(cols, gsize, g);  // the last group may be short
        GroupParams p = tensor_params;
        if (!per_tensor) {
          Stats s;
          if (!stats_of(xg, len, &s, need_sum, isa)) throw_nonfinite(info, r);
          p = group_params(info, s, ts, xg, len);
          store_params(r * groups + g, p);
        }
        encode_group(info, p, xg, len, codes.data() + g * gsize, isa);
      }
      cpu::pack_codes(codes.data(), cols, info.bits, q.ptr<uint8_t>() + r * q.strides[0]);
    }
  });
}

void dequantize_lowbit(const TensorView& q, const TensorView& scales,
                       const TensorView* zero_points, const TensorView* tensor_scale, Format fmt,
                       int64_t group_size, const TensorView& out) {
  TS_CHECK_VALUE(out.device == DeviceType::kCPU && q.device == DeviceType::kCPU,
                 "dequantize_lowbit: tensors are not on the CPU");
  const int64_t groups =
      check_lowbit_args(out, fmt, group_size, q, scales, zero_points, tensor_scale);
  TS_CHECK_VALUE(out.strides[1] == 1 || out.shape[1] <= 1, "out: rows must be contiguous");
  const FormatInfo& info = format_info(fmt);
  const int64_t rows = out.shape[0], cols = out.shape[1];
  cpu::LowbitWeight w{&info,
                      q.ptr<uint8_t>(),
                      q.strides[0],
                      scales.data,
                      zero_points ? zero_points->ptr<uint8_t>() : nullptr,
                      tensor_scale ? tensor_scale->ptr<float>()[0] : 1.0f,
                      groups,
                      values_per_group(cols, group_size),
                      group_size == -1 ? 0 : groups};
  const int isa_lanes = cpu::lowbit_native_lanes();
  const int lanes = cpu::lowbit_lanes_fit(isa_lanes, cols, w.group) ? isa_lanes : 0;
  cpu::parallel_for(rows, 4, [&](int64_t b, int64_t e) {
    std::vector<float> row(cols);
    for (int64_t r = b; r < e; ++r) {
      if (lanes)
        cpu::dequantize_row_native(lanes, w, r, cols, row.data());
      else
        cpu::dequantize_row_reference(w, r, cols, row.data());
      cpu::store_row(row.data(), out, r);
    }
  });
}

}  // namespace tensorslim
