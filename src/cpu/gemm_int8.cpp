// W8A8 on the CPU: argument checks, backend choice, and the scalar references that the
// AVX-512 quantizers and the oneDNN GEMM are tested against (see gemm_int8.h).
#include "tensorslim/gemm_int8.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "onednn_usable.h"
#include "parallel.h"
#include "tensorslim/quantize.h"

namespace tensorslim {
namespace {

void check_act(const TensorView& x, const TensorView* inv_smooth, const TensorView& q,
               const char* op) {
  const std::string o(op);
  check_ndim(x, 2, "x");
  check_dtype(x, DType::kFloat32, "x");
  check_contiguous(x, "x");
  check_shape2(q, x.shape[0], x.shape[1], "q");
  check_contiguous(q, "q");
  check_same_device(x, q, op);
  TS_CHECK_VALUE(x.device == DeviceType::kCPU, o + ": x is not on the CPU");
  if (inv_smooth) {
    check_dtype(*inv_smooth, DType::kFloat32, "inv_smooth");
    TS_CHECK_VALUE(inv_smooth->ndim == 1 && inv_smooth->shape[0] == x.shape[1],
                   "inv_smooth: expected shape [" + std::to_string(x.shape[1]) + "], got " +
                       shape_str(*inv_smooth));
    check_contiguous(*inv_smooth, "inv_smooth");
  }
}


bool use_isa(GemmBackend backend, cpu::Isa isa) {
  return backend != GemmBackend::kReference && cpu::active_isa() == isa;
}

// Our AVX-512 VNNI kernels for this many rows; false where the CPU or ISA lacks them.
bool vnni_kernels(const TensorView& qx, const TensorView& act_scales, int32_t act_zero_point,
                  const TensorView& qweight, const TensorView& w_scales, const TensorView* bias,
                  const TensorView& out) {
  const bool large = qweight.shape[0] * qweight.shape[1] >= cpu::kInt8LargeWeight;
  if (qx.shape[0] < (large ? cpu::kInt8VnniLargeMaxRows : cpu::kInt8VnniMaxRows))
    return cpu::linear_int8_vnni(qx, act_scales, act_zero_point, qweight, w_scales, bias, out);
  return cpu::linear_int8_vnni_panels(qx, act_scales, act_zero_point, qweight, w_scales, bias, out);
}

}  // namespace

namespace cpu {

int64_t activation_row_grain(int64_t K) {
  const int64_t values = on_host_openmp() ? int64_t{1} << 16 : int64_t{1} << 22;
  return std::max<int64_t>(4, values / std::max<int64_t>(K, 1));
}

[[noreturn]] void throw_activation_not_finite(int64_t row) {
  throw ValueError("x contains NaN or Inf (row " + std::to_string(row) +
                   "); activation quantization needs finite values");
}

[[noreturn]] void throw_first_not_finite(const float* x, int64_t begin, int64_t end, int64_t K) {
  int64_t i = begin;
  while (i < end && std::isfinite(x[i])) ++i;
  throw_activation_not_finite(i / K);
}

void quantize_per_token_reference(const TensorView& x, const TensorView* inv_smooth,
                                  const TensorView& q, const TensorView& scales) {
  const int64_t M = x.shape[0], K = x.shape[1];
  const float* inv = inv_smooth ? inv_smooth->ptr<float>() : nullptr;
  const bool is_u8 = q.dtype == DType::kUInt8;
  parallel_for(M, 4, [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) {
      const float* xr = x.ptr<float>() + m * K;
      float amax = 0.0f;
      for (int64_t k = 0; k < K; ++k) {
        const float v = inv ? xr[k] * inv[k] : xr[k];
        if (!std::isfinite(v)) throw_activation_not_finite(m);
        amax = std::fmax(amax, std::fabs(v));
      }
      const float scale = amax > 0.0f ? amax / 127.0f : 1.0f;
      scales.ptr<float>()[m] = scale;
      for (int64_t k = 0; k < K; ++k) {
        const float v = inv ? xr[k] * inv[k] : xr[k];
        const float r = std::fmin(std::fmax(std::nearbyint(v / scale), -127.0f), 127.0f);
        if (is_u8)
          q.ptr<uint8_t>()[m * K + k] = static_cast<uint8_t>(static_cast<int>(r) + 128);
        else
          q.ptr<int8_t>()[m * K + k] = static_cast<int8_t>(r);
      }
    }
  });
}

void quantize_static_reference(const TensorView& x, const TensorView* inv_smooth, float scale,
                               int32_t zero_point, const TensorView& q) {
  const int64_t M = x.shape[0], K = x.shape[1];
  const float* inv = inv_smooth ? inv_smooth->ptr<float>() : nullptr;
  const bool is_u8 = q.dtype == DType::kUInt8;
  const float qmin = is_u8 ? 0.0f : -128.0f, qmax = is_u8 ? 255.0f : 127.0f;
  const float zp = static_cast<float>(zero_point);
  parallel_for(M, 4, [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) {
      const float* xr = x.ptr<float>() + m * K;
      for (int64_t k = 0; k < K; ++k) {
        const float v = inv ? xr[k] * inv[k] : xr[k];
        if (!std::isfinite(v)) throw_activation_not_finite(m);
        const float r = std::fmin(std::fmax(std::nearbyint(v / scale) + zp, qmin), qmax);
        if (is_u8)
          q.ptr<uint8_t>()[m * K + k] = static_cast<uint8_t>(r);
        else
          q.ptr<int8_t>()[m * K + k] = static_cast<int8_t>(r);
      }
    }
  });
}

void linear_int8_reference(const TensorView& qx, const TensorView& act_scales,
                           int32_t act_zero_point, const TensorView& qweight,
                           const TensorView& w_scales, const TensorView* bias,
                           const TensorView& out) {
  const int64_t M = qx.shape[0], K = qx.shape[1], N = qweight.shape[0];
  const bool per_token = act_scales.shape[0] == M && M != 1;
  const bool is_u8 = qx.dtype == DType::kUInt8;
  parallel_for(M, 1, [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) {
      const float a_s = act_scales.ptr<float>()[per_token ? m : 0];
      for (int64_t n = 0; n < N; ++n) {
        const int8_t* w = qweight.ptr<int8_t>() + n * K;
        int32_t acc = 0;
        for (int64_t k = 0; k < K; ++k) {
          const int32_t a = is_u8 ? qx.ptr<uint8_t>()[m * K + k] : qx.ptr<int8_t>()[m * K + k];
          acc += (a - act_zero_point) * static_cast<int32_t>(w[k]);
        }
        float y = static_cast<float>(acc) * (a_s * w_scales.ptr<float>()[n]);
        if (bias) y += bias->ptr<float>()[n];
        out.ptr<float>()[m * N + n] = y;
      }
    }
  });
}

}  // namespace cpu

void quantize_per_token(const TensorView& x, const TensorView* inv_smooth, const TensorView& q,
                        const TensorView& scales, GemmBackend backend) {
  check_act(x, inv_smooth, q, "quantize_per_token");
  TS_CHECK_TYPE(q.dtype == DType::kUInt8 || q.dtype == DType::kInt8,
                std::string("q: expected dtype int8 (or uint8 for codes + 128), got ") +
                    dtype_name(q.dtype));
  check_dtype(scales, DType::kFloat32, "scales");
  TS_CHECK_VALUE(scales.ndim == 1 && scales.shape[0] == x.shape[0],
                 "scales: expected shape [" + std::to_string(x.shape[0]) + "], got " +
                     shape_str(scales));
  check_contiguous(scales, "scales");
  if (x.numel() == 0) {
    for (int64_t m = 0; m < scales.shape[0]; ++m) scales.ptr<float>()[m] = 1.0f;
    return;
  }
  if (use_isa(backend, cpu::Isa::kAVX512) && cpu::quantize_per_token_avx512(x, inv_smooth, q, scales))
    return;
  if (use_isa(backend, cpu::Isa::kAVX2) && cpu::quantize_per_token_avx2(x, inv_smooth, q, scales))
    return;
  cpu::quantize_per_token_reference(x, inv_smooth, q, scales);
}

void quantize_static(const TensorView& x, const TensorView* inv_smooth, float scale,
                     int32_t zero_point, const TensorView& q, GemmBackend backend) {
  check_act(x, inv_smooth, q, "quantize_static");
  TS_CHECK_TYPE(q.dtype == DType::kUInt8 || q.dtype == DType::kInt8,
                std::string("q: expected dtype uint8 or int8, got ") + dtype_name(q.dtype));
  TS_CHECK_VALUE(std::isfinite(scale) && scale > 0.0f,
                 "quantize_static: scale must be finite and > 0, got " + std::to_string(scale));
  if (q.dtype == DType::kUInt8)
    TS_CHECK_VALUE(zero_point >= 0 && zero_point <= 255,
                   "quantize_static: a uint8 zero point must be in 0..255, got " +
                       std::to_string(zero_point));
  else
    TS_CHECK_VALUE(zero_point == 0, "quantize_static: int8 activations are symmetric (zero "
                                    "point 0), got " + std::to_string(zero_point));
  if (x.numel() == 0) return;
  if (use_isa(backend, cpu::Isa::kAVX512) &&
      cpu::quantize_static_avx512(x, inv_smooth, scale, zero_point, q))
    return;
  if (use_isa(backend, cpu::Isa::kAVX2) &&
      cpu::quantize_static_avx2(x, inv_smooth, scale, zero_point, q))
    return;
  cpu::quantize_static_reference(x, inv_smooth, scale, zero_point, q);
}

namespace {

// Which packed layout linear_int8_pack writes for the active ISA, and its size: our VNNI
// panels on AVX-512 VNNI CPUs, except where oneDNN runs AMX tiles (faster than VNNI from ~40
// rows, and reading the plain weight: see linear_int8_packing_pays_onednn); our AVX2 panels
// where the AVX2 kernels have vpdpbusd (AVX-VNNI: as on AVX-512 VNNI, our panels rather than
// oneDNN's, whose VNNI kernel is exact there too; also on an AMX CPU capped at AVX2 by set_isa,
// which is there to run the AVX2 paths); elsewhere oneDNN's own where its kernel is exact;
// else, on AVX2, our AVX2 panels (none below AVX2).
enum class PackedLayout { kNone, kVnniPanels, kOneDnn, kAvx2Panels };

struct Packing {
  PackedLayout layout;
  int64_t bytes;
};

bool packs_vnni_panels() { return cpu::int8_vnni_available() && !cpu::onednn_int8_uses_amx(); }

Packing packing_for(int64_t K, int64_t N) {
  if (packs_vnni_panels()) return {PackedLayout::kVnniPanels, cpu::linear_int8_vnni_packed_bytes(K, N)};
  if (cpu::avx2_vnni() != cpu::AvxVnni::kNone)
    return {PackedLayout::kAvx2Panels, cpu::linear_int8_avx2_packed_bytes(K, N)};
  const int64_t bytes = cpu::linear_int8_packed_bytes_onednn(K, N);
  if (bytes > 0) return {PackedLayout::kOneDnn, bytes};
  if (cpu::active_isa() == cpu::Isa::kAVX2) return {PackedLayout::kAvx2Panels, cpu::linear_int8_avx2_packed_bytes(K, N)};
  return {PackedLayout::kNone, 0};
}

// Whether packed holds our layout of that kind for this weight (by its header); oneDNN's has
// no header, so it is taken as what the size says.
bool packed_header_matches(PackedLayout layout, const uint8_t* packed, int64_t K, int64_t N) {
  const bool vnni = cpu::linear_int8_vnni_packed_matches(packed, K, N);
  const bool avx2 = cpu::linear_int8_avx2_packed_matches(packed, K, N);
  switch (layout) {
    case PackedLayout::kVnniPanels: return vnni;
    case PackedLayout::kAvx2Panels: return avx2;
    default: return !vnni && !avx2;
  }
}

// Our packed panels of that layout (or where they lose, the AVX2 GEMV on the plain weight);
// false where the ISA lacks them.
bool our_panels(PackedLayout layout, const TensorView& qx, const TensorView& act_scales, int32_t act_zero_point,
                const TensorView& qweight, const TensorView& w_scales, const TensorView* bias,
                const TensorView& out, const uint8_t* panels) {
  if (layout == PackedLayout::kVnniPanels)
    return cpu::linear_int8_vnni_panels(qx, act_scales, act_zero_point, qweight, w_scales, bias, out, panels);
  // Full-range codes on a large weight: the plain path (its GEMV at every row count there) beats
  // the sign-product panels (4096 x 4096, AVX2, 1 / 8 / 32 / 40 / 128 rows: 0.30 / 1.57 / 5.73 /
  // 6.85 / 21.0 ms against 0.49 / 1.89 / 6.30 / 7.74 / 23.5); narrow codes' panels beat it from
  // 1 row (0.17 / 0.74 ms at 1 / 8 rows), and so do any codes' with vpdpbusd.
  if (!cpu::linear_int8_avx2_packed_narrow(panels) && cpu::avx2_vnni() == cpu::AvxVnni::kNone &&
      qweight.shape[0] * qweight.shape[1] >= cpu::kInt8LargeWeight)
    return cpu::linear_int8_avx2(qx, act_scales, act_zero_point, qweight, w_scales, bias, out);
  return cpu::linear_int8_panels_avx2(qx, act_scales, act_zero_point, qweight, w_scales, bias, out, panels);
}

}  // namespace

int64_t linear_int8_packed_bytes(int64_t K, int64_t N) {
  TS_CHECK_VALUE(K > 0 && N > 0, "linear_int8_packed_bytes: K and N must be positive");
  return packing_for(K, N).bytes;
}

bool linear_int8_packing_pays() {
  // On AVX2 our panels wherever oneDNN's kernel is inexact or the AVX2 kernels have vpdpbusd
  // (packing_for); otherwise an AMX oneDNN is exact, its layout the one packed, and that one
  // does not pay.
  const bool avx2_panels = cpu::active_isa() == cpu::Isa::kAVX2 &&
                           (cpu::avx2_vnni() != cpu::AvxVnni::kNone || !cpu::onednn_int8_uses_amx());
  return packs_vnni_panels() || avx2_panels || cpu::linear_int8_packing_pays_onednn();
}

const char* linear_int8_packed_layout(int64_t K, int64_t N) {
  TS_CHECK_VALUE(K > 0 && N > 0, "linear_int8_packed_layout: K and N must be positive");
  switch (packing_for(K, N).layout) {
    case PackedLayout::kVnniPanels: return "vnni_panels";
    case PackedLayout::kOneDnn: return "onednn";
    case PackedLayout::kAvx2Panels: return "avx2_panels";
    default: return "none";
  }
}

void linear_int8_pack(const TensorView& qweight, const TensorView& packed) {
  check_ndim(qweight, 2, "qweight");
  check_dtype(qweight, DType::kInt8, "qweight");
  check_contiguous(qweight, "qweight");
  check_dtype(packed, DType::kUInt8, "packed");
  check_contiguous(packed, "packed");
  const int64_t K = qweight.shape[1], N = qweight.shape[0];
  TS_CHECK_VALUE(K > 0 && N > 0, "linear_int8_pack: qweight is empty (shape " + shape_str(qweight) + ")");
  const auto [layout, need] = packing_for(K, N);
  TS_CHECK_VALUE(need > 0, "linear_int8_pack: no packed layout for this shape on this CPU");
  TS_CHECK_VALUE(packed.numel() == need, "packed: expected " + std::to_string(need) +
                                             " bytes, got " + std::to_string(packed.numel()));
  if (layout == PackedLayout::kVnniPanels)
    cpu::linear_int8_vnni_pack(qweight, packed);
  else if (layout == PackedLayout::kAvx2Panels)
    cpu::linear_int8_avx2_pack(qweight, packed);
  else
    cpu::linear_int8_pack_onednn(qweight, packed);
}

void linear_int8(const TensorView& qx, const TensorView& act_scales, int32_t act_zero_point,
                 const TensorView& qweight, const TensorView& w_scales, const TensorView* bias,
                 const TensorView& out, GemmBackend backend, const TensorView* packed) {
  check_ndim(qx, 2, "qx");
  TS_CHECK_TYPE(qx.dtype == DType::kUInt8 || qx.dtype == DType::kInt8,
                std::string("qx: expected dtype uint8 or int8, got ") + dtype_name(qx.dtype));
  TS_CHECK_VALUE(qx.device == DeviceType::kCPU, "linear_int8: qx is not on the CPU");
  check_contiguous(qx, "qx");
  const int64_t M = qx.shape[0], K = qx.shape[1];
  check_ndim(qweight, 2, "qweight");
  check_dtype(qweight, DType::kInt8, "qweight");
  check_contiguous(qweight, "qweight");
  TS_CHECK_VALUE(qweight.shape[1] == K, "qweight: expected " + std::to_string(K) +
                                            " columns (in_features), got shape " +
                                            shape_str(qweight));
  const int64_t N = qweight.shape[0];
  check_dtype(act_scales, DType::kFloat32, "act_scales");
  TS_CHECK_VALUE(act_scales.ndim == 1 && (act_scales.shape[0] == 1 || act_scales.shape[0] == M),
                 "act_scales: expected shape [1] or [" + std::to_string(M) + "], got " +
                     shape_str(act_scales));
  check_contiguous(act_scales, "act_scales");
  if (qx.dtype == DType::kInt8)
    TS_CHECK_VALUE(act_zero_point == 0, "linear_int8: int8 activations are symmetric (zero "
                                        "point 0), got " + std::to_string(act_zero_point));
  else
    TS_CHECK_VALUE(act_zero_point >= 0 && act_zero_point <= 255,
                   "linear_int8: a uint8 zero point must be in 0..255, got " +
                       std::to_string(act_zero_point));
  check_dtype(w_scales, DType::kFloat32, "w_scales");
  TS_CHECK_VALUE(w_scales.ndim == 1 && w_scales.shape[0] == N,
                 "w_scales: expected shape [" + std::to_string(N) + "], got " + shape_str(w_scales));
  check_contiguous(w_scales, "w_scales");
  if (bias) {
    check_dtype(*bias, DType::kFloat32, "bias");
    TS_CHECK_VALUE(bias->ndim == 1 && bias->shape[0] == N,
                   "bias: expected shape [" + std::to_string(N) + "], got " + shape_str(*bias));
    check_contiguous(*bias, "bias");
  }
  check_dtype(out, DType::kFloat32, "out");
  check_shape2(out, M, N, "out");
  check_contiguous(out, "out");
  for (const TensorView* t : {&act_scales, &qweight, &w_scales, &out})
    check_same_device(qx, *t, "linear_int8");
  const Packing packing = packed && K > 0 && N > 0 ? packing_for(K, N) : Packing{PackedLayout::kNone, 0};
  const PackedLayout layout = packing.layout;
  if (packed) {
    check_dtype(*packed, DType::kUInt8, "packed");
    check_contiguous(*packed, "packed");
    // No packed layout here (oneDNN inexact on this CPU, or unusable in a forked child):
    // weights packed elsewhere are not read, the plain qweight is.
    const int64_t need = packing.bytes;
    TS_CHECK_VALUE(need == 0 || packed->numel() == need,
                   "packed: expected " + std::to_string(need) +
                       " bytes (linear_int8_pack of this qweight), got " +
                       std::to_string(packed->numel()));
    // A buffer packed under another ISA (set_isa) or for another weight has the right size
    // only by chance; the panels' header says which it is.
    TS_CHECK_VALUE(need == 0 || packed_header_matches(layout, packed->ptr<uint8_t>(), K, N),
                   "packed: not linear_int8_pack's layout of this [" + std::to_string(N) + ", " +
                       std::to_string(K) + "] qweight under the active ISA (pack it again after "
                       "set_isa or a change of weights)");
    if (need == 0) packed = nullptr;
  }
  // Our panels packed once run every row count: they beat our GEMV from 1 row (4096 x 4096
  // 1.20x, 11008 x 4096 1.57x, MiniLM's shapes 1.07-1.25x, weights hot; even when cold) and
  // oneDNN's and torch's matmuls at every size measured. oneDNN reads only its own layout.
  // Our AVX2 panels likewise with narrow codes: 1.6-2.7x our GEMV / per-call panels at 1-640
  // rows of 4096 x 4096, fbgemm's AVX2 speed (benchmarks.md, twentieth session).
  const bool ours = layout == PackedLayout::kVnniPanels || layout == PackedLayout::kAvx2Panels;
  const uint8_t* panels = packed && ours ? packed->ptr<uint8_t>() : nullptr;
  if (panels) packed = nullptr;
  if (M == 0 || N == 0) return;
  if (K == 0) {  // an empty sum: only the bias is left
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) out.ptr<float>()[m * N + n] = bias ? bias->ptr<float>()[n] : 0.0f;
    return;
  }
  switch (backend) {
    case GemmBackend::kReference:
      return cpu::linear_int8_reference(qx, act_scales, act_zero_point, qweight, w_scales, bias,
                                        out);
    case GemmBackend::kOneDNN:
      TS_CHECK_VALUE(cpu::onednn_usable(), "linear_int8: backend 'onednn' is not available (this build has "
                                           "no oneDNN, or the process forked after it started)");
      TS_CHECK_VALUE(cpu::linear_int8_onednn(qx, act_scales, act_zero_point, qweight, w_scales,
                                             bias, out, packed),
                     "linear_int8: oneDNN has no exact implementation for this shape on this "
                     "CPU (without VNNI its int16 pair sums saturate); use backend 'auto' or "
                     "'native'");
      return;
    case GemmBackend::kNative:
      if (panels && our_panels(layout, qx, act_scales, act_zero_point, qweight, w_scales, bias, out, panels))
        return;
      if (M < cpu::kInt8PanelMinRows &&
          vnni_kernels(qx, act_scales, act_zero_point, qweight, w_scales, bias, out))
        return;
      TS_CHECK_VALUE(cpu::linear_int8_avx2(qx, act_scales, act_zero_point, qweight, w_scales,
                                           bias, out),
                     "linear_int8: no native kernel for this ISA (needs AVX2)");
      return;
    case GemmBackend::kAuto:
      if (panels && our_panels(layout, qx, act_scales, act_zero_point, qweight, w_scales, bias, out, panels))
        return;
      if (M < cpu::kInt8VnniPanelMaxRows &&
          vnni_kernels(qx, act_scales, act_zero_point, qweight, w_scales, bias, out))
        return;
      if (cpu::linear_int8_onednn(qx, act_scales, act_zero_point, qweight, w_scales, bias, out,
                                  packed))
        return;
      if (cpu::linear_int8_avx2(qx, act_scales, act_zero_point, qweight, w_scales, bias, out))
        return;
      return cpu::linear_int8_reference(qx, act_scales, act_zero_point, qweight, w_scales, bias,
                                        out);
  }
}

}  // namespace tensorslim
