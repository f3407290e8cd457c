// Sparse storage (see include/tensorslim/sparse.h): argument checks, packing / unpacking
// (scalar, one-time), the scalar reference linear and the ISA dispatch of the fast ones.
#include "tensorslim/sparse.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "../activation_pieces.h"
#include "../half.h"
#include "../parallel.h"
#include "sparse_kernels.h"
#include "tensorslim/quantize.h"

namespace tensorslim {
namespace {

using std::to_string;

void check_cpu(const TensorView& t, const char* fn, const char* what) {
  TS_CHECK_TYPE(t.device == DeviceType::kCPU, std::string(fn) + ": " + what + " must be on the CPU");
  TS_CHECK_VALUE(t.is_contiguous(), std::string(fn) + ": " + what + " must be contiguous");
}

void check_tensor(const TensorView& t, DType dt, int ndim, const char* fn, const char* what) {
  check_cpu(t, fn, what);
  TS_CHECK_TYPE(t.dtype == dt, std::string(fn) + ": " + what + " must be " + dtype_name(dt) + ", got " +
                                   dtype_name(t.dtype));
  TS_CHECK_VALUE(t.ndim == ndim, std::string(fn) + ": " + what + " must be " + to_string(ndim) +
                                     "-D, got shape " + shape_str(t));
}

void check_nm(int n, int m, const char* fn) {
  TS_CHECK_VALUE(m == 4 || m == 8, std::string(fn) + ": m must be 4 or 8, got " + to_string(m));
  TS_CHECK_VALUE(n >= 1 && n < m, std::string(fn) + ": n must satisfy 1 <= n < m = " + to_string(m) +
                                      ", got n = " + to_string(n));
}

bool float_values(DType dt) {
  return dt == DType::kFloat32 || dt == DType::kBFloat16 || dt == DType::kFloat16;
}

using cpu::kInt4Values;

bool code_values(DType dt) { return dt == DType::kInt8 || dt == kInt4Values; }

// values dtype (nm: float32/bf16/f16/int8/uint8 = int4 codes, csr: float32/int8) and the
// scales that go with it.
void check_values_scales(const TensorView& values, const TensorView* scales, int64_t N, bool csr,
                         const char* fn) {
  const bool ok = csr ? (values.dtype == DType::kFloat32 || values.dtype == DType::kInt8)
                      : (float_values(values.dtype) || code_values(values.dtype));
  TS_CHECK_TYPE(ok, std::string(fn) + ": values must be " +
                        (csr ? "float32 or int8" : "float32, bfloat16, float16, int8 or uint8 (int4 codes)") +
                        ", got " + dtype_name(values.dtype));
  if (code_values(values.dtype)) {
    TS_CHECK_VALUE(scales != nullptr, std::string(fn) + ": integer values need per-row float32 scales");
    check_tensor(*scales, DType::kFloat32, 1, fn, "scales");
    TS_CHECK_VALUE(scales->shape[0] == N, std::string(fn) + ": scales must have " + to_string(N) +
                                              " elements, got " + shape_str(*scales));
  } else {
    TS_CHECK_VALUE(scales == nullptr, std::string(fn) + ": scales are only for int8 / int4 values, got " +
                                          dtype_name(values.dtype) + " values");
  }
}

// The nibble of a row's int4 values holding slot i: word i / 16, nibble (k % 2) * 8 + k / 2 of
// it (k = i % 16); nibble t is bits 4 (t % 2) .. of byte t / 2.
inline int64_t int4_nibble(int64_t i) { return (i >> 4) * 16 + (i & 1) * 8 + ((i & 15) >> 1); }

// The signed int4 code of slot i.
int int4_at(const uint8_t* p, int64_t i) {
  const int64_t t = int4_nibble(i);
  const int u = (p[t >> 1] >> (4 * (t & 1))) & 0x0f;
  return u >= 8 ? u - 16 : u;
}

float value_at(const cpu::SparseWeight& w, int64_t i) {
  switch (w.vdtype) {
    case DType::kFloat32: return static_cast<const float*>(w.values)[i];
    case DType::kBFloat16: return cpu::bf16_to_float(static_cast<const uint16_t*>(w.values)[i]);
    case DType::kFloat16: return cpu::f16_to_float(static_cast<const uint16_t*>(w.values)[i]);
    case kInt4Values: return static_cast<float>(int4_at(static_cast<const uint8_t*>(w.values), i));
    default: return static_cast<float>(static_cast<const int8_t*>(w.values)[i]);
  }
}

void store_value(const TensorView& values, int64_t i, float v) {
  switch (values.dtype) {
    case DType::kFloat32: values.ptr<float>()[i] = v; break;
    case DType::kBFloat16: values.ptr<uint16_t>()[i] = cpu::float_to_bf16(v); break;
    case DType::kFloat16: values.ptr<uint16_t>()[i] = cpu::float_to_f16(v); break;
    case kInt4Values: {  // v is a code in [-7, 7]; the byte was zeroed first
      const int64_t t = int4_nibble(i);
      values.ptr<uint8_t>()[t >> 1] |= static_cast<uint8_t>((static_cast<int>(v) & 0x0f) << (4 * (t & 1)));
      break;
    }
    default: values.ptr<int8_t>()[i] = static_cast<int8_t>(v);  // v is an integer code already
  }
}

// The largest code of integer values: 127 (int8) or 7 (int4).
float code_max(DType dt) { return dt == kInt4Values ? 7.0f : 127.0f; }

// The integer code of w under scale (the packing spec, in float32).
float int_code(float w, float scale, float qmax) {
  const float q = std::nearbyint(w / scale);  // default rounding mode: half to even
  return std::min(qmax, std::max(-qmax, q));
}

float row_scale(float amax, float qmax) { return amax > 0.0f ? amax / qmax : 1.0f; }

// Values per row of N:M storage: int4 rows are whole 16-slot words.
int64_t nm_value_stride(int64_t slots, DType dt) { return dt == kInt4Values ? (slots + 15) / 16 * 16 : slots; }

int nm_pos(const uint8_t* row, int64_t j, int b) {
  const int64_t bit = j * b;
  unsigned v = row[bit >> 3] >> (bit & 7);
  if ((bit & 7) + b > 8) v |= static_cast<unsigned>(row[(bit >> 3) + 1]) << (8 - (bit & 7));
  return static_cast<int>(v & ((1u << b) - 1u));
}

void put_pos(uint8_t* row, int64_t j, int b, int pos) {
  const int64_t bit = j * b;
  const unsigned v = static_cast<unsigned>(pos) << (bit & 7);
  row[bit >> 3] |= static_cast<uint8_t>(v);
  if ((bit & 7) + b > 8) row[(bit >> 3) + 1] |= static_cast<uint8_t>(v >> 8);
}

void check_w_keep(const TensorView& w, const TensorView& keep, const char* fn) {
  check_tensor(w, DType::kFloat32, 2, fn, "w");
  check_tensor(keep, DType::kUInt8, 2, fn, "keep");
  TS_CHECK_VALUE(keep.shape[0] == w.shape[0] && keep.shape[1] == w.shape[1],
                 std::string(fn) + ": keep must have w's shape " + shape_str(w) + ", got " + shape_str(keep));
}

cpu::SparseWeight nm_weight(const TensorView& values, const TensorView& indices, const TensorView* scales,
                            int n, int m, int64_t N, int64_t K, const char* fn) {
  check_nm(n, m, fn);
  check_cpu(values, fn, "values");
  check_values_scales(values, scales, N, false, fn);
  const int64_t S = nm_slots(K, n, m), B = nm_index_bytes(K, n, m);
  const int64_t VS = nm_value_stride(S, values.dtype), VC = values.dtype == kInt4Values ? VS / 2 : S;
  TS_CHECK_VALUE(values.ndim == 2 && values.shape[0] == N && values.shape[1] == VC,
                 std::string(fn) + ": values must be [" + to_string(N) + ", " + to_string(VC) +
                     "] for " + to_string(n) + ":" + to_string(m) + " with in_features " + to_string(K) +
                     (values.dtype == kInt4Values ? " (int4 codes in 64-bit words of 16)" : "") + ", got " +
                     shape_str(values));
  check_tensor(indices, DType::kUInt8, 2, fn, "indices");
  TS_CHECK_VALUE(indices.shape[0] == N && indices.shape[1] == B,
                 std::string(fn) + ": indices must be [" + to_string(N) + ", " + to_string(B) + "], got " +
                     shape_str(indices));
  cpu::SparseWeight w;
  w.vdtype = values.dtype;
  w.values = values.data;
  w.scales = scales ? scales->ptr<float>() : nullptr;
  w.N = N;
  w.K = K;
  w.n = n;
  w.m = m;
  w.b = nm_index_bits(m);
  w.slots = S;
  w.val_stride = VS;
  w.idx_row_bytes = B;
  w.indices = indices.ptr<uint8_t>();
  w.idx_end = w.indices + N * B;
  return w;
}

cpu::SparseWeight csr_weight(const TensorView& values, const TensorView& cols, const TensorView& row_ptr,
                             const TensorView* scales, int64_t K, const char* fn) {
  check_tensor(row_ptr, DType::kInt64, 1, fn, "row_ptr");
  TS_CHECK_VALUE(row_ptr.shape[0] >= 1, std::string(fn) + ": row_ptr must have N + 1 >= 1 elements");
  const int64_t N = row_ptr.shape[0] - 1;
  check_cpu(values, fn, "values");
  check_values_scales(values, scales, N, true, fn);
  TS_CHECK_VALUE(values.ndim == 1, std::string(fn) + ": values must be 1-D, got " + shape_str(values));
  check_tensor(cols, DType::kUInt16, 1, fn, "cols");
  const int64_t nnz = values.shape[0];
  TS_CHECK_VALUE(cols.shape[0] == nnz, std::string(fn) + ": cols must have as many entries as values (" +
                                           to_string(nnz) + "), got " + shape_str(cols));
  TS_CHECK_VALUE(K >= 1 && K <= 65536, std::string(fn) + ": in_features must be in [1, 65536] (16-bit "
                                                         "columns), got " + to_string(K));
  const int64_t* rp = row_ptr.ptr<int64_t>();
  TS_CHECK_VALUE(rp[0] == 0, std::string(fn) + ": row_ptr[0] must be 0, got " + to_string(rp[0]));
  for (int64_t r = 0; r < N; ++r) {
    TS_CHECK_VALUE(rp[r + 1] >= rp[r], std::string(fn) + ": row_ptr must be non-decreasing, row " +
                                           to_string(r) + " goes from " + to_string(rp[r]) + " to " +
                                           to_string(rp[r + 1]));
  }
  TS_CHECK_VALUE(rp[N] == nnz, std::string(fn) + ": row_ptr[N] must equal the number of values " +
                                   to_string(nnz) + ", got " + to_string(rp[N]));
  cpu::SparseWeight w;
  w.csr = true;
  w.vdtype = values.dtype;
  w.values = values.data;
  w.scales = scales ? scales->ptr<float>() : nullptr;
  w.N = N;
  w.K = K;
  w.cols = cols.ptr<uint16_t>();
  w.row_ptr = rp;
  return w;
}

// Transposes x into the tiles the large-batch kernels read (see SparseBatch::xt); only the
// x86 kernels run transposed.
void transpose_tiles(const float* x, int64_t M, int64_t K, int64_t ldx, int W, float* xt) {
  const int64_t tiles = (M + cpu::kTileM - 1) / cpu::kTileM;
  cpu::parallel_for(K, 256, [&](int64_t k0, int64_t k1) {
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t m0 = t * cpu::kTileM, mt = std::min(cpu::kTileM, M - m0);
      const int64_t st = cpu::tile_stride(mt, W);
      cpu::transpose_tile_avx2(x + m0 * ldx, mt, ldx, k0, k1, xt + t * K * cpu::kTileM, st);
    }
  });
}

// Rows per task of the unpackers: about 256 K values each (one task for small weights, where
// waking a second thread costs more than it saves).
int64_t unpack_row_grain(int64_t K) { return std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(K, 1)); }

// The first bad group of row r, for nm_unpack's error (its fast loop only notes that one exists).
[[noreturn]] void nm_unpack_row_error(const cpu::SparseWeight& w, int64_t r, const char* fn) {
  const uint8_t* idx = w.indices + r * w.idx_row_bytes;
  for (int64_t g = 0; g < w.slots / w.n; ++g) {
    int prev = -1;
    for (int s = 0; s < w.n; ++s) {
      const int64_t j = g * w.n + s;
      const int p = nm_pos(idx, j, w.b);
      TS_CHECK_VALUE(p > prev, std::string(fn) + ": positions must increase within a group; row " + to_string(r) +
                                   ", group " + to_string(g) + " has " + to_string(p) + " after " + to_string(prev));
      prev = p;
      const int64_t c = g * w.m + p;
      TS_CHECK_VALUE(c < w.K || value_at(w, r * w.val_stride + j) == 0.0f,
                     std::string(fn) + ": row " + to_string(r) + " stores a nonzero value at virtual column " +
                         to_string(c) + " >= in_features " + to_string(w.K));
    }
  }
  throw ValueError(std::string(fn) + ": row " + to_string(r) + " is malformed");  // not reached
}

// Output rows [r0, r1) of batch a on isa's kernels (the transposed ones, on t_isa, when
// transposed); true when a column >= K was met.
bool run_rows(const cpu::SparseWeight& w, const cpu::SparseBatch& a, cpu::Isa isa, cpu::Isa t_isa, bool transposed,
              int64_t r0, int64_t r1) {
  if (transposed && t_isa == cpu::Isa::kAVX2) {
    if (w.csr) return cpu::csr_rows_t_avx2(w, a, r0, r1);
    cpu::nm_rows_t_avx2(w, a, r0, r1);
  } else if (isa == cpu::Isa::kAVX512) {
    if (w.csr) return transposed ? cpu::csr_rows_t_avx512(w, a, r0, r1) : cpu::csr_rows_avx512(w, a, r0, r1);
    if (transposed) cpu::nm_rows_t_avx512(w, a, r0, r1);
    else cpu::nm_rows_avx512(w, a, r0, r1);
  } else if (isa == cpu::Isa::kAVX2) {
    if (w.csr) return transposed ? cpu::csr_rows_t_avx2(w, a, r0, r1) : cpu::csr_rows_avx2(w, a, r0, r1);
    if (transposed) cpu::nm_rows_t_avx2(w, a, r0, r1);
    else cpu::nm_rows_avx2(w, a, r0, r1);
  } else {
    return cpu::sparse_rows_scalar(w, a, r0, r1);
  }
  return false;
}

// N:M INT8 / INT4 values on the integer units (nm_rows_pieces_avx512 or nm_rows_pieces_avx2)
// where a pieces kernel takes the problem and x splits into pieces (no NaN / Inf, no subnormal
// step): out holds them as unsigned bytes in that kernel's order. kNone: the float kernels run.
enum class PiecesKernel { kNone, kAvx512, kAvx2 };
PiecesKernel nm_pieces_split(const cpu::SparseWeight& w, const TensorView& x, cpu::ActivationPieces& out) {
  const bool codes = w.vdtype == DType::kInt8 || w.vdtype == cpu::kInt4Values;
  const bool takes = !w.csr && codes && w.m == 2 * w.n && w.K % cpu::kPieceBlock == 0 &&
                     w.K <= cpu::kNmPiecesMaxK && cpu::nm_pieces_pay(x.shape[0], w.K) &&
                     cpu::activation_pieces_enabled();
  if (!takes) return PiecesKernel::kNone;
  PiecesKernel kernel = PiecesKernel::kNone;
  if (cpu::active_isa() == cpu::Isa::kAVX512 && cpu::cpu_has_avx512_vnni() && cpu::cpu_has_avx512_vbmi()) {
    if (!cpu::split_activation_pieces_avx512(x, w.K, false, out)) return PiecesKernel::kNone;
    kernel = PiecesKernel::kAvx512;
  } else if (cpu::active_isa() == cpu::Isa::kAVX2 && cpu::avx2_vnni() != cpu::AvxVnni::kNone) {
    if (!cpu::split_activation_pieces_avx2(x, w.K, out)) return PiecesKernel::kNone;
    cpu::order_pieces_for_avx2(reinterpret_cast<uint8_t*>(out.q.data()), static_cast<int64_t>(out.q.size()));
    kernel = PiecesKernel::kAvx2;
  } else {
    return PiecesKernel::kNone;
  }
  for (int8_t& q : out.q) q = static_cast<int8_t>(static_cast<uint8_t>(q) ^ 0x80u);  // + 128, unsigned
  return kernel;
}

void check_bias(const TensorView* bias, int64_t N, const char* fn) {
  if (!bias) return;
  check_tensor(*bias, DType::kFloat32, 1, fn, "bias");
  TS_CHECK_VALUE(bias->shape[0] == N, std::string(fn) + ": bias must have " + to_string(N) + " elements, got " +
                                          shape_str(*bias));
}

// Checks x / out / bias / workspace and runs the kernels of the active ISA over all rows.
void run_linear(const cpu::SparseWeight& w, const TensorView& x, const TensorView* bias, const TensorView& out,
                const TensorView* workspace, const char* fn) {
  check_cpu(x, fn, "x");
  TS_CHECK_TYPE(x.dtype == DType::kFloat32, std::string(fn) + ": x must be float32, got " + dtype_name(x.dtype));
  TS_CHECK_VALUE(x.ndim == 2 && x.shape[1] == w.K, std::string(fn) + ": x must be [M, " + to_string(w.K) +
                                                        "], got " + shape_str(x));
  const int64_t M = x.shape[0];
  check_tensor(out, DType::kFloat32, 2, fn, "out");
  TS_CHECK_VALUE(out.shape[0] == M && out.shape[1] == w.N, std::string(fn) + ": out must be [" + to_string(M) +
                                                               ", " + to_string(w.N) + "], got " + shape_str(out));
  check_bias(bias, w.N, fn);
  if (M == 0 || w.N == 0) return;
  cpu::SparseBatch a;
  a.x = x.ptr<float>();
  a.M = M;
  a.ldx = w.K;
  a.y = out.ptr<float>();
  a.ldy = w.N;
  a.bias = bias ? bias->ptr<float>() : nullptr;
  const cpu::Isa isa = cpu::active_isa();
  cpu::ActivationPieces pieces;
  const PiecesKernel pieces_kernel = nm_pieces_split(w, x, pieces);
  const bool on_pieces = pieces_kernel != PiecesKernel::kNone;
  const bool transposed = !on_pieces && isa != cpu::Isa::kScalar &&
                          M > cpu::rowwise_max_m(w.csr, isa == cpu::Isa::kAVX512, w.n, w.m);
  const bool csr_small = isa != cpu::Isa::kScalar && w.csr && !transposed && M > 1;
  // The transposed kernels do one FMA per entry per 16 (AVX-512) or 8 (AVX2) batch rows: a
  // batch of up to 8 runs the AVX2 kernel on 8-row tiles instead of half-empty 16-row ones
  // (AVX-512, 4096 x 4096 at 5-8 rows: 7:8 8.4 -> 6.7 ms, 3:4 6.7 -> 5.7, 1:8 1.32 -> 1.02-1.09).
  const cpu::Isa t_isa = isa == cpu::Isa::kAVX512 && M <= 8 ? cpu::Isa::kAVX2 : isa;
  if (transposed || csr_small) {
    const int64_t need = sparse_linear_workspace(M, w.K);
    TS_CHECK_VALUE(workspace != nullptr, std::string(fn) + ": a batch of " + to_string(M) +
                                             " rows needs a float32 workspace of " + to_string(need) + " elements");
    check_tensor(*workspace, DType::kFloat32, 1, fn, "workspace");
    TS_CHECK_VALUE(workspace->shape[0] >= need, std::string(fn) + ": workspace must hold " + to_string(need) +
                                                    " float32 elements, got " + shape_str(*workspace));
    if (transposed) transpose_tiles(a.x, M, w.K, a.ldx, t_isa == cpu::Isa::kAVX512 ? 16 : 8, workspace->ptr<float>());
    else cpu::transpose_small_avx2(a.x, M, w.K, a.ldx, cpu::csr_small_stride(M), workspace->ptr<float>());
    a.xt = workspace->ptr<float>();
  }
  std::atomic<bool> bad{false};
  auto rows = [&](int64_t r0, int64_t r1) {
    const uint8_t* xq = reinterpret_cast<const uint8_t*>(pieces.q.data());
    if (pieces_kernel == PiecesKernel::kAvx512)
      cpu::nm_rows_pieces_avx512(w, a, xq, pieces.step.data(), r0, r1);
    else if (pieces_kernel == PiecesKernel::kAvx2)
      cpu::nm_rows_pieces_avx2(w, a, xq, pieces.step.data(), r0, r1);
    else if (run_rows(w, a, isa, t_isa, transposed, r0, r1))
      bad.store(true);
  };
  // Rows are independent. Threads take blocks of rows from a shared counter rather than one
  // fixed share each, so rows with uneven nonzero counts, or a core busy with other work,
  // do not leave the other threads waiting. The row-wise kernels take about 8 blocks per
  // thread: each new block restarts the weight streams (the prefetchers' lead is lost), and
  // 16-row blocks made a 90% 4096 x 4096 CSR product with its weights out of cache 10-20%
  // slower than 128-2048-row blocks (Zen 4, 2 threads, batch 1 and 8, docs/benchmarks.md).
  const int64_t target_blocks = 8 * std::max(1, cpu::num_threads());
  const int64_t block =
      transposed ? cpu::kRowBlock : std::max<int64_t>(16, (w.N + target_blocks - 1) / target_blocks);
  const int64_t blocks = (w.N + block - 1) / block;
  const int threads = static_cast<int>(std::min<int64_t>(cpu::num_threads(), blocks));
  if (threads <= 1) {
    rows(0, w.N);
  } else {
    std::atomic<int64_t> next{0};
    cpu::parallel_for(threads, 1, [&](int64_t, int64_t) {
      for (int64_t b = next.fetch_add(1); b < blocks; b = next.fetch_add(1))
        rows(b * block, std::min(w.N, (b + 1) * block));
    });
  }
  TS_CHECK_VALUE(!bad.load(), std::string(fn) + ": cols holds a column >= in_features = " + to_string(w.K));
}

// A convolution's input planes for one image (docs/formats.md, "Sparse convolutions"). Kernel
// row ky reads input row yo * sh + ky * dh - ph = (yo + q) * sh + phase - ph for output row yo,
// with q = ky * dh / sh and phase = ky * dh % sh. Plane (group, kx, c) holds, for plane rows yr
// and output columns xo, the zero-padded input at row yr * sh + phase(group) and column
// xo * sw + kx * dw, one group per phase some ky has (one for stride 1: kw copies of x); so
// weight column (c, ky, kx)'s inputs for the output positions yo * Wo + xo are one contiguous
// run starting q * Wo into its plane.
struct ConvPlanes {
  int64_t C, H, W, Ho, Wo, rows, size;  // size: floats per image
  ConvGeometry g;
  std::vector<int64_t> phases;          // phase of each group
  std::vector<int64_t> group_of_phase;  // -1 for a phase no ky has
  ConvPlanes(int64_t C_, int64_t H_, int64_t W_, const ConvGeometry& g_, const char* fn)
      : C(C_), H(H_), W(W_), g(g_) {
    TS_CHECK_VALUE(g.kh >= 1 && g.kw >= 1 && g.sh >= 1 && g.sw >= 1 && g.dh >= 1 && g.dw >= 1 && g.ph >= 0 &&
                       g.pw >= 0,
                   std::string(fn) + ": kernel size, stride and dilation must be >= 1 and padding >= 0");
    const int64_t span_h = g.dh * (g.kh - 1) + 1, span_w = g.dw * (g.kw - 1) + 1;
    TS_CHECK_VALUE(H + 2 * g.ph >= span_h && W + 2 * g.pw >= span_w,
                   std::string(fn) + ": the padded input " + to_string(H + 2 * g.ph) + " x " +
                       to_string(W + 2 * g.pw) + " is smaller than the dilated kernel " + to_string(span_h) +
                       " x " + to_string(span_w));
    Ho = (H + 2 * g.ph - span_h) / g.sh + 1;
    Wo = (W + 2 * g.pw - span_w) / g.sw + 1;
    group_of_phase.assign(std::min(g.sh, g.kh * g.dh), -1);  // phases are < min(sh, kh * dh)
    for (int64_t ky = 0; ky < g.kh; ++ky) {
      const int64_t phase = ky * g.dh % g.sh;
      if (group_of_phase[phase] < 0) {
        group_of_phase[phase] = static_cast<int64_t>(phases.size());
        phases.push_back(phase);
      }
    }
    rows = Ho + (g.kh - 1) * g.dh / g.sh;
    size = static_cast<int64_t>(phases.size()) * g.kw * C * rows * Wo;
    // Kernel offsets are int32; tiles read up to kTileM floats past the last position.
    TS_CHECK_VALUE(size + cpu::kTileM < (int64_t{1} << 31),
                   std::string(fn) + ": one image's input planes (" + to_string(size) +
                       " floats) exceed 2^31; split the image");
  }
  int64_t planes() const { return static_cast<int64_t>(phases.size()) * g.kw * C; }
  // Offset of weight column (c, ky, kx) in an image's planes.
  int32_t column_offset(int64_t c, int64_t ky, int64_t kx) const {
    const int64_t plane = (group_of_phase[ky * g.dh % g.sh] * g.kw + kx) * C + c;
    return static_cast<int32_t>(plane * rows * Wo + ky * g.dh / g.sh * Wo);
  }
  // A plane of a stride-1 conv whose output is as wide as its input: rows yr of the channel
  // (src) at input row yr + dy, shifted by dx columns (d[xo] = row[xo + dx], zero outside).
  // The rows inside the input are one block of x, copied at once and their dx edge columns
  // zeroed after: at 56 x 56 and below, three calls per row of Wo floats cost more than the
  // copy itself.
  void fill_shifted(const float* src, int64_t dx, int64_t dy, float* dst) const {
    const int64_t r0 = std::min(rows, std::max<int64_t>(0, -dy)), r1 = std::max(r0, std::min(rows, H - dy));
    std::fill(dst, dst + r0 * W, 0.0f);
    std::fill(dst + r1 * W, dst + rows * W, 0.0f);
    if (r1 == r0) return;
    const int64_t n = (r1 - r0) * W - (dx < 0 ? -dx : dx);  // never reads outside the channel's rows
    if (n > 0) {
      if (dx < 0) std::memcpy(dst + r0 * W - dx, src + (r0 + dy) * W, n * sizeof(float));
      else std::memcpy(dst + r0 * W, src + (r0 + dy) * W + dx, n * sizeof(float));
    }
    const int64_t edge = std::min(W, dx < 0 ? -dx : dx);
    for (int64_t yr = r0; yr < r1; ++yr) {
      float* d = dst + yr * W + (dx < 0 ? 0 : W - edge);  // the columns the shift brings in from outside
      std::fill(d, d + edge, 0.0f);
    }
  }
  // Fills plane p (of planes()) of one image from x (that image's [C, H, W]).
  void fill(const float* x, int64_t p, float* out) const {
    const int64_t c = p % C, kx = (p / C) % g.kw, phase = phases[p / (C * g.kw)];
    const float* src = x + c * H * W;
    float* dst = out + p * rows * Wo;
    if (g.sh == 1 && g.sw == 1 && Wo == W) {
      fill_shifted(src, kx * g.dw - g.pw, phase - g.ph, dst);
      return;
    }
    // Output columns whose input column xo * sw + kx * dw - pw lies inside [0, W).
    const int64_t first_in = g.pw - kx * g.dw;  // xo * sw >= first_in
    const int64_t lo = first_in <= 0 ? 0 : (first_in + g.sw - 1) / g.sw;
    const int64_t past = W + g.pw - kx * g.dw;  // xo * sw < past
    const int64_t hi = std::max<int64_t>(lo, std::min<int64_t>(Wo, past <= 0 ? 0 : (past + g.sw - 1) / g.sw));
    for (int64_t yr = 0; yr < rows; ++yr) {
      float* d = dst + yr * Wo;
      const int64_t yi = yr * g.sh + phase - g.ph;
      if (yi < 0 || yi >= H || lo >= hi) {
        std::fill(d, d + Wo, 0.0f);
        continue;
      }
      const float* s = src + yi * W + (lo * g.sw + kx * g.dw - g.pw);
      std::fill(d, d + lo, 0.0f);
      if (g.sw == 1) std::memcpy(d + lo, s, (hi - lo) * sizeof(float));
      else for (int64_t xo = lo; xo < hi; ++xo) d[xo] = s[(xo - lo) * g.sw];
      std::fill(d + hi, d + Wo, 0.0f);
    }
  }
};

// The weight columns a conv of x's channels has: C / groups * kh * kw.
int64_t conv_columns(const TensorView& x, const ConvGeometry& g, const char* fn) {
  TS_CHECK_VALUE(x.ndim == 4, std::string(fn) + ": x must be 4-D [B, C, H, W], got " + shape_str(x));
  TS_CHECK_VALUE(g.groups >= 1 && x.shape[1] % g.groups == 0,
                 std::string(fn) + ": groups = " + to_string(g.groups) + " must divide the " + to_string(x.shape[1]) +
                     " input channels");
  return x.shape[1] / g.groups * g.kh * g.kw;
}

// Images per pass of a convolution: planes of up to ~4 MiB together (at least one image).
int64_t conv_images_per_pass(int64_t plane_floats, int64_t B) {
  return std::max<int64_t>(1, std::min<int64_t>(B, (int64_t{1} << 20) / std::max<int64_t>(1, plane_floats)));
}

void run_conv2d(const cpu::SparseWeight& w, const TensorView& x, const TensorView* bias, const ConvGeometry& g,
                const TensorView& out, const TensorView& workspace, const char* fn) {
  check_tensor(x, DType::kFloat32, 4, fn, "x");
  const int64_t B = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3];
  // conv_columns checked that groups divides C
  TS_CHECK_VALUE(w.N % g.groups == 0, std::string(fn) + ": groups = " + to_string(g.groups) +
                                          " must divide the " + to_string(w.N) + " output channels");
  const int64_t Cg = C / g.groups, Ng = w.N / g.groups;  // per group
  TS_CHECK_VALUE(Cg * g.kh * g.kw == w.K, std::string(fn) + ": x has " + to_string(C) + " channels in " +
                                              to_string(g.groups) + " group(s), so " + to_string(Cg * g.kh * g.kw) +
                                              " weight columns for a " + to_string(g.kh) + " x " + to_string(g.kw) +
                                              " kernel; the weight has " + to_string(w.K));
  const ConvPlanes P(C, H, W, g, fn);
  check_tensor(out, DType::kFloat32, 4, fn, "out");
  TS_CHECK_VALUE(out.shape[0] == B && out.shape[1] == w.N && out.shape[2] == P.Ho && out.shape[3] == P.Wo,
                 std::string(fn) + ": out must be [" + to_string(B) + ", " + to_string(w.N) + ", " +
                     to_string(P.Ho) + ", " + to_string(P.Wo) + "], got " + shape_str(out));
  check_bias(bias, w.N, fn);
  check_tensor(workspace, DType::kFloat32, 1, fn, "workspace");
  const int64_t need = sparse_conv2d_workspace(B, C, H, W, g);
  TS_CHECK_VALUE(workspace.shape[0] >= need, std::string(fn) + ": workspace must hold " + to_string(need) +
                                                 " float32 elements, got " + shape_str(workspace));
  if (B == 0 || w.N == 0) return;
  // Group 0's offsets; group q reads the same columns q * Cg channels on, one plane each.
  std::vector<int32_t> col_off(w.K);
  for (int64_t c = 0; c < Cg; ++c)
    for (int64_t ky = 0; ky < g.kh; ++ky)
      for (int64_t kx = 0; kx < g.kw; ++kx) col_off[(c * g.kh + ky) * g.kw + kx] = P.column_offset(c, ky, kx);
  float* planes = workspace.ptr<float>();
  const float* xp = x.ptr<float>();
  const int64_t per_image = P.planes(), M = P.Ho * P.Wo;
  const cpu::Isa isa = cpu::active_isa();
  // Every output position count runs the transposed kernels (as a linear's batch of M rows),
  // on AVX2's 8-wide tiles up to 8 positions.
  const cpu::Isa t_isa = isa == cpu::Isa::kAVX512 && M <= 8 ? cpu::Isa::kAVX2 : isa;
  const bool transposed = isa != cpu::Isa::kScalar;
  const int64_t group_blocks = (Ng + cpu::kRowBlock - 1) / cpu::kRowBlock, blocks = g.groups * group_blocks;
  const int64_t chunk = conv_images_per_pass(P.size, B);
  std::atomic<bool> bad{false};
  // Images in passes whose planes stay in cache between being written and read: fill the
  // pass's planes, then its tasks (image, block of output channels) from a shared counter,
  // as run_linear's row blocks.
  for (int64_t b0 = 0; b0 < B; b0 += chunk) {
    const int64_t nb = std::min(chunk, B - b0);
    cpu::parallel_for(nb * per_image, std::max<int64_t>(1, 8192 / std::max<int64_t>(1, P.rows * P.Wo)),
                      [&](int64_t p0, int64_t p1) {
                        for (int64_t p = p0; p < p1; ++p)
                          P.fill(xp + (b0 + p / per_image) * C * H * W, p % per_image,
                                 planes + (p / per_image) * P.size);
                      });
    std::fill(planes + nb * P.size, planes + nb * P.size + cpu::kTileM, 0.0f);  // the last tile's padding reads these
    const int64_t tasks = nb * blocks;
    auto task = [&](int64_t t) {
      // (image, group, block of the group's output channels)
      const int64_t b = t / blocks, q = t % blocks / group_blocks;
      const int64_t r0 = q * Ng + t % group_blocks * cpu::kRowBlock, r1 = std::min((q + 1) * Ng, r0 + cpu::kRowBlock);
      cpu::SparseBatch a;
      a.xt = a.x = planes + b * P.size + q * Cg * P.rows * P.Wo;
      a.col_off = col_off.data();
      a.M = M;
      a.y = out.ptr<float>() + (b0 + b) * w.N * M;
      a.ldy = 1;
      a.ldr = M;
      a.bias = bias ? bias->ptr<float>() : nullptr;
      if (run_rows(w, a, isa, t_isa, transposed, r0, r1)) bad.store(true);
    };
    const int threads = static_cast<int>(std::min<int64_t>(cpu::num_threads(), tasks));
    if (threads <= 1) {
      for (int64_t t = 0; t < tasks; ++t) task(t);
    } else {
      std::atomic<int64_t> next{0};
      cpu::parallel_for(threads, 1, [&](int64_t, int64_t) {
        for (int64_t t = next.fetch_add(1); t < tasks; t = next.fetch_add(1)) task(t);
      });
    }
  }
  TS_CHECK_VALUE(!bad.load(), std::string(fn) + ": cols holds a column >= in_features = " + to_string(w.K));
}

}  // namespace

namespace cpu {

// The specification: per output, the sum over stored entries in storage order of
// value * x[col] in float32 (entries at columns >= K are skipped), times the row's scale for
// int8 / int4 values, plus bias.
bool sparse_rows_scalar(const SparseWeight& w, const SparseBatch& a, int64_t r0, int64_t r1) {
  bool bad = false;
  for (int64_t r = r0; r < r1; ++r) {
    const float scale = w.scales ? w.scales[r] : 1.0f;
    const float bias = a.bias ? a.bias[r] : 0.0f;
    for (int64_t i = 0; i < a.M; ++i) {
      const float* x = a.x + i * a.ldx;
      // x at column c (a convolution reads its planes)
      auto x_at = [&](int64_t c) { return a.col_off ? a.xt[a.col_off[c] + i] : x[c]; };
      float acc = 0.0f;
      if (w.csr) {
        for (int64_t e = w.row_ptr[r]; e < w.row_ptr[r + 1]; ++e) {
          const int64_t c = w.cols[e];
          if (c >= w.K) {
            bad = true;
            continue;
          }
          acc += value_at(w, e) * x_at(c);
        }
      } else {
        const uint8_t* idx = w.indices + r * w.idx_row_bytes;
        for (int64_t j = 0; j < w.slots; ++j) {
          const int64_t c = (j / w.n) * w.m + nm_pos(idx, j, w.b);
          if (c < w.K) acc += value_at(w, r * w.val_stride + j) * x_at(c);
        }
      }
      a.y[i * a.ldy + r * a.ldr] = acc * scale + bias;
    }
  }
  return bad;
}

namespace {
std::atomic<bool>& sparse_gathers_on() {
  static std::atomic<bool> on{cpu_is_intel()};
  return on;
}
}  // namespace

bool sparse_gathers() { return sparse_gathers_on().load(std::memory_order_relaxed); }
void set_sparse_gathers(bool on) { sparse_gathers_on().store(on); }

}  // namespace cpu

int nm_index_bits(int m) { return m == 8 ? 3 : 2; }

int64_t nm_slots(int64_t K, int n, int m) { return (K + m - 1) / m * n; }

int64_t nm_index_bytes(int64_t K, int n, int m) { return (nm_slots(K, n, m) * nm_index_bits(m) + 7) / 8; }

int64_t sparse_linear_workspace(int64_t M, int64_t K) {
  if (M <= 1) return 0;  // enough for any format and ISA (see rowwise_max_m)
  // Full tiles of kTileM rows, then the last one at its width rounded up to 16.
  const int64_t tiles = (M + cpu::kTileM - 1) / cpu::kTileM;
  return ((tiles - 1) * cpu::kTileM + cpu::tile_stride(M - (tiles - 1) * cpu::kTileM, 16)) * K;
}

int64_t sparse_conv2d_workspace(int64_t B, int64_t C, int64_t H, int64_t W, const ConvGeometry& g) {
  const int64_t size = ConvPlanes(C, H, W, g, "sparse_conv2d_workspace").size;
  return conv_images_per_pass(size, B) * size + cpu::kTileM;
}

void nm_pack(const TensorView& w, const TensorView& keep, int n, int m, const TensorView& values,
             const TensorView& indices, const TensorView* scales) {
  const char* fn = "nm_pack";
  check_nm(n, m, fn);
  check_w_keep(w, keep, fn);
  const int64_t N = w.shape[0], K = w.shape[1];
  const cpu::SparseWeight sw = nm_weight(values, indices, scales, n, m, N, K, fn);
  const int64_t S = sw.slots, B = sw.idx_row_bytes, G = S / n;
  const float* wp = w.ptr<float>();
  const uint8_t* kp = keep.ptr<uint8_t>();
  const int b = sw.b;
  const bool coded = code_values(values.dtype);
  const float qmax = code_max(values.dtype);
  if (values.dtype == kInt4Values) std::memset(values.data, 0, N * sw.val_stride / 2);  // codes are or-ed in
  for (int64_t r = 0; r < N; ++r) {
    const float* wr = wp + r * K;
    const uint8_t* kr = kp + r * K;
    float amax = 0.0f;
    for (int64_t g = 0; g < G; ++g) {
      int count = 0;
      for (int64_t c = g * m; c < std::min(K, (g + 1) * m); ++c) {
        if (!kr[c]) continue;
        TS_CHECK_VALUE(std::isfinite(wr[c]), std::string(fn) + ": w holds NaN or Inf at row " + to_string(r) +
                                                 ", column " + to_string(c));
        ++count;
        amax = std::max(amax, std::fabs(wr[c]));
      }
      TS_CHECK_VALUE(count <= n, std::string(fn) + ": keep has " + to_string(count) + " weights in row " +
                                     to_string(r) + ", group " + to_string(g) + " (columns " +
                                     to_string(g * m) + ".." + to_string(std::min(K, (g + 1) * m) - 1) +
                                     "); " + to_string(n) + ":" + to_string(m) + " allows at most " +
                                     to_string(n));
    }
    const float scale = coded ? row_scale(amax, qmax) : 1.0f;
    if (coded) scales->ptr<float>()[r] = scale;
    uint8_t* ir = indices.ptr<uint8_t>() + r * B;
    std::memset(ir, 0, B);
    for (int64_t g = 0; g < G; ++g) {
      // Kept positions plus the smallest free ones up to n, in increasing order.
      int free_needed = n;
      for (int p = 0; p < m; ++p) {
        const int64_t c = g * m + p;
        free_needed -= (c < K && kr[c]) ? 1 : 0;
      }
      int j = 0;
      for (int p = 0; p < m && j < n; ++p) {
        const int64_t c = g * m + p;
        const bool kept = c < K && kr[c];
        if (!kept) {
          if (free_needed == 0) continue;
          --free_needed;
        }
        const int64_t slot = g * n + j++;
        put_pos(ir, slot, b, p);
        const float v = kept ? wr[c] : 0.0f;
        store_value(values, r * sw.val_stride + slot, coded ? int_code(v, scale, qmax) : v);
      }
    }
  }
}

void nm_unpack(const TensorView& values, const TensorView& indices, const TensorView* scales, int n, int m,
               const TensorView& out) {
  const char* fn = "nm_unpack";
  check_tensor(out, DType::kFloat32, 2, fn, "out");
  const int64_t N = out.shape[0], K = out.shape[1];
  const cpu::SparseWeight w = nm_weight(values, indices, scales, n, m, N, K, fn);
  float* o = out.ptr<float>();
  const int64_t groups = w.slots / n;
  // One function per value dtype, rows in parallel: sparse layers decode their weight on
  // every call at large batches (ops/sparse.py), so this is on the forward path.
  auto rows = [&](auto value_of, int64_t r0, int64_t r1) {
    // Locals, not w's fields: through references GCC reloaded them after every store.
    const int b = w.b;
    const unsigned mask = (1u << b) - 1u;
    const int64_t stride = w.val_stride, row_bytes = w.idx_row_bytes;
    for (int64_t r = r0; r < r1; ++r) {
      float* orow = o + r * K;
      std::fill(orow, orow + K, 0.0f);
      const uint8_t* idx = w.indices + r * row_bytes;
      const float scale = w.scales ? w.scales[r] : 1.0f;
      const int64_t first = r * stride;
      // The row's positions come from a bit buffer refilled a byte at a time.
      uint64_t bits = 0;
      int have = 0;
      int64_t j = 0;
      bool ok = true;
      for (int64_t g = 0; g < groups; ++g) {
        int prev = -1;
        for (int s = 0; s < n; ++s, ++j) {
          if (have < b) {
            bits |= static_cast<uint64_t>(*idx++) << have;
            have += 8;
          }
          const int p = static_cast<int>(bits & mask);
          bits >>= b;
          have -= b;
          ok &= p > prev;
          prev = p;
          const int64_t c = g * m + p;
          const float v = value_of(first + j) * scale;
          if (c < K) orow[c] = v;
          else ok &= v == 0.0f;
        }
      }
      if (!ok) nm_unpack_row_error(w, r, fn);
    }
  };
  cpu::parallel_for(N, unpack_row_grain(K), [&](int64_t r0, int64_t r1) {
    switch (w.vdtype) {
      case DType::kFloat32: return rows([&](int64_t i) { return static_cast<const float*>(w.values)[i]; }, r0, r1);
      case DType::kBFloat16:
        return rows([&](int64_t i) { return cpu::bf16_to_float(static_cast<const uint16_t*>(w.values)[i]); }, r0, r1);
      case DType::kFloat16:
        return rows([&](int64_t i) { return cpu::f16_to_float(static_cast<const uint16_t*>(w.values)[i]); }, r0, r1);
      case kInt4Values:
        return rows([&](int64_t i) { return static_cast<float>(int4_at(static_cast<const uint8_t*>(w.values), i)); },
                    r0, r1);
      default:
        return rows([&](int64_t i) { return static_cast<float>(static_cast<const int8_t*>(w.values)[i]); }, r0, r1);
    }
  });
}

void nm_linear(const TensorView& x, const TensorView& values, const TensorView& indices, const TensorView* scales,
               const TensorView* bias, int n, int m, const TensorView& out, const TensorView* workspace) {
  const char* fn = "nm_linear";
  check_tensor(out, DType::kFloat32, 2, fn, "out");
  TS_CHECK_VALUE(x.ndim == 2, std::string(fn) + ": x must be 2-D [M, K], got " + shape_str(x));
  const cpu::SparseWeight w = nm_weight(values, indices, scales, n, m, out.shape[1], x.shape[1], fn);
  run_linear(w, x, bias, out, workspace, fn);
}

void csr_pack(const TensorView& w, const TensorView& keep, const TensorView& row_ptr, const TensorView& values,
              const TensorView& cols, const TensorView* scales) {
  const char* fn = "csr_pack";
  check_w_keep(w, keep, fn);
  const int64_t N = w.shape[0], K = w.shape[1];
  TS_CHECK_VALUE(K <= 65536, std::string(fn) + ": in_features " + to_string(K) +
                                 " is over 65536, the most 16-bit column indices address");
  TS_CHECK_VALUE(row_ptr.ndim == 1 && row_ptr.shape[0] == N + 1,
                 std::string(fn) + ": row_ptr must be [" + to_string(N + 1) + "], got " + shape_str(row_ptr));
  const cpu::SparseWeight sw = csr_weight(values, cols, row_ptr, scales, std::max<int64_t>(K, 1), fn);
  const float* wp = w.ptr<float>();
  const uint8_t* kp = keep.ptr<uint8_t>();
  const bool int8 = values.dtype == DType::kInt8;
  for (int64_t r = 0; r < N; ++r) {
    int64_t count = 0;
    float amax = 0.0f;
    for (int64_t c = 0; c < K; ++c) {
      if (!kp[r * K + c]) continue;
      TS_CHECK_VALUE(std::isfinite(wp[r * K + c]), std::string(fn) + ": w holds NaN or Inf at row " +
                                                       to_string(r) + ", column " + to_string(c));
      ++count;
      amax = std::max(amax, std::fabs(wp[r * K + c]));
    }
    TS_CHECK_VALUE(count == sw.row_ptr[r + 1] - sw.row_ptr[r],
                   std::string(fn) + ": row_ptr gives row " + to_string(r) + " " +
                       to_string(sw.row_ptr[r + 1] - sw.row_ptr[r]) + " entries, keep has " + to_string(count));
    const float scale = int8 ? row_scale(amax, 127.0f) : 1.0f;
    if (int8) scales->ptr<float>()[r] = scale;
    int64_t e = sw.row_ptr[r];
    for (int64_t c = 0; c < K; ++c) {
      if (!kp[r * K + c]) continue;
      const float v = wp[r * K + c];
      store_value(values, e, int8 ? int_code(v, scale, 127.0f) : v);
      cols.ptr<uint16_t>()[e++] = static_cast<uint16_t>(c);
    }
  }
}

void csr_unpack(const TensorView& values, const TensorView& cols, const TensorView& row_ptr,
                const TensorView* scales, const TensorView& out) {
  const char* fn = "csr_unpack";
  check_tensor(out, DType::kFloat32, 2, fn, "out");
  const int64_t N = out.shape[0], K = out.shape[1];
  TS_CHECK_VALUE(row_ptr.ndim == 1 && row_ptr.shape[0] == N + 1,
                 std::string(fn) + ": row_ptr must be [" + to_string(N + 1) + "] for " + to_string(N) +
                     " rows, got " + shape_str(row_ptr));
  const cpu::SparseWeight w = csr_weight(values, cols, row_ptr, scales, K, fn);
  float* o = out.ptr<float>();
  auto rows = [&](auto value_of, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* orow = o + r * K;
      std::fill(orow, orow + K, 0.0f);
      const float scale = w.scales ? w.scales[r] : 1.0f;
      int64_t prev = -1;
      for (int64_t e = w.row_ptr[r]; e < w.row_ptr[r + 1]; ++e) {
        const int64_t c = w.cols[e];
        TS_CHECK_VALUE(c < K, std::string(fn) + ": row " + to_string(r) + " has column " + to_string(c) +
                                  " >= in_features " + to_string(K));
        TS_CHECK_VALUE(c > prev, std::string(fn) + ": row " + to_string(r) +
                                     " columns must be strictly increasing, got " + to_string(c) + " after " +
                                     to_string(prev));
        prev = c;
        orow[c] = value_of(e) * scale;
      }
    }
  };
  cpu::parallel_for(N, unpack_row_grain(K), [&](int64_t r0, int64_t r1) {
    if (w.vdtype == DType::kFloat32) rows([&](int64_t e) { return static_cast<const float*>(w.values)[e]; }, r0, r1);
    else rows([&](int64_t e) { return static_cast<float>(static_cast<const int8_t*>(w.values)[e]); }, r0, r1);
  });
}

void csr_linear(const TensorView& x, const TensorView& values, const TensorView& cols, const TensorView& row_ptr,
                const TensorView* scales, const TensorView* bias, const TensorView& out,
                const TensorView* workspace) {
  const char* fn = "csr_linear";
  TS_CHECK_VALUE(x.ndim == 2, std::string(fn) + ": x must be 2-D [M, K], got " + shape_str(x));
  const cpu::SparseWeight w = csr_weight(values, cols, row_ptr, scales, x.shape[1], fn);
  run_linear(w, x, bias, out, workspace, fn);
}

}  // namespace tensorslim

namespace tensorslim {

void nm_conv2d(const TensorView& x, const TensorView& values, const TensorView& indices, const TensorView* scales,
               const TensorView* bias, int n, int m, const ConvGeometry& g, const TensorView& out,
               const TensorView& workspace) {
  const char* fn = "nm_conv2d";
  check_tensor(out, DType::kFloat32, 4, fn, "out");
  const cpu::SparseWeight w = nm_weight(values, indices, scales, n, m, out.shape[1], conv_columns(x, g, fn), fn);
  run_conv2d(w, x, bias, g, out, workspace, fn);
}

void csr_conv2d(const TensorView& x, const TensorView& values, const TensorView& cols, const TensorView& row_ptr,
                const TensorView* scales, const TensorView* bias, const ConvGeometry& g, const TensorView& out,
                const TensorView& workspace) {
  const char* fn = "csr_conv2d";
  const cpu::SparseWeight w = csr_weight(values, cols, row_ptr, scales, conv_columns(x, g, fn), fn);
  run_conv2d(w, x, bias, g, out, workspace, fn);
}

}  // namespace tensorslim
