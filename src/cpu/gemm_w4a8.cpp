// linear_w4a8 on the CPU: argument checks, per-token activation quantization (the W8A8
// quantizer, reused as is), the choice of kernel, and the scalar reference that the AVX-512
// and AVX2 kernels (gemm_w4a8_avx512.cpp, gemm_w4a8_avx2.cpp) match bit for bit.
// Specification: gemm_w4a8.h.
#include "tensorslim/gemm_w4a8.h"

#include <algorithm>
#include <string>
#include <vector>

#include "half.h"
#include "parallel.h"
#include "tensorslim/gemm_int8.h"
#include "tensorslim/lowbit.h"
#include "tensorslim/quantize.h"

namespace tensorslim {
namespace {

int64_t check_w4a8_args(const TensorView& x, const TensorView& qweight, const TensorView& scales,
                        const TensorView* zero_points, const TensorView* bias, Format fmt,
                        int64_t group_size, const TensorView& out) {
  for (const TensorView* t : {&x, &qweight, &scales, &out})
    TS_CHECK_VALUE(t->device == DeviceType::kCPU, "linear_w4a8: tensors are not on the CPU");
  TS_CHECK_VALUE(fmt == Format::kInt4 || fmt == Format::kUInt4,
                 std::string("linear_w4a8: weights must be int4 or uint4, got ") +
                     format_info(fmt).name);
  check_ndim(x, 2, "x");
  check_ndim(qweight, 2, "qweight");
  TS_CHECK_TYPE(x.dtype == DType::kFloat32 || x.dtype == DType::kBFloat16,
                std::string("x: expected float32 or bfloat16 activations, got ") +
                    dtype_name(x.dtype));
  const int64_t M = x.shape[0], K = x.shape[1], N = qweight.shape[0];
  TS_CHECK_VALUE(x.strides[1] == 1 || K <= 1, "x: rows must be contiguous");
  TS_CHECK_VALUE(K <= kW4A8MaxK, "linear_w4a8: K = " + std::to_string(K) + " exceeds " +
                                     std::to_string(kW4A8MaxK) +
                                     " (the int32 group dot products could overflow)");
  TS_CHECK_VALUE(group_size != -1, "linear_w4a8: per-tensor weight scales are not supported");
  // The weight is a [N, K] matrix quantized row by row: reuse the low-bit table's checks (its
  // int4 / uint4 rows are these codes; ceil(K / group) groups, the last one may be short).
  const TensorView w = weight_stand_in(x, N, K);
  const int64_t groups =
      check_lowbit_args(w, fmt, group_size, qweight, scales, zero_points, nullptr);
  if (zero_points) {  // uint4 codes are 0..15; a larger zero point is not this format
    const uint8_t* z = zero_points->ptr<uint8_t>();
    uint8_t all = 0;
    for (int64_t i = 0; i < zero_points->numel(); ++i) all |= z[i];
    TS_CHECK_VALUE(all <= 15, "zero_points: uint4 zero points must be in 0..15");
  }
  check_linear_out(out, x.dtype, M, N, bias);
  return groups;
}

// quantize_per_token takes contiguous fp32: widen bf16 / copy strided rows into `buf`.
TensorView as_contiguous_f32(const TensorView& x, std::vector<float>& buf) {
  if (x.dtype == DType::kFloat32 && x.is_contiguous()) return x;
  const int64_t M = x.shape[0], K = x.shape[1];
  buf.resize(M * K);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) {
      const int64_t off = m * x.strides[0] + k;
      buf[m * K + k] = x.dtype == DType::kFloat32 ? x.ptr<float>()[off]
                                                  : cpu::bf16_to_float(x.ptr<uint16_t>()[off]);
    }
  TensorView v = x;
  v.data = buf.data();
  v.dtype = DType::kFloat32;
  v.strides[0] = K;
  v.strides[1] = 1;
  return v;
}

TensorView host_view(void* data, DType dt, int64_t rows, int64_t cols) {
  TensorView v;
  v.data = data;
  v.dtype = dt;
  v.ndim = cols < 0 ? 1 : 2;
  v.shape[0] = rows;
  v.strides[0] = cols < 0 ? 1 : cols;
  if (cols >= 0) {
    v.shape[1] = cols;
    v.strides[1] = 1;
  }
  return v;
}

}  // namespace

namespace cpu {

void linear_w4a8_reference(const W4A8Args& a) {
  const int64_t groups = lowbit_groups(a.K, a.group);  // K = 0: one empty group
  const int64_t lds = groups;
  parallel_for(a.N, 1, [&](int64_t b, int64_t e) {
    std::vector<int32_t> w(a.K);
    for (int64_t n = b; n < e; ++n) {
      const uint8_t* row = a.qweight + n * a.ldw;
      for (int64_t k = 0; k < a.K; ++k) {
        const int32_t nib = (row[k / 2] >> ((k & 1) * 4)) & 0xF;
        w[k] = a.zero_points ? nib : (nib ^ 8) - 8;  // uint4 code, or int4 sign-extended
      }
      for (int64_t m = 0; m < a.M; ++m) {
        const int8_t* q = a.qx + m * a.K;
        float acc = 0.0f;
        for (int64_t g = 0; g < groups; ++g) {
          const int32_t o = a.zero_points ? a.zero_points[n * lds + g] : 0;
          int32_t d = 0;
          for (int64_t k = g * a.group; k < std::min(a.K, (g + 1) * a.group); ++k)
            d += (w[k] - o) * static_cast<int32_t>(q[k]);
          acc = acc + static_cast<float>(d) * a.scales[n * lds + g];
        }
        float y = acc * a.act_scales[m];
        if (a.bias) y = y + a.bias[n];
        if (a.out_bf16)
          static_cast<uint16_t*>(a.out)[m * a.ldo + n] = float_to_bf16(y);
        else
          static_cast<float*>(a.out)[m * a.ldo + n] = y;
      }
    }
  });
}

bool linear_w4a8_native_fits(int64_t K, int64_t group) {
#if defined(TENSORSLIM_HAVE_AVX512) && defined(TENSORSLIM_HAVE_AVX2)
  return active_isa() >= Isa::kAVX2 && K > 0 && (group == K || (group > 0 && group % 8 == 0));
#else
  (void)K, (void)group;
  return false;
#endif
}

}  // namespace cpu

const char* linear_w4a8_kernel(int64_t K, int64_t group_size) {
  if (!cpu::linear_w4a8_native_fits(K, group_size)) return "reference";
#if defined(TENSORSLIM_HAVE_AVX512) && defined(TENSORSLIM_HAVE_AVX2)
  if (cpu::active_isa() == cpu::Isa::kAVX2) return cpu::avx2_vnni() == cpu::AvxVnni::kNone ? "avx2" : "avx2_vnni";
  return cpu::w4a8_uses_vnni() ? "avx512_vnni" : "avx512bw";
#else
  return "reference";
#endif
}

void linear_w4a8(const TensorView& x, const TensorView& qweight, const TensorView& scales,
                 const TensorView* zero_points, const TensorView* bias, Format fmt,
                 int64_t group_size, const TensorView& out, GemmBackend backend,
                 const TensorView* packed) {
  TS_CHECK_VALUE(backend == GemmBackend::kAuto || backend == GemmBackend::kReference ||
                     backend == GemmBackend::kNative,
                 "linear_w4a8: backend must be auto, reference (scalar) or native; oneDNN has no "
                 "W4A8 kernel");
  check_w4a8_args(x, qweight, scales, zero_points, bias, fmt, group_size, out);
  const int64_t M = x.shape[0], K = x.shape[1], N = qweight.shape[0];
  const bool native = backend != GemmBackend::kReference && K > 0 &&
                      cpu::linear_w4a8_native_fits(K, group_size);
  TS_CHECK_VALUE(backend != GemmBackend::kNative || native,
                 "linear_w4a8: no native kernel for K=" + std::to_string(K) + ", group " +
                     std::to_string(group_size) +
                     " (needs AVX2 or AVX-512 and a group size that is a multiple of 8, or per "
                     "channel)");
  const uint8_t* packed_bytes =
      packed ? cpu::checked_w4a8_packed(*packed, N, K, group_size, zero_points != nullptr) : nullptr;
  if (M == 0 || N == 0) return;

  // Activations: the same per-token s8 codes and scales as Int8Dynamic.
  thread_local std::vector<float> xbuf, act_scales;
  thread_local std::vector<int8_t> codes;
  const TensorView xf = as_contiguous_f32(x, xbuf);
  codes.resize(M * K);
  act_scales.resize(M);
  quantize_per_token(xf, nullptr, host_view(codes.data(), DType::kInt8, M, K),
                     host_view(act_scales.data(), DType::kFloat32, M, -1),
                     native ? GemmBackend::kAuto : GemmBackend::kReference);

  cpu::W4A8Args a;
  a.qx = codes.data();
  a.act_scales = act_scales.data();
  a.qweight = qweight.ptr<uint8_t>();
  a.ldw = qweight.strides[0];
  a.scales = scales.ptr<float>();
  a.zero_points = zero_points ? zero_points->ptr<uint8_t>() : nullptr;
  a.bias = bias ? bias->ptr<float>() : nullptr;
  a.M = M;
  a.N = N;
  a.K = K;
  a.group = group_size;
  a.out = out.data;
  a.ldo = out.strides[0];
  a.out_bf16 = out.dtype == DType::kBFloat16;
#if defined(TENSORSLIM_HAVE_AVX512) && defined(TENSORSLIM_HAVE_AVX2)
  if (native && packed_bytes) {
    if (cpu::active_isa() == cpu::Isa::kAVX512 && cpu::linear_w4a8_packed_avx512(a, packed_bytes)) return;
    if (cpu::linear_w4a8_packed_avx2(a, packed_bytes)) return;
  }
  if (native && M <= cpu::kW4A8GemvMaxM) {
    if (cpu::active_isa() == cpu::Isa::kAVX512 && cpu::linear_w4a8_gemv_avx512(a)) return;
    if (cpu::linear_w4a8_gemv_avx2(a)) return;
  }
  if (native && cpu::active_isa() == cpu::Isa::kAVX512 && cpu::linear_w4a8_avx512(a)) return;
  if (native && cpu::linear_w4a8_avx2(a)) return;
#endif
  cpu::linear_w4a8_reference(a);
}

}  // namespace tensorslim
