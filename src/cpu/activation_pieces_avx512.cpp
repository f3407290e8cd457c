// Integer weight-only (INT4 and INT8) with the activations as three int8 pieces, on AVX-512
// VNNI (enabled per function; this file is compiled with -mavx512f/bw/vl/dq). What and why:
// activation_pieces.h.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "activation_pieces.h"
#include "half.h"
#include "parallel.h"
#include "vnni_dot.h"

namespace tensorslim {
namespace cpu {
namespace {

// 16 activations of row m at k (float32 or bfloat16) as float32.
inline __m512 load16(const TensorView& x, int64_t m, int64_t k) {
  const int64_t off = m * x.strides[0] + k;
  if (x.dtype == DType::kFloat32) return _mm512_loadu_ps(x.ptr<float>() + off);
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.ptr<uint16_t>() + off));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

inline __m512 rne(__m512 v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }

// Row m: its step, or 0 where the row cannot be split (NaN / Inf, or a tiny nonzero maximum).
float row_step(const TensorView& x, int64_t m, int64_t K) {
  const __m512 inf = _mm512_set1_ps(INFINITY);
  __m512 mx = _mm512_setzero_ps();
  __mmask16 bad = 0;
  for (int64_t k = 0; k < K; k += 16) {
    const __m512 a = _mm512_abs_ps(load16(x, m, k));
    bad |= _mm512_cmp_ps_mask(a, inf, _CMP_NLT_UQ);  // Inf, or unordered: NaN
    mx = _mm512_max_ps(mx, a);
  }
  const float top = _mm512_reduce_max_ps(mx);
  if (bad) return 0.0f;
  if (top == 0.0f) return 1.0f;  // all pieces 0
  return top < 1e-30f ? 0.0f : top / 127.0f;
}

// The three pieces of 16 values y = x / s, as int32 lanes.
inline void pieces16(__m512 y, __m512i& h, __m512i& l1, __m512i& l2) {
  const __m512 hf = rne(y);
  const __m512 t = _mm512_mul_ps(_mm512_sub_ps(y, hf), _mm512_set1_ps(kPieceRadix));  // |t| <= 127
  const __m512 l1f = rne(t);
  const __m512 l2f = rne(_mm512_mul_ps(_mm512_sub_ps(t, l1f), _mm512_set1_ps(kPieceRadix)));
  h = _mm512_cvtps_epi32(hf);
  l1 = _mm512_cvtps_epi32(l1f);
  l2 = _mm512_cvtps_epi32(l2f);
}

inline int64_t int_sum(__m512i v) { return _mm512_reduce_add_epi32(v); }

}  // namespace

bool split_activation_pieces_avx512(const TensorView& x, int64_t gsize, bool even_odd, ActivationPieces& out) {
  const int64_t M = x.shape[0], K = x.shape[1], groups = K / gsize;
  out.q.resize(M * K * 3);
  out.step.resize(M);
  out.group_sums.resize(M * groups);
  // Lanes 0..15 of (a, b) at even / odd positions: the INT4 block's low / high nibble order.
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  for (int64_t m = 0; m < M; ++m) {
    const float s = row_step(x, m, K);
    if (s == 0.0f) return false;
    out.step[m] = s;
    const __m512 sv = _mm512_set1_ps(s);
    int8_t* q = out.q.data() + m * K * 3;
    __m512i sum[3] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
    for (int64_t k = 0; k < K; k += kPieceBlock, q += 3 * kPieceBlock) {
      for (int i = 0; i < 4; ++i) {  // 32 values at a time (every group size but 16 is a multiple)
        const __m512 a = load16(x, m, k + 32 * i), b = load16(x, m, k + 32 * i + 16);
        for (int half = 0; half < 2; ++half) {
          // even_odd: the block's even k, then its odd k; else k in order.
          const __m512 v = even_odd ? _mm512_permutex2var_ps(a, half ? odd : even, b) : half ? b : a;
          const int64_t at = even_odd ? half * 64 + 16 * i : 32 * i + 16 * half;
          __m512i p[3];
          pieces16(_mm512_div_ps(v, sv), p[0], p[1], p[2]);
          for (int j = 0; j < 3; ++j) {
            sum[j] = _mm512_add_epi32(sum[j], p[j]);
            _mm_storeu_si128(reinterpret_cast<__m128i*>(q + j * kPieceBlock + at), _mm512_cvtepi32_epi8(p[j]));
          }
        }
        if (gsize == 16) {  // (even_odd) lanes 0-7 of both halves came from a, 8-15 from b
          for (int half = 0; half < 2; ++half) {
            const __mmask16 lanes = half ? 0xFF00 : 0x00FF;
            out.group_sums[m * groups + (k + 32 * i) / 16 + half] =
                piece_group_sum(_mm512_mask_reduce_add_epi32(lanes, sum[0]), _mm512_mask_reduce_add_epi32(lanes, sum[1]),
                                _mm512_mask_reduce_add_epi32(lanes, sum[2]));
          }
          for (__m512i& v : sum) v = _mm512_setzero_si512();
        } else if ((k + 32 * (i + 1)) % gsize == 0) {
          out.group_sums[m * groups + (k + 32 * i) / gsize] =
              piece_group_sum(int_sum(sum[0]), int_sum(sum[1]), int_sum(sum[2]));
          for (__m512i& v : sum) v = _mm512_setzero_si512();
        }
      }
    }
  }
  return true;
}

namespace {

// Output rows n .. n+R-1 for activation rows m0 .. m0+MB-1. Per group, each (row, activation
// row) pair keeps one int32 accumulator per piece; the group's float sum is then scaled.
// Not inlined: inlined into pieces_run's loop, GCC 12 allocated its registers worse (batch 1,
// 4096 x 4096: 0.221-0.228 ms against 0.200-0.207 as a function of its own).
// kFp4: E2M1 codes (NVFP4 / MXFP4), read as u = 2 * value + 12 in 0..24 through a byte table;
// scale_rows then holds the R rows' group scales already decoded and halved (fp4_scale_rows).
template <int R, int MB, int kBits, bool kSigned, int kPerStep, bool kFp4>
__attribute__((target("avx512vnni"), noinline)) void pieces_tile(const WeightOnlyProblem& p,
                                                                  const ActivationPieces& a, int64_t n,
                                                                  int64_t m0, const float* scale_rows) {
  // A step is one group of whole blocks, or (4-bit groups of 16, 32 or 64) one block of several
  // groups: lane l of a block's sums covers its values 8l .. 8l+7 (even and odd k alike), so
  // it takes the scale of group 8l / gsize within the block.
  // kPerStep: groups per step (1, or 2 / 4 / 8 for groups of 64 / 32 / 16), fixed at compile time.
  const int64_t K = p.K, groups = p.groups, steps = groups / kPerStep;
  const int64_t blocks = kPerStep == 1 ? p.gsize / kPieceBlock : 1;
  // 8l / gsize: the group of lane l within the block, for groups of 64 (2 per step), 32 (4), 16 (8).
  alignas(64) static constexpr int32_t kLaneGroup[3][16] = {{0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1},
                                                            {0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3},
                                                            {0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7}};
  // The unsigned codes' offset from the signed values: INT4 + 8, INT8 + 128, E2M1 2 * v + 12.
  constexpr float kOffset = kFp4 ? 12.0f : kBits == 4 ? 8.0f : 128.0f;
  const uint8_t* wrow[R];
  const float* sc[R];
  const uint8_t* zrow[R];
  for (int r = 0; r < R; ++r) {
    wrow[r] = p.qweight.ptr<uint8_t>() + (n + r) * p.qweight.strides[0];
    sc[r] = kFp4 ? scale_rows + r * groups : p.scales.ptr<float>() + (n + r) * groups;
    zrow[r] = p.zero_points ? p.zero_points->ptr<uint8_t>() + (n + r) * groups : nullptr;
  }
  // The next R rows (they follow these in memory) go to L2 as one linear stream (as the float
  // kernels do: R short streams alone leave memory idle between pages).
  const char* next = reinterpret_cast<const char*>(wrow[R - 1] + (R > 1 ? wrow[R - 1] - wrow[R - 2] : 0));
  const __m512i nib = _mm512_set1_epi8(0x0F), flip = _mm512_set1_epi8(static_cast<char>(0x88));
  const __m512i sign = _mm512_set1_epi8(static_cast<char>(0x80));
  // E2M1 code c -> 2 * value(c) + 12 (values 0, 0.5, 1, 1.5, 2, 3, 4, 6, then their negatives).
  const __m512i e2m1_u = _mm512_broadcast_i32x4(_mm_setr_epi8(12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0));
  const __m512 c1 = _mm512_set1_ps(1.0f / kPieceRadix), c2 = _mm512_set1_ps(1.0f / (kPieceRadix * kPieceRadix));
  __m512 acc[R][MB];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_setzero_ps();
  const int8_t* xq = a.q.data() + m0 * K * 3;
  for (int64_t step = 0; step < steps; ++step) {
    __m512i part[R][MB][3];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MB; ++m)
        for (int j = 0; j < 3; ++j) part[r][m][j] = _mm512_setzero_si512();
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t k = (step * blocks + b) * kPieceBlock;
      for (int i = 0; i < R * kBits / 4; ++i) _mm_prefetch(next + k * kBits / 8 * R + 64 * i, _MM_HINT_T1);
      // Groups of 32 / 64: the next R rows' scales (1/4 or 1/8 of the weight bytes) as one
      // stream too; without it R short scale streams went unprefetched (weights from memory,
      // Zen 5, 11008 x 4096 g32 batch 1: 1.70 -> 0.64 ms).
      if (kPerStep > 1 && !kFp4)
        _mm_prefetch(reinterpret_cast<const char*>(sc[R - 1] + groups) + step * kPerStep * 4 * R, _MM_HINT_T1);
      for (int r = 0; r < R; ++r) {
        // lo, hi: the block's codes as u8 (signed ones + 8 or + 128), in the pieces' order.
        __m512i lo, hi;
        if (kFp4) {
          const __m512i v = _mm512_loadu_si512(wrow[r] + k / 2);
          lo = _mm512_shuffle_epi8(e2m1_u, _mm512_and_si512(v, nib));
          hi = _mm512_shuffle_epi8(e2m1_u, _mm512_and_si512(_mm512_srli_epi16(v, 4), nib));
        } else if (kBits == 4) {
          __m512i v = _mm512_loadu_si512(wrow[r] + k / 2);
          if (kSigned) v = _mm512_xor_si512(v, flip);  // code + 8 in 0..15
          lo = _mm512_and_si512(v, nib);
          hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
        } else {
          lo = _mm512_loadu_si512(wrow[r] + k);
          hi = _mm512_loadu_si512(wrow[r] + k + 64);
          if (kSigned) {  // code + 128 in 0..255
            lo = _mm512_xor_si512(lo, sign);
            hi = _mm512_xor_si512(hi, sign);
          }
        }
        for (int m = 0; m < MB; ++m) {
          const __m512i* x = reinterpret_cast<const __m512i*>(xq + (m * K + k) * 3);
          for (int j = 0; j < 3; ++j)
            part[r][m][j] = dpbusd(dpbusd(part[r][m][j], lo, _mm512_load_si512(x + 2 * j)), hi,
                                   _mm512_load_si512(x + 2 * j + 1));
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      __m512 s;
      if constexpr (kPerStep == 1)
        s = _mm512_set1_ps(sc[r][step]);
      else
        s = _mm512_permutexvar_ps(_mm512_load_si512(kLaneGroup[kPerStep == 8 ? 2 : kPerStep / 4]),
                                  _mm512_maskz_loadu_ps((1u << kPerStep) - 1, sc[r] + step * kPerStep));
      for (int m = 0; m < MB; ++m) {
        const __m512 f = _mm512_fmadd_ps(
            _mm512_cvtepi32_ps(part[r][m][2]), c2,
            _mm512_fmadd_ps(_mm512_cvtepi32_ps(part[r][m][1]), c1, _mm512_cvtepi32_ps(part[r][m][0])));
        acc[r][m] = _mm512_fmadd_ps(f, s, acc[r][m]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) {
      // The zero point's share: sum over groups of scale * zp * (the pieces' group sum).
      const float* qs = a.group_sums.data() + (m0 + m) * groups;
      __m512 corr = _mm512_setzero_ps();
      for (int64_t g = 0; g < groups; g += 16) {
        const __mmask16 use = groups - g >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (groups - g)) - 1);
        __m512 w = _mm512_maskz_loadu_ps(use, sc[r] + g);
        if (kSigned || kFp4) {
          w = _mm512_mul_ps(w, _mm512_set1_ps(kOffset));
        } else if (zrow[r]) {
          const __m128i z = _mm_maskz_loadu_epi8(use, zrow[r] + g);
          w = _mm512_mul_ps(w, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(z)));
        } else {
          break;
        }
        corr = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(use, qs + g), corr);
      }
      const double dot = static_cast<double>(_mm512_reduce_add_ps(acc[r][m])) - _mm512_reduce_add_ps(corr);
      const float y = static_cast<float>(dot * a.step[m0 + m]) + (p.bias ? p.bias->ptr<float>()[n + r] : 0.0f);
      const int64_t off = (m0 + m) * p.out.strides[0] + n + r;
      if (p.out.dtype == DType::kFloat32)
        p.out.ptr<float>()[off] = y;
      else
        p.out.ptr<uint16_t>()[off] = float_to_bf16(y);
    }
}

template <int R, int kBits, bool kSigned, int kPerStep, bool kFp4>
void pieces_rows(const WeightOnlyProblem& p, const ActivationPieces& a, int64_t n, int64_t m0, int64_t mb,
                 const float* scale_rows) {
  switch (mb) {
    case 1: return pieces_tile<R, 1, kBits, kSigned, kPerStep, kFp4>(p, a, n, m0, scale_rows);
    case 2: return pieces_tile<R, 2, kBits, kSigned, kPerStep, kFp4>(p, a, n, m0, scale_rows);
    case 3: return pieces_tile<R, 3, kBits, kSigned, kPerStep, kFp4>(p, a, n, m0, scale_rows);
    default: return pieces_tile<R, 4, kBits, kSigned, kPerStep, kFp4>(p, a, n, m0, scale_rows);
  }
}

// The R rows' group scales from n0 on, decoded and times s.factor, into rows of `groups`.
void fp4_scale_rows(const Fp4Scales& s, int64_t n0, int R, int64_t groups, AlignedFloats& out) {
  out.resize(R * groups);
  for (int r = 0; r < R; ++r) fp4_decode_scales_avx512(s.codes + (n0 + r) * groups, groups, s, out.data() + r * groups);
}

// R weight rows per step, activation rows 4 at a time: R * 4 * 3 int32 accumulators fit the 32
// registers at R = 2 (one pass with all 8 rows, R = 1, spilled: 1.5x slower at batch 8).
template <int kBits, bool kSigned, int kPerStep, bool kFp4 = false>
void pieces_run(const WeightOnlyProblem& p, const ActivationPieces& a, int64_t M, const Fp4Scales* fp4 = nullptr) {
  const int64_t N = p.qweight.shape[0];
  // Below ~256K multiply-adds one thread finishes before a second would be awake (torch's
  // OpenMP team wakes fast: 2M -> 256K took INT4 batch 1 at 1024 x 1024 from 0.044 to 0.031 ms
  // on AVX-512 and 0.055 to 0.042 ms capped at AVX2, 384 x 1536 from 0.037 to 0.026 ms).
  const int64_t grain = std::max<int64_t>(8, (int64_t{1} << 18) / std::max<int64_t>(p.K * M, 1));
  parallel_for(N, grain, [&](int64_t b, int64_t e) {
    thread_local AlignedFloats scale_rows;
    auto rows = [&](auto r_tag, int64_t n0) {
      constexpr int R = decltype(r_tag)::value;
      if constexpr (kFp4) fp4_scale_rows(*fp4, n0, R, p.groups, scale_rows);
      for (int64_t m0 = 0; m0 < M; m0 += 4)
        pieces_rows<R, kBits, kSigned, kPerStep, kFp4>(p, a, n0, m0, std::min<int64_t>(4, M - m0),
                                                       scale_rows.data());
    };
    int64_t n = b;
    if (M == 1)
      for (; n + 4 <= e; n += 4) rows(std::integral_constant<int, 4>(), n);
    else
      for (; n + 2 <= e; n += 2) rows(std::integral_constant<int, 2>(), n);
    for (; n < e; ++n) rows(std::integral_constant<int, 1>(), n);
  });
}

// Groups per step: 1 for whole-block groups, 2 or 4 for INT4 groups of 64 or 32.
template <int kBits, bool kSigned>
void pieces_run(const WeightOnlyProblem& p, const ActivationPieces& a, int64_t M) {
  if (p.gsize == 32)
    pieces_run<kBits, kSigned, 4>(p, a, M);
  else if (p.gsize == 64)
    pieces_run<kBits, kSigned, 2>(p, a, M);
  else
    pieces_run<kBits, kSigned, 1>(p, a, M);
}

}  // namespace

void fp4_decode_scales_avx512(const uint8_t* codes, int64_t n, const Fp4Scales& s, float* out) {
  const __m512 factor = _mm512_set1_ps(s.factor), nan = _mm512_set1_ps(NAN);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 in = n - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - i)) - 1);
    const __m512i b = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(in, codes + i));
    __m512 v;
    if (s.e4m3) {  // S.EEEE.MMM, bias 7: 2^(e-7) (1 + m/8); e = 0: m 2^-9; S.1111.111 NaN
      const __m512i mag = _mm512_and_si512(b, _mm512_set1_epi32(0x7F));
      const __m512 normal = _mm512_castsi512_ps(_mm512_add_epi32(_mm512_slli_epi32(mag, 20), _mm512_set1_epi32(120 << 23)));
      const __m512 sub = _mm512_mul_ps(_mm512_cvtepi32_ps(mag), _mm512_set1_ps(0x1p-9f));
      v = _mm512_mask_blend_ps(_mm512_cmplt_epi32_mask(mag, _mm512_set1_epi32(8)), normal, sub);
      v = _mm512_mask_mov_ps(v, _mm512_cmpeq_epi32_mask(mag, _mm512_set1_epi32(0x7F)), nan);
      v = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(v),
                                              _mm512_slli_epi32(_mm512_and_si512(b, _mm512_set1_epi32(0x80)), 24)));
    } else {  // 2^(e-127); 0: 2^-127 (subnormal), 255: NaN
      v = _mm512_castsi512_ps(_mm512_slli_epi32(b, 23));
      v = _mm512_mask_mov_ps(v, _mm512_cmpeq_epi32_mask(b, _mm512_setzero_si512()), _mm512_set1_ps(0x1p-127f));
      v = _mm512_mask_mov_ps(v, _mm512_cmpeq_epi32_mask(b, _mm512_set1_epi32(255)), nan);
    }
    _mm512_mask_storeu_ps(out + i, in, _mm512_mul_ps(v, factor));
  }
}

void linear_fp4_pieces_avx512(const WeightOnlyProblem& p, const ActivationPieces& a, const Fp4Scales& s, int64_t M) {
  if (p.gsize == 16)
    pieces_run<4, true, 8, true>(p, a, M, &s);
  else
    pieces_run<4, true, 4, true>(p, a, M, &s);
}

void linear_pieces_avx512(const WeightOnlyProblem& p, const ActivationPieces& a, Format fmt, int64_t M) {
  switch (fmt) {
    case Format::kInt4: return pieces_run<4, true>(p, a, M);
    case Format::kUInt4: return pieces_run<4, false>(p, a, M);
    case Format::kInt8: return pieces_run<8, true>(p, a, M);
    default: return pieces_run<8, false>(p, a, M);
  }
}

}  // namespace cpu
}  // namespace tensorslim
