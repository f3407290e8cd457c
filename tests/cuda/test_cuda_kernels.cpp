// The CUDA kernels (kernels/*.cu) against the CPU reference, needing nothing but the
// CUDA toolkit and GoogleTest (no torch):
//   quantize / dequantize: bit for bit equal to tensorslim::quantize / dequantize on the
//     scalar path (codes, scales, zero points, dequantized values, untouched padding);
//   linear_weight_only: against a float64 product of the CPU-dequantized weight, within
//     the fp32-accumulation bound explained at linear_tolerance();
//   bad arguments: ValueError / TypeError, never a crash.
// Every test skips when no CUDA device is visible (cuda::device_count() == 0).
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "half.h"
#include "parallel.h"
#include "tensorslim/cuda.h"
#include "tensorslim/quantize.h"
#include "tensorslim/status.h"
#include "test_helpers.h"

namespace tensorslim {
namespace {

using testing::random_weights;
using testing::view2;

#define SKIP_WITHOUT_GPU() \
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device"

// ---------------------------------------------------------------- device memory

void cuda_ok(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw RuntimeError(std::string(what) + ": " + cudaGetErrorString(err));
}

// One cudaMalloc'd buffer, freed with its owner.
class DeviceBuffer {
 public:
  explicit DeviceBuffer(size_t bytes) : bytes_(bytes) {
    if (bytes_) cuda_ok(cudaMalloc(&ptr_, bytes_), "cudaMalloc");
  }
  explicit DeviceBuffer(const std::vector<uint8_t>& host) : DeviceBuffer(host.size()) {
    if (bytes_) cuda_ok(cudaMemcpy(ptr_, host.data(), bytes_, cudaMemcpyHostToDevice), "upload");
  }
  ~DeviceBuffer() {
    if (ptr_) cudaFree(ptr_);
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  void* get() const { return ptr_; }
  std::vector<uint8_t> download() const {
    std::vector<uint8_t> host(bytes_);
    cuda_ok(cudaDeviceSynchronize(), "kernel");
    if (bytes_) cuda_ok(cudaMemcpy(host.data(), ptr_, bytes_, cudaMemcpyDeviceToHost), "download");
    return host;
  }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

TensorView on_gpu(TensorView v, const DeviceBuffer& buf) {
  v.data = buf.get();
  v.device = DeviceType::kCUDA;
  v.device_index = 0;
  return v;
}

// ---------------------------------------------------------------- host data

const DType kFloatTypes[] = {DType::kFloat32, DType::kFloat16, DType::kBFloat16};
const Format kIntFormats[] = {Format::kInt8, Format::kUInt8, Format::kInt4, Format::kUInt4};

void store_float(DType dt, float v, uint8_t* p) {
  if (dt == DType::kFloat32) {
    std::memcpy(p, &v, 4);
    return;
  }
  const uint16_t h = dt == DType::kFloat16 ? cpu::float_to_f16(v) : cpu::float_to_bf16(v);
  std::memcpy(p, &h, 2);
}

double load_float(DType dt, const uint8_t* p) {
  if (dt == DType::kFloat32) {
    float v;
    std::memcpy(&v, p, 4);
    return v;
  }
  uint16_t h;
  std::memcpy(&h, p, 2);
  return dt == DType::kFloat16 ? cpu::f16_to_float(h) : cpu::bf16_to_float(h);
}

// The float `v` as the 16-bit dtype `dt` would hold it (fp32 is left as it is).
double round_to(DType dt, float v) {
  uint8_t b[4];
  store_float(dt, v, b);
  return load_float(dt, b);
}

// A [rows, cols] float matrix in `dt` with row stride s0 and column stride s1 (in
// elements). Elements outside the view are NaN: a kernel that reads them trips the
// NaN check or poisons a result.
struct HostMatrix {
  std::vector<uint8_t> bytes;
  TensorView view;  // over `bytes`
};

HostMatrix make_matrix(DType dt, int64_t rows, int64_t cols, int64_t s0, int64_t s1,
                       uint32_t seed) {
  const int es = dtype_size(dt);
  const int64_t elems = rows == 0 || cols == 0 ? 1 : (rows - 1) * s0 + (cols - 1) * s1 + 1;
  HostMatrix m;
  m.bytes.resize(static_cast<size_t>(elems * es));
  for (int64_t i = 0; i < elems; ++i)
    store_float(dt, std::numeric_limits<float>::quiet_NaN(), m.bytes.data() + i * es);
  const std::vector<float> v = random_weights(rows * cols, seed);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c)
      store_float(dt, v[r * cols + c], m.bytes.data() + (r * s0 + c * s1) * es);
  m.view = view2(m.bytes.data(), dt, rows, cols, s0, s1);
  return m;
}

// Index of the first differing byte, -1 if equal.
int64_t first_difference(const std::vector<uint8_t>& a, const std::vector<uint8_t>& b) {
  if (a.size() != b.size()) return 0;
  for (size_t i = 0; i < a.size(); ++i)
    if (a[i] != b[i]) return static_cast<int64_t>(i);
  return -1;
}

#define EXPECT_SAME_BYTES(got, want, what)                                              \
  do {                                                                                  \
    const std::vector<uint8_t> got_ = (got);                                            \
    const std::vector<uint8_t>& want_ = (want);                                         \
    const int64_t at_ = first_difference(got_, want_);                                 \
    EXPECT_EQ(at_, -1) << what << ": first difference at byte " << at_ << " (got "      \
                       << (at_ >= 0 && at_ < (int64_t)got_.size() ? int(got_[at_]) : -1) \
                       << ", want "                                                     \
                       << (at_ >= 0 && at_ < (int64_t)want_.size() ? int(want_[at_]) : -1) \
                       << ", sizes " << got_.size() << " / " << want_.size() << ")";    \
  } while (0)

// ---------------------------------------------------------------- quantize / dequantize

// Memory layouts of x (and of q / out rows): plain, padded rows that keep 16-byte
// alignment, padded rows that break it, and a column stride of 2 (x only).
enum class Layout { kContiguous, kPaddedAligned, kPaddedOdd, kColStride2 };
const Layout kLayouts[] = {Layout::kContiguous, Layout::kPaddedAligned, Layout::kPaddedOdd,
                           Layout::kColStride2};

const char* layout_name(Layout l) {
  switch (l) {
    case Layout::kContiguous: return "contiguous";
    case Layout::kPaddedAligned: return "padded-aligned";
    case Layout::kPaddedOdd: return "padded-odd";
    case Layout::kColStride2: return "col-stride-2";
  }
  return "?";
}

// Row stride for `cols` values of `es` bytes in layout `l`.
int64_t row_stride(Layout l, int64_t cols, int es) {
  switch (l) {
    case Layout::kContiguous: return cols;
    case Layout::kPaddedAligned: return (cols + 32) / (16 / es) * (16 / es) + 16 / es;
    case Layout::kPaddedOdd: return cols + 3;
    case Layout::kColStride2: return 2 * cols + 1;
  }
  return cols;
}

struct QuantCase {
  int64_t rows, cols;
};
// Rows and columns that are multiples of no tile, packet or warp size, odd columns,
// an exact warp multiple and empty tensors.
const QuantCase kQuantShapes[] = {{7, 250}, {7, 251}, {33, 4096}, {129, 384}, {1, 1},
                                  {5, 33},  {64, 256}, {3, 0},     {0, 64}};

// Group sizes to try for `cols`: per tensor (-1), per row (cols), 32, 128 where they apply.
std::vector<int64_t> group_sizes(int64_t cols) {
  std::vector<int64_t> out = {-1, cols};
  for (int64_t g : {32, 128})
    if (cols > 0 && cols % g == 0 && g != cols) out.push_back(g);
  return out;
}

struct Quantized {  // CPU-side codes, scales and zero points with their views
  std::vector<uint8_t> q, scales, zps;
  TensorView qv, sv, zv;
  bool has_zp;
};

Quantized empty_quantized(const FormatInfo& info, int64_t rows, int64_t cols, int64_t group,
                          int64_t q_stride) {
  Quantized r;
  const int64_t groups = group == -1 ? 1 : (group == cols ? 1 : cols / group);
  const int64_t srows = group == -1 ? 1 : rows;
  const int64_t nb = packed_row_bytes(info, cols);
  r.q.assign(static_cast<size_t>(std::max<int64_t>(rows * q_stride, 1)), 0xA5);
  r.scales.assign(static_cast<size_t>(std::max<int64_t>(srows * groups * 4, 4)), 0xA5);
  r.zps.assign(static_cast<size_t>(std::max<int64_t>(srows * groups, 1)), 0xA5);
  r.has_zp = info.has_zero_point;
  const DType code_dt = info.bits == 8 && !info.has_zero_point ? DType::kInt8 : DType::kUInt8;
  r.qv = view2(r.q.data(), code_dt, rows, nb, q_stride);
  r.sv = view2(r.scales.data(), DType::kFloat32, srows, groups);
  r.zv = view2(r.zps.data(), DType::kUInt8, srows, groups);
  return r;
}

// quantize on the GPU == quantize on the CPU (scalar), then dequantize on the GPU ==
// dequantize on the CPU for every output dtype, all bit for bit, padding untouched.
void check_quantize_case(Format fmt, DType dt, const QuantCase& sh, int64_t group, Layout layout,
                         uint32_t seed) {
  const FormatInfo& info = format_info(fmt);
  const int es = dtype_size(dt);
  const int64_t s1 = layout == Layout::kColStride2 ? 2 : 1;
  HostMatrix x = make_matrix(dt, sh.rows, sh.cols, row_stride(layout, sh.cols, es), s1, seed);
  const int64_t nb = packed_row_bytes(info, sh.cols);
  const Layout q_layout = layout == Layout::kColStride2 ? Layout::kContiguous : layout;
  const int64_t q_stride = row_stride(q_layout, nb, 1);

  Quantized want = empty_quantized(info, sh.rows, sh.cols, group, q_stride);
  cpu::set_isa(cpu::Isa::kScalar);
  quantize(x.view, fmt, group, want.qv, want.sv, want.has_zp ? &want.zv : nullptr);

  Quantized got = empty_quantized(info, sh.rows, sh.cols, group, q_stride);
  DeviceBuffer dx(x.bytes), dq(got.q), ds(got.scales), dz(got.zps);
  TensorView gz = on_gpu(got.zv, dz);
  cuda::quantize(on_gpu(x.view, dx), fmt, group, on_gpu(got.qv, dq), on_gpu(got.sv, ds),
                 got.has_zp ? &gz : nullptr);
  EXPECT_SAME_BYTES(dq.download(), want.q, "codes");
  EXPECT_SAME_BYTES(ds.download(), want.scales, "scales");
  EXPECT_SAME_BYTES(dz.download(), want.zps, "zero points");

  // Dequantize the reference codes into every float dtype, with padded output rows
  // in the padded layouts.
  for (DType odt : kFloatTypes) {
    SCOPED_TRACE(std::string("dequantize to ") + dtype_name(odt));
    const int oes = dtype_size(odt);
    const int64_t os0 = row_stride(q_layout, sh.cols, oes);
    std::vector<uint8_t> out(static_cast<size_t>(std::max<int64_t>(sh.rows * os0 * oes, 1)), 0x5A);
    std::vector<uint8_t> want_out = out;
    dequantize(want.qv, want.sv, want.has_zp ? &want.zv : nullptr, fmt, group,
               view2(want_out.data(), odt, sh.rows, sh.cols, os0));
    DeviceBuffer dq2(want.q), ds2(want.scales), dz2(want.zps), dout(out);
    TensorView gz2 = on_gpu(want.zv, dz2);
    cuda::dequantize(on_gpu(want.qv, dq2), on_gpu(want.sv, ds2), want.has_zp ? &gz2 : nullptr,
                     fmt, group, on_gpu(view2(nullptr, odt, sh.rows, sh.cols, os0), dout));
    EXPECT_SAME_BYTES(dout.download(), want_out, "dequantized");
  }
}

class CudaQuantize : public ::testing::TestWithParam<std::tuple<Format, DType>> {};

TEST_P(CudaQuantize, MatchesScalarCpuBitForBit) {
  SKIP_WITHOUT_GPU();
  const Format fmt = std::get<0>(GetParam());
  const DType dt = std::get<1>(GetParam());
  uint32_t seed = 1;
  for (const QuantCase& sh : kQuantShapes)
    for (int64_t group : group_sizes(sh.cols))
      for (Layout layout : kLayouts) {
        SCOPED_TRACE(std::to_string(sh.rows) + "x" + std::to_string(sh.cols) + " group " +
                     std::to_string(group) + " " + layout_name(layout));
        check_quantize_case(fmt, dt, sh, group, layout, seed++);
      }
}

std::string param_name(const ::testing::TestParamInfo<std::tuple<Format, DType>>& p) {
  return std::string(format_info(std::get<0>(p.param)).name) + "_" +
         dtype_name(std::get<1>(p.param));
}

INSTANTIATE_TEST_SUITE_P(AllIntFormats, CudaQuantize,
                         ::testing::Combine(::testing::ValuesIn(kIntFormats),
                                            ::testing::ValuesIn(kFloatTypes)),
                         param_name);

// Values that clamp, tie, sit on group borders: a constant group (scale from one
// value), an all-zero group (scale 1), tiny values, exact halves of the scale.
TEST(CudaQuantizeEdges, SpecialValuesMatchCpu) {
  SKIP_WITHOUT_GPU();
  const int64_t rows = 4, cols = 128;
  for (Format fmt : kIntFormats)
    for (DType dt : kFloatTypes)
      for (int64_t group : {int64_t{-1}, cols, int64_t{32}}) {
        SCOPED_TRACE(std::string(format_info(fmt).name) + " " + dtype_name(dt) + " group " +
                     std::to_string(group));
        HostMatrix x = make_matrix(dt, rows, cols, cols, 1, 7);
        const int es = dtype_size(dt);
        for (int64_t c = 0; c < cols; ++c) {
          store_float(dt, 0.0f, x.bytes.data() + (0 * cols + c) * es);            // all zero
          store_float(dt, 3.0f, x.bytes.data() + (1 * cols + c) * es);            // constant
          store_float(dt, (c % 2 ? -1 : 1) * 1e-30f, x.bytes.data() + (2 * cols + c) * es);
          store_float(dt, static_cast<float>(c % 17) - 8.5f, x.bytes.data() + (3 * cols + c) * es);
        }
        const FormatInfo& info = format_info(fmt);
        const int64_t nb = packed_row_bytes(info, cols);
        Quantized want = empty_quantized(info, rows, cols, group, nb);
        cpu::set_isa(cpu::Isa::kScalar);
        quantize(x.view, fmt, group, want.qv, want.sv, want.has_zp ? &want.zv : nullptr);
        Quantized got = empty_quantized(info, rows, cols, group, nb);
        DeviceBuffer dx(x.bytes), dq(got.q), ds(got.scales), dz(got.zps);
        TensorView gz = on_gpu(got.zv, dz);
        cuda::quantize(on_gpu(x.view, dx), fmt, group, on_gpu(got.qv, dq), on_gpu(got.sv, ds),
                       got.has_zp ? &gz : nullptr);
        EXPECT_SAME_BYTES(dq.download(), want.q, "codes");
        EXPECT_SAME_BYTES(ds.download(), want.scales, "scales");
        EXPECT_SAME_BYTES(dz.download(), want.zps, "zero points");
      }
}

// ---------------------------------------------------------------- errors

TEST(CudaQuantizeErrors, NonFiniteInputIsValueErrorNamingTheRow) {
  SKIP_WITHOUT_GPU();
  const int64_t rows = 9, cols = 256;
  for (DType dt : kFloatTypes)
    for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()})
      for (int64_t group : {int64_t{-1}, cols, int64_t{32}}) {
        SCOPED_TRACE(std::string(dtype_name(dt)) + " group " + std::to_string(group) +
                     (std::isnan(bad) ? " NaN" : " Inf"));
        HostMatrix x = make_matrix(dt, rows, cols, cols, 1, 3);
        store_float(dt, bad, x.bytes.data() + (5 * cols + 17) * dtype_size(dt));
        store_float(dt, bad, x.bytes.data() + (7 * cols + 200) * dtype_size(dt));
        const FormatInfo& info = format_info(Format::kUInt4);
        Quantized got = empty_quantized(info, rows, cols, group, packed_row_bytes(info, cols));
        DeviceBuffer dx(x.bytes), dq(got.q), ds(got.scales), dz(got.zps);
        TensorView gz = on_gpu(got.zv, dz);
        try {
          cuda::quantize(on_gpu(x.view, dx), Format::kUInt4, group, on_gpu(got.qv, dq),
                         on_gpu(got.sv, ds), &gz);
          ADD_FAILURE() << "no error for a non-finite input";
        } catch (const ValueError& e) {
          EXPECT_NE(std::string(e.what()).find("row 5"), std::string::npos) << e.what();
        }
        // The device flag is reset per call: finite data quantizes again.
        HostMatrix ok = make_matrix(dt, rows, cols, cols, 1, 4);
        DeviceBuffer dok(ok.bytes);
        EXPECT_NO_THROW(cuda::quantize(on_gpu(ok.view, dok), Format::kUInt4, group,
                                       on_gpu(got.qv, dq), on_gpu(got.sv, ds), &gz));
      }
}

TEST(CudaQuantizeErrors, WrongDeviceDtypeOrShape) {
  SKIP_WITHOUT_GPU();
  const int64_t rows = 4, cols = 64;
  HostMatrix x = make_matrix(DType::kFloat32, rows, cols, cols, 1, 5);
  const FormatInfo& info = format_info(Format::kUInt4);
  Quantized h = empty_quantized(info, rows, cols, 32, packed_row_bytes(info, cols));
  DeviceBuffer dx(x.bytes), dq(h.q), ds(h.scales), dz(h.zps);
  const TensorView gx = on_gpu(x.view, dx), gq = on_gpu(h.qv, dq), gs = on_gpu(h.sv, ds);
  const TensorView gz = on_gpu(h.zv, dz);

  // x on the CPU, scales on another device: ValueError naming the tensor.
  try {
    cuda::quantize(x.view, Format::kUInt4, 32, gq, gs, &gz);
    ADD_FAILURE() << "CPU x accepted";
  } catch (const ValueError& e) {
    EXPECT_NE(std::string(e.what()).find("x is not a CUDA tensor"), std::string::npos) << e.what();
  }
  TensorView other = gs;
  other.device_index = 1;
  EXPECT_THROW(cuda::quantize(gx, Format::kUInt4, 32, gq, other, &gz), ValueError);
  // Integer x, wrong code dtype: TypeError.
  TensorView xi = gx;
  xi.dtype = DType::kInt32;
  EXPECT_THROW(cuda::quantize(xi, Format::kUInt4, 32, gq, gs, &gz), TypeError);
  TensorView qi = gq;
  qi.dtype = DType::kInt8;
  EXPECT_THROW(cuda::quantize(gx, Format::kUInt4, 32, qi, gs, &gz), TypeError);
  // Missing zero points, a group that does not divide the row, an odd 4-bit group.
  EXPECT_THROW(cuda::quantize(gx, Format::kUInt4, 32, gq, gs, nullptr), ValueError);
  EXPECT_THROW(cuda::quantize(gx, Format::kUInt4, 48, gq, gs, &gz), ValueError);
  try {
    cuda::quantize(gx, Format::kUInt4, 1, gq, gs, &gz);
    ADD_FAILURE() << "odd 4-bit group accepted";
  } catch (const ValueError& e) {
    EXPECT_NE(std::string(e.what()).find("even"), std::string::npos) << e.what();
  }
  // dequantize: CPU output, integer output, non-contiguous output rows.
  TensorView out = gx;
  out.device = DeviceType::kCPU;
  EXPECT_THROW(cuda::dequantize(gq, gs, &gz, Format::kUInt4, 32, out), ValueError);
  out = gx;
  out.dtype = DType::kInt8;
  EXPECT_THROW(cuda::dequantize(gq, gs, &gz, Format::kUInt4, 32, out), TypeError);
  out = gx;
  out.strides[1] = 2;
  EXPECT_THROW(cuda::dequantize(gq, gs, &gz, Format::kUInt4, 32, out), ValueError);
}

// ---------------------------------------------------------------- linear_weight_only

// A quantized [N, K] weight (CPU reference codes) and its dequantized fp32 values.
struct Weight {
  Quantized qw;
  std::vector<float> deq;  // [N, K]
};

Weight make_weight(Format fmt, int64_t N, int64_t K, int64_t group, uint32_t seed) {
  const FormatInfo& info = format_info(fmt);
  HostMatrix w = make_matrix(DType::kFloat32, N, K, K, 1, seed);
  Weight r;
  r.qw = empty_quantized(info, N, K, group, packed_row_bytes(info, K));
  cpu::set_isa(cpu::Isa::kScalar);
  quantize(w.view, fmt, group, r.qw.qv, r.qw.sv, r.qw.has_zp ? &r.qw.zv : nullptr);
  r.deq.resize(static_cast<size_t>(N * K));
  dequantize(r.qw.qv, r.qw.sv, r.qw.has_zp ? &r.qw.zv : nullptr, fmt, group,
             view2(r.deq.data(), DType::kFloat32, N, K));
  return r;
}

// Tolerance of one output. The GPU accumulates in fp32 (unit roundoff u = 2^-24) in
// a tree: 32-value chunks, then per-lane chunk sums, then a 5-step warp reduction (the
// tiled kernel and cuBLAS accumulate along K). For zero-mean data the partial sums
// stay far below S = sum|x||w|, so the accumulated error stays under 1e-5 * S at these
// K (the worst case for the chunked fused kernel is about 45u * S = 2.7e-6 S), while a
// dropped or doubled product (about S / K >= 2.4e-4 S) is still caught. Storing the
// result rounds once more: u_out * |y| (2^-24 fp32, 2^-11 fp16, 2^-8 bf16), twice on
// the cuBLAS path with a bias (GEMM output, then + bias); fp16 adds half a subnormal
// step.
double linear_tolerance(double S, double y, double bias, DType out_dt, int roundings) {
  const double u_out = out_dt == DType::kFloat32 ? std::ldexp(1.0, -24)
                       : out_dt == DType::kFloat16 ? std::ldexp(1.0, -11)
                                                   : std::ldexp(1.0, -8);
  const double floor = out_dt == DType::kFloat16 ? std::ldexp(1.0, -25) : 1e-30;
  return 1e-5 * S + roundings * u_out * (std::fabs(y) + std::fabs(bias)) + floor;
}

struct LinearRun {
  int64_t M;
  bool workspace;  // M > kFusedMaxRows: pass a workspace (the cuBLAS path where built)
};

void check_linear(Format fmt, DType dt, int64_t K, int64_t N, int64_t group, const Weight& w,
                  const std::vector<int64_t>& Ms, uint32_t seed) {
  DeviceBuffer dq(w.qw.q), ds(w.qw.scales), dz(w.qw.zps);
  const TensorView gq = on_gpu(w.qw.qv, dq), gs = on_gpu(w.qw.sv, ds), gz = on_gpu(w.qw.zv, dz);
  std::vector<float> bias = random_weights(N, seed + 99);
  std::vector<uint8_t> bias_bytes(N * 4);
  std::memcpy(bias_bytes.data(), bias.data(), bias_bytes.size());
  DeviceBuffer dbias(bias_bytes);
  const TensorView gbias = on_gpu(testing::view1(nullptr, DType::kFloat32, N), dbias);

  // The weight as the cuBLAS path multiplies it: dequantized into a workspace of x's dtype.
  std::vector<double> w_exact(w.deq.begin(), w.deq.end()), w_rounded(w_exact.size());
  for (size_t i = 0; i < w.deq.size(); ++i) w_rounded[i] = round_to(dt, w.deq[i]);

  std::vector<LinearRun> runs;
  for (int64_t M : Ms) {
    runs.push_back({M, false});
    if (M > cuda::kFusedMaxRows) runs.push_back({M, true});
  }
  for (const LinearRun& run : runs) {
    const int64_t M = run.M;
#ifdef TENSORSLIM_HAVE_CUBLAS
    const bool cublas = run.workspace;
#else
    const bool cublas = false;
#endif
    const bool with_bias = M % 2 == 1;
    const bool padded = M == 5 || M == 33;  // strided x rows and output rows
    SCOPED_TRACE("M " + std::to_string(M) + (run.workspace ? " with workspace" : "") +
                 (cublas ? " (cuBLAS)" : "") + (with_bias ? " bias" : "") +
                 (padded ? " padded" : ""));
    const int es = dtype_size(dt);
    const int64_t xs0 = padded ? K + 16 / es : K, os0 = padded ? N + 3 : N;
    HostMatrix x = make_matrix(dt, M, K, xs0, 1, seed + static_cast<uint32_t>(M));
    std::vector<uint8_t> out(static_cast<size_t>(M * os0 * es), 0x7F);  // sentinel
    DeviceBuffer dx(x.bytes), dout(out);
    std::unique_ptr<DeviceBuffer> dws;
    TensorView ws;
    if (run.workspace) {
      dws.reset(new DeviceBuffer(static_cast<size_t>(N * K * es)));
      ws = on_gpu(view2(nullptr, dt, N, K), *dws);
    }
    cuda::linear_weight_only(on_gpu(x.view, dx), gq, gs, w.qw.has_zp ? &gz : nullptr,
                             with_bias ? &gbias : nullptr, fmt, group,
                             on_gpu(view2(nullptr, dt, M, N, os0), dout),
                             run.workspace ? &ws : nullptr);
    const std::vector<uint8_t> got = dout.download();

    const std::vector<double>& wd = cublas ? w_rounded : w_exact;
    std::vector<double> xd(static_cast<size_t>(M * K));
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K; ++k) xd[m * K + k] = load_float(dt, x.bytes.data() + (m * xs0 + k) * es);
    std::vector<double> ref(static_cast<size_t>(M * N)), S(ref.size());
    cpu::parallel_for(N, 16, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n)
        for (int64_t m = 0; m < M; ++m) {
          const double* xr = xd.data() + m * K;
          const double* wr = wd.data() + n * K;
          double acc[4] = {0, 0, 0, 0}, mag[4] = {0, 0, 0, 0};
          int64_t k = 0;
          for (; k + 4 <= K; k += 4)
            for (int j = 0; j < 4; ++j) {
              acc[j] += xr[k + j] * wr[k + j];
              mag[j] += std::fabs(xr[k + j] * wr[k + j]);
            }
          for (; k < K; ++k) {
            acc[0] += xr[k] * wr[k];
            mag[0] += std::fabs(xr[k] * wr[k]);
          }
          ref[m * N + n] = acc[0] + acc[1] + acc[2] + acc[3] + (with_bias ? bias[n] : 0.0);
          S[m * N + n] = mag[0] + mag[1] + mag[2] + mag[3];
        }
    });

    int64_t bad = 0;
    double worst = 0.0;
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < os0; ++n) {
        const uint8_t* p = got.data() + (m * os0 + n) * es;
        if (n >= N) {  // padding after the row: untouched
          for (int b = 0; b < es; ++b) bad += p[b] != 0x7F ? 1 : 0;
          continue;
        }
        const double y = load_float(dt, p), r = ref[m * N + n];
        const double b = with_bias ? bias[n] : 0.0;
        const double tol = linear_tolerance(S[m * N + n], r, b, dt, cublas && with_bias ? 2 : 1);
        const double err = std::fabs(y - r);
        if (!(err <= tol)) {
          if (bad < 5)
            ADD_FAILURE() << "out[" << m << ", " << n << "] = " << y << ", reference " << r
                          << ", |err| " << err << " > tolerance " << tol;
          ++bad;
        }
        worst = std::max(worst, err / tol);
      }
    EXPECT_EQ(bad, 0) << "outputs outside the tolerance or padding overwritten; worst err/tol "
                      << worst;
  }
}

class CudaLinear : public ::testing::TestWithParam<std::tuple<Format, DType>> {};

TEST_P(CudaLinear, MatchesFloat64Reference) {
  SKIP_WITHOUT_GPU();
  const Format fmt = std::get<0>(GetParam());
  const DType dt = std::get<1>(GetParam());
  const FormatInfo& info = format_info(fmt);
  const std::vector<int64_t> Ms = {1, 2, 5, 8, 9, 33, 128};
  uint32_t seed = 11;
  // (384, 1536): every group size. (4096, 4096): the production group size of each
  // width (g128 for 4 bits, per row for 8 bits) to keep the float64 reference short.
  for (int64_t group : {int64_t{384}, int64_t{32}, int64_t{128}}) {
    SCOPED_TRACE("K 384 N 1536 group " + std::to_string(group));
    const Weight w = make_weight(fmt, 1536, 384, group, seed++);
    check_linear(fmt, dt, 384, 1536, group, w, Ms, seed++);
  }
  const int64_t big_group = info.bits == 4 ? 128 : 4096;
  SCOPED_TRACE("K 4096 N 4096 group " + std::to_string(big_group));
  const Weight w = make_weight(fmt, 4096, 4096, big_group, seed++);
  check_linear(fmt, dt, 4096, 4096, big_group, w, Ms, seed++);
}

INSTANTIATE_TEST_SUITE_P(AllIntFormats, CudaLinear,
                         ::testing::Combine(::testing::ValuesIn(kIntFormats),
                                            ::testing::ValuesIn(kFloatTypes)),
                         param_name);

// Shapes the fast GEMV cannot take (K not a multiple of a 16-byte chunk, an odd K per
// row) go through the generic kernels; they must agree with the reference too.
TEST(CudaLinearOddShapes, GenericKernelsMatchReference) {
  SKIP_WITHOUT_GPU();
  for (Format fmt : kIntFormats)
    for (DType dt : kFloatTypes) {
      SCOPED_TRACE(std::string(format_info(fmt).name) + " " + dtype_name(dt));
      const int64_t K = format_info(fmt).bits == 4 ? 250 : 251, N = 77;
      const Weight w = make_weight(fmt, N, K, K, 21);
      check_linear(fmt, dt, K, N, K, w, {1, 3, 8, 9, 70}, 22);
    }
}

TEST(CudaLinearErrors, WrongDeviceDtypeOrShape) {
  SKIP_WITHOUT_GPU();
  const int64_t M = 2, K = 64, N = 16;
  const Weight w = make_weight(Format::kInt4, N, K, 32, 31);
  HostMatrix x = make_matrix(DType::kFloat16, M, K, K, 1, 32);
  DeviceBuffer dq(w.qw.q), ds(w.qw.scales), dx(x.bytes), dout(static_cast<size_t>(M * N * 2));
  const TensorView gq = on_gpu(w.qw.qv, dq), gs = on_gpu(w.qw.sv, ds), gx = on_gpu(x.view, dx);
  const TensorView gout = on_gpu(view2(nullptr, DType::kFloat16, M, N), dout);
  auto call = [&](const TensorView& xv, const TensorView& qv, int64_t group, const TensorView& ov,
                  const TensorView* bias) {
    cuda::linear_weight_only(xv, qv, gs, nullptr, bias, Format::kInt4, group, ov, nullptr);
  };
  EXPECT_NO_THROW(call(gx, gq, 32, gout, nullptr));
  try {  // the weight left on the CPU
    call(gx, w.qw.qv, 32, gout, nullptr);
    ADD_FAILURE() << "CPU qweight accepted";
  } catch (const ValueError& e) {
    EXPECT_NE(std::string(e.what()).find("qweight is not a CUDA tensor"), std::string::npos)
        << e.what();
  }
  TensorView xi = gx;
  xi.dtype = DType::kInt8;
  EXPECT_THROW(call(xi, gq, 32, gout, nullptr), TypeError);
  TensorView o32 = gout;
  o32.dtype = DType::kFloat32;
  EXPECT_THROW(call(gx, gq, 32, o32, nullptr), TypeError);
  EXPECT_THROW(call(gx, gq, -1, gout, nullptr), ValueError);  // per-tensor weight scales
  TensorView xk = gx;
  xk.shape[1] = K - 2;
  EXPECT_THROW(call(xk, gq, 32, gout, nullptr), ValueError);  // K mismatch
  TensorView bias = on_gpu(testing::view1(nullptr, DType::kFloat32, N + 1), ds);
  EXPECT_THROW(call(gx, gq, 32, gout, &bias), ValueError);  // bias of the wrong length
  TensorView far = gout;
  far.device_index = 1;
  EXPECT_THROW(call(gx, gq, 32, far, nullptr), ValueError);
}

}  // namespace
}  // namespace tensorslim
