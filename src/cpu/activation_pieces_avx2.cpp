// Weight-only INT4 with the activations as three int8 pieces, on AVX2 (activation_pieces.h):
// the nibbles times a piece go through vpmaddubsw, whose pair sums cannot saturate here (at
// most 2 * 15 * 127 = 3810, and four of them added stay below 2^15), then vpmaddwd into int32;
// or, where the AVX2 kernels have it (cpu::avx2_vnni), through vpdpbusd straight into int32.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

#include "activation_pieces.h"
#include "half.h"
#include "hsum_avx2.h"
#include "parallel.h"
#include "tensorslim/quantize.h"
#include "vnni_dot.h"

namespace tensorslim {
namespace cpu {
namespace {

// 8 activations of row m at k (float32 or bfloat16) as float32.
inline __m256 load8(const TensorView& x, int64_t m, int64_t k) {
  const int64_t off = m * x.strides[0] + k;
  if (x.dtype == DType::kFloat32) return _mm256_loadu_ps(x.ptr<float>() + off);
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x.ptr<uint16_t>() + off));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

inline __m256 rne(__m256 v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }

// Row m: its step, or 0 where the row cannot be split (see activation_pieces.h).
float row_step(const TensorView& x, int64_t m, int64_t K) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const __m256 inf = _mm256_set1_ps(INFINITY);
  __m256 mx = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 8) {
    const __m256 a = _mm256_and_ps(load8(x, m, k), abs_mask);
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(a, inf, _CMP_NLT_UQ));  // Inf, or unordered: NaN
    mx = _mm256_max_ps(mx, a);
  }
  if (_mm256_movemask_ps(bad)) return 0.0f;
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, mx);
  const float top = *std::max_element(lanes, lanes + 8);
  if (top == 0.0f) return 1.0f;  // all pieces 0
  return top < 1e-30f ? 0.0f : top / 127.0f;
}

// 32 int32 values (four vectors, in order) as 32 int8 (each within [-127, 127]).
inline __m256i to_bytes(__m256i a, __m256i b, __m256i c, __m256i d) {
  // packs work per 128-bit lane: the bytes come out as a0-3 b0-3 c0-3 d0-3 a4-7 b4-7 ...
  const __m256i ab = _mm256_packs_epi32(a, b), cd = _mm256_packs_epi32(c, d);
  return _mm256_permutevar8x32_epi32(_mm256_packs_epi16(ab, cd), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

}  // namespace

bool split_activation_pieces_avx2(const TensorView& x, int64_t gsize, ActivationPieces& out) {
  const int64_t M = x.shape[0], K = x.shape[1], groups = K / gsize;
  out.q.resize(M * K * 3);
  out.step.resize(M);
  out.group_sums.resize(M * groups);
  const __m256 radix = _mm256_set1_ps(kPieceRadix);
  for (int64_t m = 0; m < M; ++m) {
    const float s = row_step(x, m, K);
    if (s == 0.0f) return false;
    out.step[m] = s;
    const __m256 sv = _mm256_set1_ps(s);
    int8_t* q = out.q.data() + m * K * 3;
    __m256i sum[3] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
    for (int64_t k = 0; k < K; k += kPieceBlock, q += 3 * kPieceBlock) {
      // Per 32 values of k (a quarter of the block), even and odd: the group sums run in k order.
      __m256i quarter[4][3];
      for (auto& qj : quarter)
        for (__m256i& v : qj) v = _mm256_setzero_si256();
      for (int half = 0; half < 2; ++half) {  // even k, then odd k
        for (int i = 0; i < 2; ++i) {          // 32 of the block's 64 even (odd) values
          __m256i p[3][4];
          for (int v = 0; v < 4; ++v) {
            // values k + 64i + 16v .. +15, the even (odd) 8 of them in order
            const int64_t k0 = k + 64 * i + 16 * v;
            const __m256 a = load8(x, m, k0), b = load8(x, m, k0 + 8);
            const __m256 pick = half ? _mm256_shuffle_ps(a, b, 0xDD) : _mm256_shuffle_ps(a, b, 0x88);
            const __m256 y = _mm256_div_ps(_mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(pick), 0xD8)), sv);
            const __m256 hf = rne(y);
            const __m256 t = _mm256_mul_ps(_mm256_sub_ps(y, hf), radix);  // |t| <= 127
            const __m256 l1f = rne(t);
            const __m256 l2f = rne(_mm256_mul_ps(_mm256_sub_ps(t, l1f), radix));
            p[0][v] = _mm256_cvtps_epi32(hf);
            p[1][v] = _mm256_cvtps_epi32(l1f);
            p[2][v] = _mm256_cvtps_epi32(l2f);
          }
          for (int j = 0; j < 3; ++j) {
            for (int v = 0; v < 4; ++v)  // v = 0, 1: k + 64i .. +31; v = 2, 3: the next 32
              quarter[2 * i + v / 2][j] = _mm256_add_epi32(quarter[2 * i + v / 2][j], p[j][v]);
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + j * kPieceBlock + half * 64 + 32 * i),
                                to_bytes(p[j][0], p[j][1], p[j][2], p[j][3]));
          }
        }
      }
      for (int qd = 0; qd < 4; ++qd) {
        for (int j = 0; j < 3; ++j) sum[j] = _mm256_add_epi32(sum[j], quarter[qd][j]);
        if ((k + 32 * (qd + 1)) % gsize == 0) {
          out.group_sums[m * groups + (k + 32 * qd) / gsize] =
              piece_group_sum(hsum_epi32(sum[0]), hsum_epi32(sum[1]), hsum_epi32(sum[2]));
          for (__m256i& v : sum) v = _mm256_setzero_si256();
        }
      }
    }
  }
  return true;
}

namespace {

// Output rows n .. n+R-1 for activation rows m0 .. m0+MB-1 (see the AVX-512 kernel). A step
// is one group of whole blocks, or (kHalves: groups of 32 or 64) one block whose two halves
// (values 0-63 and 64-127) are summed apart: lane i of a half holds its values 8i .. 8i+7 (even
// and odd k alike), so it takes the scale of group 8i / gsize within the half. Dot: NoVnni, or
// a vpdpbusd (vnni_dot.h), which sums each half in its own chain whether or not its groups
// need that (two dependent vpdpbusd per block and chain instead of four).
template <int R, int MB, bool kSigned, bool kHalves, class Dot>
void pieces_tile(const WeightOnlyProblem& p, const ActivationPieces& a, int64_t n, int64_t m0) {
  const int64_t K = p.K, groups = p.groups, gsize = p.gsize;
  const int64_t span = std::max(gsize, kPieceBlock), blocks = span / kPieceBlock;
  const int per_step = static_cast<int>(kPieceBlock / std::min(gsize, kPieceBlock));  // 1, 2 or 4
  const uint8_t* wrow[R];
  const float* sc[R];
  const uint8_t* zrow[R];
  for (int r = 0; r < R; ++r) {
    wrow[r] = p.qweight.ptr<uint8_t>() + (n + r) * p.qweight.strides[0];
    sc[r] = p.scales.ptr<float>() + (n + r) * groups;
    zrow[r] = p.zero_points ? p.zero_points->ptr<uint8_t>() + (n + r) * groups : nullptr;
  }
  const char* next = reinterpret_cast<const char*>(wrow[R - 1] + (R > 1 ? wrow[R - 1] - wrow[R - 2] : 0));
  const __m256i nib = _mm256_set1_epi8(0x0F), flip = _mm256_set1_epi8(static_cast<char>(0x88));
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256 c1 = _mm256_set1_ps(1.0f / kPieceRadix), c2 = _mm256_set1_ps(1.0f / (kPieceRadix * kPieceRadix));
  // The group of each lane of half 0 and half 1 (groups of 32: 4 per block; of 64: 2), read
  // where used to spare two registers.
  alignas(32) static constexpr int32_t kLaneGroup32[2][8] = {{0, 0, 0, 0, 1, 1, 1, 1}, {2, 2, 2, 2, 3, 3, 3, 3}};
  alignas(32) static constexpr int32_t kLaneGroup64[2][8] = {{0, 0, 0, 0, 0, 0, 0, 0}, {1, 1, 1, 1, 1, 1, 1, 1}};
  const int32_t(*lane_group)[8] = per_step == 4 ? kLaneGroup32 : kLaneGroup64;
  const __m128i scale_lanes = _mm_cmpgt_epi32(_mm_set1_epi32(per_step), _mm_setr_epi32(0, 1, 2, 3));
  __m256 acc[R][MB];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) acc[r][m] = _mm256_setzero_ps();
  constexpr bool kVnni = !std::is_same_v<Dot, NoVnni>;
  constexpr int H = kHalves || kVnni ? 2 : 1;
  // One row at a time through the step: its 3 * H * MB accumulators and 4 decoded vectors stay
  // in the 16 registers (all R rows' at once spilled).
  for (int64_t step = 0; step < K / span; ++step) {
    // Groups of 32 / 64: the next R rows' scales as one stream (as on AVX-512).
    if (per_step > 1)
      _mm_prefetch(reinterpret_cast<const char*>(sc[R - 1] + groups) + step * per_step * 4 * R, _MM_HINT_T1);
    for (int r = 0; r < R; ++r) {
      __m256i part[MB][H][3];
      for (int m = 0; m < MB; ++m)
        for (int h = 0; h < H; ++h)
          for (int j = 0; j < 3; ++j) part[m][h][j] = _mm256_setzero_si256();
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t k = (step * blocks + b) * kPieceBlock;
        _mm_prefetch(next + k / 2 * R + 64 * r, _MM_HINT_T1);
        __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wrow[r] + k / 2));
        __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wrow[r] + k / 2 + 32));
        if (kSigned) {  // code + 8 in 0..15
          v0 = _mm256_xor_si256(v0, flip);
          v1 = _mm256_xor_si256(v1, flip);
        }
        const __m256i lo0 = _mm256_and_si256(v0, nib), hi0 = _mm256_and_si256(_mm256_srli_epi16(v0, 4), nib);
        const __m256i lo1 = _mm256_and_si256(v1, nib), hi1 = _mm256_and_si256(_mm256_srli_epi16(v1, 4), nib);
        for (int m = 0; m < MB; ++m) {
          const __m256i* x = reinterpret_cast<const __m256i*>(a.q.data() + ((m0 + m) * K + k) * 3);
          for (int j = 0; j < 3; ++j) {
            const __m256i* xj = x + 4 * j;  // even 0-31, even 32-63, odd 0-31, odd 32-63
            if constexpr (kVnni) {
              part[m][0][j] = Dot::dpbusd(Dot::dpbusd(part[m][0][j], lo0, _mm256_load_si256(xj)), hi0,
                                          _mm256_load_si256(xj + 2));
              part[m][1][j] = Dot::dpbusd(Dot::dpbusd(part[m][1][j], lo1, _mm256_load_si256(xj + 1)), hi1,
                                          _mm256_load_si256(xj + 3));
              continue;
            }
            const __m256i pairs0 = _mm256_add_epi16(_mm256_maddubs_epi16(lo0, _mm256_load_si256(xj)),
                                                    _mm256_maddubs_epi16(hi0, _mm256_load_si256(xj + 2)));
            const __m256i pairs1 = _mm256_add_epi16(_mm256_maddubs_epi16(lo1, _mm256_load_si256(xj + 1)),
                                                    _mm256_maddubs_epi16(hi1, _mm256_load_si256(xj + 3)));
            if (kHalves) {
              part[m][0][j] = _mm256_add_epi32(part[m][0][j], _mm256_madd_epi16(pairs0, ones));
              part[m][H - 1][j] = _mm256_add_epi32(part[m][H - 1][j], _mm256_madd_epi16(pairs1, ones));
            } else {
              part[m][0][j] = _mm256_add_epi32(part[m][0][j], _mm256_madd_epi16(_mm256_add_epi16(pairs0, pairs1), ones));
            }
          }
        }
      }
      __m256 s[2];
      if (kHalves) {  // the step's 2 or 4 group scales, spread over the lanes
        const __m256 v = _mm256_castps128_ps256(_mm_maskload_ps(sc[r] + step * per_step, scale_lanes));
        for (int h = 0; h < 2; ++h)
          s[h] = _mm256_permutevar8x32_ps(v, _mm256_load_si256(reinterpret_cast<const __m256i*>(lane_group[h])));
      } else {
        s[0] = _mm256_set1_ps(sc[r][step]);
      }
      if constexpr (kVnni && !kHalves) {  // one group over both halves: their sums as one, exact in int32
        for (int m = 0; m < MB; ++m)
          for (int j = 0; j < 3; ++j) part[m][0][j] = _mm256_add_epi32(part[m][0][j], part[m][1][j]);
      }
      constexpr int HS = kHalves ? 2 : 1;  // sums that take a scale of their own
      for (int m = 0; m < MB; ++m)
        for (int h = 0; h < HS; ++h) {
          const __m256 f = _mm256_fmadd_ps(
              _mm256_cvtepi32_ps(part[m][h][2]), c2,
              _mm256_fmadd_ps(_mm256_cvtepi32_ps(part[m][h][1]), c1, _mm256_cvtepi32_ps(part[m][h][0])));
          acc[r][m] = _mm256_fmadd_ps(f, s[h], acc[r][m]);
        }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) {
      // The zero point's share: sum over groups of scale * zp * (the pieces' group sum).
      const float* qs = a.group_sums.data() + (m0 + m) * groups;
      __m256 corr = _mm256_setzero_ps();
      if (kSigned || zrow[r])
        for (int64_t g = 0; g < groups; g += 8) {
          const int64_t left = std::min<int64_t>(8, groups - g);
          const __m256i use = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(left)),
                                                 _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
          __m256 w = _mm256_maskload_ps(sc[r] + g, use);
          if (kSigned) {
            w = _mm256_mul_ps(w, _mm256_set1_ps(8.0f));
          } else {
            uint64_t z = 0;
            std::memcpy(&z, zrow[r] + g, left);
            w = _mm256_mul_ps(w, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<int64_t>(z)))));
          }
          corr = _mm256_fmadd_ps(w, _mm256_maskload_ps(qs + g, use), corr);
        }
      const double dot = static_cast<double>(hsum_ps(acc[r][m])) - hsum_ps(corr);
      const float y = static_cast<float>(dot * a.step[m0 + m]) + (p.bias ? p.bias->ptr<float>()[n + r] : 0.0f);
      const int64_t off = (m0 + m) * p.out.strides[0] + n + r;
      if (p.out.dtype == DType::kFloat32)
        p.out.ptr<float>()[off] = y;
      else
        p.out.ptr<uint16_t>()[off] = float_to_bf16(y);
    }
}

template <int R, bool kSigned, bool kHalves, class Dot>
void pieces_rows(const WeightOnlyProblem& p, const ActivationPieces& a, int64_t n, int64_t M) {
  // With vpdpbusd each row keeps 6 chains (3 pieces x 2 halves): 2 rows per tile fill the 16
  // registers (4096 x 4096 .. 4096 x 11008 at 2-8 rows, Zen 4's EVEX form: 4 per tile 1.04-1.38x
  // the float kernel, 2 per tile 1.03-1.55x, 3 alike within this VM's noise).
  constexpr int64_t kRows = std::is_same_v<Dot, NoVnni> ? 4 : 2;
  for (int64_t m0 = 0; m0 < M; m0 += kRows) {  // activation rows kRows at a time
    switch (std::min<int64_t>(kRows, M - m0)) {
      case 1: pieces_tile<R, 1, kSigned, kHalves, Dot>(p, a, n, m0); break;
      case 2: pieces_tile<R, 2, kSigned, kHalves, Dot>(p, a, n, m0); break;
      case 3: if constexpr (kRows >= 3) pieces_tile<R, 3, kSigned, kHalves, Dot>(p, a, n, m0); break;
      default: if constexpr (kRows >= 4) pieces_tile<R, 4, kSigned, kHalves, Dot>(p, a, n, m0); break;
    }
  }
}

template <bool kSigned, bool kHalves, class Dot>
void pieces_run(const WeightOnlyProblem& p, const ActivationPieces& a, int64_t M) {
  const int64_t N = p.qweight.shape[0];
  // Below ~256K multiply-adds one thread finishes before a second would be awake (torch's
  // OpenMP team wakes fast: 2M -> 256K took INT4 batch 1 at 1024 x 1024 from 0.044 to 0.031 ms
  // on AVX-512 and 0.055 to 0.042 ms capped at AVX2, 384 x 1536 from 0.037 to 0.026 ms).
  const int64_t grain = std::max<int64_t>(8, (int64_t{1} << 18) / std::max<int64_t>(p.K * M, 1));
  parallel_for(N, grain, [&](int64_t b, int64_t e) {
    int64_t n = b;
    if (M == 1)
      for (; n + 4 <= e; n += 4) pieces_rows<4, kSigned, kHalves, Dot>(p, a, n, M);
    for (; n < e; ++n) pieces_rows<1, kSigned, kHalves, Dot>(p, a, n, M);
  });
}

template <bool kSigned, class Dot>
void pieces_run(const WeightOnlyProblem& p, const ActivationPieces& a, int64_t M) {
  if (p.gsize < kPieceBlock)
    pieces_run<kSigned, true, Dot>(p, a, M);
  else
    pieces_run<kSigned, false, Dot>(p, a, M);
}

template <class Dot>
void pieces_run(const WeightOnlyProblem& p, const ActivationPieces& a, Format fmt, int64_t M) {
  if (fmt == Format::kInt4)
    pieces_run<true, Dot>(p, a, M);
  else
    pieces_run<false, Dot>(p, a, M);
}

}  // namespace

void linear_pieces_avx2(const WeightOnlyProblem& p, const ActivationPieces& a, Format fmt, int64_t M) {
  with_vnni256(avx2_vnni(), [&](auto dot) { pieces_run<decltype(dot)>(p, a, fmt, M); });
}

}  // namespace cpu
}  // namespace tensorslim
