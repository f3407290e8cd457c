// Binary and ternary linears at large batches: the panel GEMM (panel_gemm.h) on the codes
// decoded to +-scale or {-1, 0, +1} * scale, one K block of a panel's rows at a time. The
// tiles in binary_avx512.cpp / binary_avx2.cpp add or subtract each activation per weight
// code and keep their speed per product as the batch grows; the panel GEMM decodes each code
// once per call and then runs fp32 micro-tiles, which past a few dozen rows is faster
// (kBinaryPanelMinRows).
#include <algorithm>

#include "panel_gemm.h"
#include "tensorslim/binary.h"

namespace tensorslim {
namespace cpu {
namespace {

// Byte -> its 8 sign bits (lowest first) as +-1, or its 4 two-bit trits as -1 / 0 / +1
// (0b10 reads as 0, as trit_at in binary.cpp): a code is a table row times the scale, exact.
struct CodeTables {
  float signs[256][8];
  float trits[256][4];
  CodeTables() {
    for (int b = 0; b < 256; ++b) {
      for (int i = 0; i < 8; ++i) signs[b][i] = (b >> i) & 1 ? 1.0f : -1.0f;
      for (int i = 0; i < 4; ++i) {
        const int c = (b >> (2 * i)) & 3;
        trits[b][i] = c == 1 ? 1.0f : c == 3 ? -1.0f : 0.0f;
      }
    }
  }
};

const CodeTables& tables() {
  static const CodeTables t;
  return t;
}

// Values [k0, k0 + kc) of one row (k0 a multiple of the codes per byte) times `scale`.
// `out` restrict and each byte read once: otherwise the compiler assumes the stores may change
// the codes and reloads a byte per value, one scalar multiply at a time (~3.5 ms of a 4096 x
// 4096 call; now the table rows go through vector multiplies).
template <int PerByte>
void decode_codes(const float (*table)[PerByte], const uint8_t* row, int64_t k0, int64_t kc, float scale,
                  float* __restrict out) {
  const uint8_t* bytes = row + k0 / PerByte;
  const int64_t whole = kc / PerByte;
  for (int64_t j = 0; j < whole; ++j) {
    const float* t = table[bytes[j]];
    for (int i = 0; i < PerByte; ++i) out[j * PerByte + i] = t[i] * scale;
  }
  for (int64_t k = whole * PerByte; k < kc; ++k) out[k] = table[bytes[whole]][k % PerByte] * scale;
}

template <int PerByte>
bool codes_panels(const TensorView& x, const TensorView& w, const TensorView& scales, const TensorView* bias,
                  const TensorView& out, const float (*table)[PerByte]) {
  PanelGemmProblem p;
  p.x = x.ptr<float>();
  p.ldx = x.strides[0];
  p.M = x.shape[0];
  p.K = x.shape[1];
  p.N = w.shape[0];
  p.bias = bias ? bias->ptr<float>() : nullptr;
  p.out = out.data;
  p.ldo = out.strides[0];
  p.out_bf16 = false;
  p.decode_ranges = true;
  p.decode = [&](int64_t n0, int64_t rows, int64_t k0, int64_t kc, float* dst) {
    for (int64_t r = 0; r < rows; ++r)
      decode_codes<PerByte>(table, w.ptr<uint8_t>() + (n0 + r) * w.strides[0], k0, kc,
                            scales.ptr<float>()[n0 + r], dst + r * kc);
  };
  return panel_gemm(p);
}

}  // namespace

bool linear_binary_panels(const TensorView& x, const TensorView& bits, const TensorView& scales,
                          const TensorView* bias, const TensorView& out) {
  return codes_panels<8>(x, bits, scales, bias, out, tables().signs);
}

bool linear_ternary_panels(const TensorView& x, const TensorView& codes, const TensorView& scales,
                           const TensorView* bias, const TensorView& out) {
  return codes_panels<4>(x, codes, scales, bias, out, tables().trits);
}

}  // namespace cpu
}  // namespace tensorslim
