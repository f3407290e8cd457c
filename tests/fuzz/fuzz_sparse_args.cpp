// libFuzzer target: the sparse linears', unpackers' and convolutions' argument checks, and their
// kernels on packed data from the input: N:M values of any dtype (int4 words too) with arbitrary
// index bytes, CSR columns and row pointers as arbitrary numbers or as the running counts the
// packer writes, any conv geometry. Shapes are mostly the expected ones, sometimes a little off.
// A call may refuse with a ValueError or TypeError; anything else (a crash, an ASan report,
// another exception) is a finding.
#include <cstdint>
#include <vector>

#include "fuzz_input.h"
#include "tensorslim/sparse.h"
#include "tensorslim/status.h"

using namespace tensorslim;

namespace {

DType pick_dtype(fuzz::Input& in) {  // uint8 values are N:M int4 codes
  static const DType all[] = {DType::kFloat32, DType::kFloat16, DType::kBFloat16, DType::kInt8,
                              DType::kUInt8,   DType::kInt32,   DType::kUInt16};
  return all[in.range(0, 6)];
}

int64_t near(fuzz::Input& in, int64_t want) {
  return in.range(0, 3) == 0 ? std::max<int64_t>(0, want + in.range(-2, 2)) : want;
}

fuzz::Owned tensor(fuzz::Input& in, DType dt, std::vector<int64_t> shape) {
  for (int64_t& s : shape) s = near(in, s);
  return fuzz::make_view(in, in.range(0, 7) == 0 ? pick_dtype(in) : dt, static_cast<int>(shape.size()), shape.data(),
                         in.range(0, 7) == 0);
}

// Row pointers for N rows and nnz entries: the running counts of counts from the input
// (summing to nnz), or raw numbers.
fuzz::Owned row_pointers(fuzz::Input& in, int64_t N, int64_t nnz) {
  fuzz::Owned rp = tensor(in, DType::kInt64, {N + 1});
  if (rp.view.dtype == DType::kInt64 && rp.view.is_contiguous() && rp.view.shape[0] == N + 1 && in.range(0, 3)) {
    int64_t* p = rp.view.ptr<int64_t>();
    p[0] = 0;
    for (int64_t r = 0; r < N; ++r) p[r + 1] = r + 1 == N ? nnz : std::min(nnz, p[r] + in.range(0, 2 * nnz / (N ? N : 1) + 1));
  }
  return rp;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  fuzz::Input in(data, size);
  const int op = static_cast<int>(in.range(0, 4));  // nm / csr linear, nm / csr unpack, conv
  const bool csr = in.byte() & 1;
  const int m = in.range(0, 5) ? (in.byte() & 1 ? 4 : 8) : static_cast<int>(in.range(0, 9));
  const int n = static_cast<int>(in.range(0, m));
  const DType vt = csr ? (in.byte() & 1 ? DType::kInt8 : DType::kFloat32) : pick_dtype(in);
  const bool coded = vt == DType::kInt8 || vt == DType::kUInt8;
  int64_t M = in.range(0, 10), K = in.range(0, 70);
  const int64_t N = in.range(0, 12);
  ConvGeometry g;
  int64_t B = 0, C = 0, H = 0, W = 0;
  if (op == 4) {
    B = in.range(0, 2), H = in.range(0, 9), W = in.range(0, 9);
    g.kh = in.range(0, 4), g.kw = in.range(0, 4), g.sh = in.range(0, 3), g.sw = in.range(0, 3);
    g.ph = in.range(-1, 3), g.pw = in.range(-1, 3), g.dh = in.range(0, 3), g.dw = in.range(0, 3);
    g.groups = in.range(0, 3);
    C = in.range(0, 6) * (g.groups > 0 ? g.groups : 1);
    K = g.groups > 0 ? C / g.groups * g.kh * g.kw : 0;
  }
  const int64_t slots = m > 0 && n > 0 ? nm_slots(K, n, m) : in.range(0, 40);
  const int64_t vcols = vt == DType::kUInt8 ? (slots + 15) / 16 * 8 : slots;
  const int64_t nnz = in.range(0, N * K);
  fuzz::Owned values = csr ? tensor(in, vt, {nnz}) : tensor(in, vt, {N, vcols});
  fuzz::Owned indices = tensor(in, DType::kUInt8, {N, m == 4 || m == 8 ? nm_index_bytes(K, n > 0 ? n : 1, m) : 4});
  fuzz::Owned cols = tensor(in, DType::kUInt16, {nnz});
  if (cols.view.dtype == DType::kUInt16 && in.range(0, 3)) {  // mostly columns < K, as packing writes
    for (int64_t e = 0; e < fuzz::extent(cols.view); ++e)
      static_cast<uint16_t*>(cols.view.data)[e] %= static_cast<uint16_t>(K > 0 ? K : 1);
  }
  fuzz::Owned rp = row_pointers(in, N, nnz);
  fuzz::Owned scales = tensor(in, DType::kFloat32, {N});
  fuzz::Owned bias = tensor(in, DType::kFloat32, {N});
  const TensorView* sc = (coded ? in.range(0, 7) : !in.range(0, 7)) ? &scales.view : nullptr;
  const TensorView* bv = in.byte() & 1 ? &bias.view : nullptr;
  try {
    if (op == 2 || op == 3) {
      fuzz::Owned out = tensor(in, DType::kFloat32, {N, K});
      if (op == 2) nm_unpack(values.view, indices.view, sc, n, m, out.view);
      else csr_unpack(values.view, cols.view, rp.view, sc, out.view);
    } else if (op == 4) {
      const int64_t Ho = g.sh > 0 ? (H + 2 * g.ph - g.dh * (g.kh - 1) - 1) / g.sh + 1 : 0;
      const int64_t Wo = g.sw > 0 ? (W + 2 * g.pw - g.dw * (g.kw - 1) - 1) / g.sw + 1 : 0;
      fuzz::Owned x = tensor(in, DType::kFloat32, {B, C, H, W});
      fuzz::Owned out = tensor(in, DType::kFloat32, {B, N, std::max<int64_t>(0, Ho), std::max<int64_t>(0, Wo)});
      const int64_t need = sparse_conv2d_workspace(B, C, H, W, g);  // may refuse the geometry
      fuzz::Owned ws = tensor(in, DType::kFloat32, {need});
      if (csr) csr_conv2d(x.view, values.view, cols.view, rp.view, sc, bv, g, out.view, ws.view);
      else nm_conv2d(x.view, values.view, indices.view, sc, bv, n, m, g, out.view, ws.view);
    } else {
      fuzz::Owned x = tensor(in, DType::kFloat32, {M, K});
      fuzz::Owned out = tensor(in, DType::kFloat32, {M, N});
      fuzz::Owned ws = tensor(in, DType::kFloat32, {sparse_linear_workspace(M, K)});
      const TensorView* work = in.range(0, 7) ? &ws.view : nullptr;
      if (op == 1 || csr) csr_linear(x.view, values.view, cols.view, rp.view, sc, bv, out.view, work);
      else nm_linear(x.view, values.view, indices.view, sc, bv, n, m, out.view, work);
    }
  } catch (const ValueError&) {
  } catch (const TypeError&) {
  }
  return 0;
}
