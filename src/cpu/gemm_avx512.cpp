// Native AVX-512 weight-only GEMV/GEMM for a few rows of activations (M <= 8): each
// weight row is read once from memory, dequantized in registers and multiplied with
// every activation row. Memory-bound at batch 1, so INT4 moves 1/8 of fp32's bytes.
#include <immintrin.h>

#include <algorithm>
#include <vector>

#include "half.h"
#include "parallel.h"
#include "tensorslim/gemm.h"
#include "tensorslim/quantize.h"

namespace tensorslim {
namespace cpu {
namespace {

constexpr int kMaxBlock = 4;  // activation rows per pass over a weight row

// INT4: byte j of a 32-value block holds k = 2j (low nibble) and 2j + 1 (high), so the
// activations are stored de-interleaved: 16 even-k values, then 16 odd-k values.
void pack_activations(const TensorView& x, bool deinterleave, std::vector<float>& xp) {
  const int64_t M = x.shape[0], K = x.shape[1];
  xp.resize(M * K);
  for (int64_t m = 0; m < M; ++m) {
    float* dst = xp.data() + m * K;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t off = m * x.strides[0] + k;
      const float v = x.dtype == DType::kFloat32 ? x.ptr<float>()[off]
                                                 : bf16_to_float(x.ptr<uint16_t>()[off]);
      const int64_t at = deinterleave ? (k & ~31) + ((k & 1) << 4) + ((k & 31) >> 1) : k;
      dst[at] = v;
    }
  }
}

template <bool kSigned>
inline void int4_block(const uint8_t* w, __m512i zp, __m512& lo, __m512& hi) {
  const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
  __m512i l, h;
  if (kSigned) {
    l = _mm512_srai_epi32(_mm512_slli_epi32(b, 28), 28);
    h = _mm512_srai_epi32(_mm512_slli_epi32(b, 24), 28);
  } else {
    l = _mm512_sub_epi32(_mm512_and_si512(b, _mm512_set1_epi32(0xF)), zp);
    h = _mm512_sub_epi32(_mm512_srli_epi32(b, 4), zp);
  }
  lo = _mm512_cvtepi32_ps(l);
  hi = _mm512_cvtepi32_ps(h);
}

// acc[m] (16 lanes) += sum over the row's groups of scale_g * sum_k w_k * x[m, k].
template <int MB, int kBits, bool kSigned>
void row_dot(const uint8_t* wrow, const float* sc, const uint8_t* zrow, int64_t K, int64_t gsize,
             const float* xp, __m512 acc[MB]) {
  const int64_t groups = K / gsize;
  for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512 part[MB];
    for (int m = 0; m < MB; ++m) part[m] = _mm512_setzero_ps();
    const __m512i zp = _mm512_set1_epi32(zrow ? zrow[g] : 0);
    const int64_t k0 = g * gsize;
    if (kBits == 4) {
      for (int64_t k = k0; k < k0 + gsize; k += 32) {
        __m512 lo, hi;
        int4_block<kSigned>(wrow + k / 2, zp, lo, hi);
        for (int m = 0; m < MB; ++m) {
          part[m] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xp + m * K + k), part[m]);
          part[m] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xp + m * K + k + 16), part[m]);
        }
      }
    } else {
      for (int64_t k = k0; k < k0 + gsize; k += 16) {
        const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wrow + k));
        const __m512i wi = kSigned ? _mm512_cvtepi8_epi32(b)
                                   : _mm512_sub_epi32(_mm512_cvtepu8_epi32(b), zp);
        const __m512 w = _mm512_cvtepi32_ps(wi);
        for (int m = 0; m < MB; ++m)
          part[m] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xp + m * K + k), part[m]);
      }
    }
    const __m512 s = _mm512_set1_ps(sc[g]);
    for (int m = 0; m < MB; ++m) acc[m] = _mm512_fmadd_ps(part[m], s, acc[m]);
  }
}

template <int kBits, bool kSigned>
void run(const TensorView& qweight, const TensorView& scales, const TensorView* zero_points,
         const TensorView* bias, int64_t group_size, const float* xp, int64_t M, int64_t K,
         const TensorView& out) {
  const int64_t N = qweight.shape[0], groups = scales.shape[1];
  const int64_t gsize = group_size == K ? K : group_size;
  parallel_for(N, 8, [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n) {
      const uint8_t* wrow = qweight.ptr<uint8_t>() + n * qweight.strides[0];
      const float* sc = scales.ptr<float>() + n * groups;
      const uint8_t* zrow = zero_points ? zero_points->ptr<uint8_t>() + n * groups : nullptr;
      const float bn = bias ? bias->ptr<float>()[n] : 0.0f;
      for (int64_t m0 = 0; m0 < M; m0 += kMaxBlock) {
        const int mb = static_cast<int>(std::min<int64_t>(kMaxBlock, M - m0));
        __m512 acc[kMaxBlock];
        const float* xm = xp + m0 * K;
        switch (mb) {
          case 1: row_dot<1, kBits, kSigned>(wrow, sc, zrow, K, gsize, xm, acc); break;
          case 2: row_dot<2, kBits, kSigned>(wrow, sc, zrow, K, gsize, xm, acc); break;
          case 3: row_dot<3, kBits, kSigned>(wrow, sc, zrow, K, gsize, xm, acc); break;
          default: row_dot<4, kBits, kSigned>(wrow, sc, zrow, K, gsize, xm, acc); break;
        }
        for (int m = 0; m < mb; ++m) {
          const float y = _mm512_reduce_add_ps(acc[m]) + bn;
          const int64_t off = (m0 + m) * out.strides[0] + n;
          if (out.dtype == DType::kFloat32)
            out.ptr<float>()[off] = y;
          else
            out.ptr<uint16_t>()[off] = float_to_bf16(y);
        }
      }
    }
  });
}

}  // namespace

bool linear_weight_only_native(const TensorView& x, const TensorView& qweight,
                               const TensorView& scales, const TensorView* zero_points,
                               const TensorView* bias, Format fmt, int64_t group_size,
                               const TensorView& out) {
  if (active_isa() != Isa::kAVX512) return false;
  const FormatInfo& info = format_info(fmt);
  const int64_t M = x.shape[0], K = x.shape[1];
  const int64_t step = info.bits == 4 ? 32 : 16;
  if (K % step != 0 || (group_size != K && group_size % step != 0)) return false;
  thread_local std::vector<float> xp;
  pack_activations(x, info.bits == 4, xp);
  switch (fmt) {
    case Format::kInt8: run<8, true>(qweight, scales, zero_points, bias, group_size, xp.data(), M, K, out); break;
    case Format::kUInt8: run<8, false>(qweight, scales, zero_points, bias, group_size, xp.data(), M, K, out); break;
    case Format::kInt4: run<4, true>(qweight, scales, zero_points, bias, group_size, xp.data(), M, K, out); break;
    case Format::kUInt4: run<4, false>(qweight, scales, zero_points, bias, group_size, xp.data(), M, K, out); break;
  }
  return true;
}

}  // namespace cpu
}  // namespace tensorslim
