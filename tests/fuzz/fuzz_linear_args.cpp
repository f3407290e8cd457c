// libFuzzer target: the linear kernels' argument checks. Shapes, strides, dtypes, formats,
// group sizes, backends and which optional tensors are present all come from the input, and
// every buffer is exactly as large as its view addresses. INT8 and W4A8 also get a packed copy:
// none, linear_int8_pack's / linear_w4a8_pack's (sometimes with a byte changed), or bytes from
// the input. A kernel may refuse with a
// ValueError or TypeError; anything else (a crash, an ASan report, another exception) is a
// finding.
#include <cstdint>

#include "fuzz_input.h"
#include "tensorslim/gemm.h"
#include "tensorslim/gemm_int8.h"
#include "tensorslim/gemm_w4a8.h"
#include "tensorslim/lowbit.h"
#include "tensorslim/status.h"

using namespace tensorslim;

namespace {

DType pick_dtype(fuzz::Input& in) {
  static const DType all[] = {DType::kFloat32, DType::kFloat16, DType::kBFloat16,
                              DType::kInt8,    DType::kUInt8,   DType::kInt32};
  return all[in.range(0, 5)];
}

// Mostly the expected shape, sometimes off by a little, so the checks see near misses.
int64_t near(fuzz::Input& in, int64_t want) {
  return in.range(0, 3) == 0 ? std::max<int64_t>(0, want + in.range(-2, 2)) : want;
}

fuzz::Owned matrix(fuzz::Input& in, DType dt, int64_t r, int64_t c) {
  const int64_t shape[2] = {near(in, r), near(in, c)};
  return fuzz::make_view(in, in.range(0, 7) == 0 ? pick_dtype(in) : dt, in.range(0, 9) ? 2 : 1,
                         shape, in.range(0, 7) == 0);
}

fuzz::Owned vector(fuzz::Input& in, DType dt, int64_t n) {
  const int64_t shape[1] = {near(in, n)};
  return fuzz::make_view(in, in.range(0, 7) == 0 ? pick_dtype(in) : dt, 1, shape, false);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  fuzz::Input in(data, size);
  const int64_t M = in.range(0, 9), K = in.range(0, 80), N = in.range(0, 20);
  const GemmBackend backend = static_cast<GemmBackend>(in.range(0, 3));
  const int kernel = static_cast<int>(in.range(0, 3));
  const FormatInfo& info = format_table()[kernel == 3 ? in.range(2, 4)  // int4, uint4, one it refuses
                                                      : in.range(0, kernel == 0 ? kNumFormats - 1 : kNumFormatRows - 1)];
  const int64_t group = in.range(0, 2) == 0 ? K : in.range(-1, 64);
  const int64_t groups = group > 0 && K % group == 0 ? K / group : 1;
  fuzz::Owned x = matrix(in, kernel == 1 ? (in.byte() & 1 ? DType::kUInt8 : DType::kInt8) : DType::kFloat32, M, K);
  fuzz::Owned w = matrix(in, kernel == 1 ? DType::kInt8 : (info.format == Format::kInt8 ? DType::kInt8 : DType::kUInt8),
                         N, kernel == 1 ? K : packed_row_bytes(info, K));
  fuzz::Owned s = kernel == 1 ? vector(in, DType::kFloat32, N)
                              : matrix(in, info.scale_format == ScaleFormat::kFloat32 ? DType::kFloat32 : DType::kUInt8, N, groups);
  fuzz::Owned z = matrix(in, DType::kUInt8, N, groups);
  fuzz::Owned b = vector(in, DType::kFloat32, N);
  fuzz::Owned a = vector(in, DType::kFloat32, in.byte() & 1 ? M : 1);
  fuzz::Owned t = vector(in, DType::kFloat32, 1);
  fuzz::Owned out = matrix(in, DType::kFloat32, M, N);
  fuzz::Owned ws = matrix(in, DType::kFloat32, in.range(1, 4), K);
  const TensorView* zp = in.byte() & 1 ? &z.view : nullptr;
  const TensorView* bias = in.byte() & 1 ? &b.view : nullptr;
  const TensorView* tscale = in.byte() & 1 ? &t.view : nullptr;
  const TensorView* work = in.byte() & 1 ? &ws.view : nullptr;
  try {
    switch (kernel) {
      case 0:
        linear_weight_only(x.view, w.view, s.view, zp, bias, info.format, group, out.view, backend);
        break;
      case 1: {
        fuzz::Owned packed;
        const int64_t how = in.range(0, 2);
        if (how == 1) {  // the real copy (VNNI / AVX2 panels or oneDNN's); it throws where there is none
          const int64_t shape[1] = {linear_int8_packed_bytes(K, N)};
          packed = fuzz::make_view(in, DType::kUInt8, 1, shape, false);
          linear_int8_pack(w.view, packed.view);
          if (shape[0] > 0 && in.byte() & 1) packed.buf[in.range(0, shape[0] - 1)] ^= in.byte() | 1;
        } else if (how == 2) {
          const int64_t shape[1] = {in.range(0, 1024)};
          packed = fuzz::make_view(in, DType::kUInt8, 1, shape, false);
        }
        linear_int8(x.view, a.view, static_cast<int32_t>(in.range(-2, 260)), w.view, s.view, bias,
                    out.view, backend, how ? &packed.view : nullptr);
        break;
      }
      case 2:
        linear_lowbit(x.view, w.view, s.view, zp, tscale, bias, info.format, group, out.view, work,
                      backend);
        break;
      default: {
        fuzz::Owned packed;
        const int64_t how = in.range(0, 2);
        if (how == 1) {  // the real copy; it throws where these weights do not make one
          const int64_t shape[1] = {linear_w4a8_packed_bytes(N, K, group, info.format)};
          packed = fuzz::make_view(in, DType::kUInt8, 1, shape, false);
          linear_w4a8_pack(w.view, s.view, zp, info.format, K, group, packed.view);
          if (shape[0] > 0 && in.byte() & 1) packed.buf[in.range(0, shape[0] - 1)] ^= in.byte() | 1;
        } else if (how == 2) {
          const int64_t shape[1] = {in.range(0, 1024)};
          packed = fuzz::make_view(in, DType::kUInt8, 1, shape, false);
        }
        linear_w4a8(x.view, w.view, s.view, zp, bias, info.format, group, out.view, backend,
                    how ? &packed.view : nullptr);
      }
    }
  } catch (const ValueError&) {
  } catch (const TypeError&) {
  }
  return 0;
}
