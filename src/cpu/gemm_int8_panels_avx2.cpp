// Exact INT8 GEMM on AVX2 CPUs (compiled with -mavx2 -mfma), in a GEMM layout: panels of 8
// output columns x 4 k (32 bytes: column j's 4 values at bytes 4j..4j+3), so one vector product
// adds 4 k into 8 outputs and no horizontal sums are left; each activation row reads 4 codes per
// step as one broadcast. Three products, all exact:
// - with 256-bit vpdpbusd (cpu::avx2_vnni: AVX-VNNI, or AVX512-VNNI's EVEX form), any weight
//   codes: the uint8 codes q as they are times the weights, summed in int32, minus zp * sum w
//   after;
// - without it, codes in [-64, 64] (weight_qmax=64, the configs' default on these CPUs): the
//   same on vpmaddubsw + vpmaddwd (a pair sums to at most 2 * 255 * 64 = 32640, inside the
//   int16 it saturates at): no sign per product, no code copy, 6 x 16 tiles. Both only from a
//   packed copy (linear_int8_avx2_pack) or with the row sums made per call; the copy's header
//   says whether the codes are that narrow;
// - without it, any weight codes: the GEMV's vpmaddubsw(|w|, sign(c, w)) (gemm_int8_avx2.cpp)
//   with codes c in [-127, 127] (int8_codes_avx2.h: the shift and the exact corrections), 4 x 16
//   tiles.
// The weight is packed per call unless a packed copy is given. The rescale is the reference's
// expression in its order.
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "parallel.h"
#include "tensorslim/gemm_int8.h"
#include "int8_codes_avx2.h"
#include "tensorslim/quantize.h"
#include "transpose8_avx2.h"
#include "vnni_dot.h"

namespace tensorslim {
namespace cpu {
namespace {

constexpr int kMR = 4;    // activation rows per register tile
constexpr int kNR = 16;   // output columns per register tile (two 8-column panels)
constexpr int64_t kRowBlock = 64;  // activation rows per task

// Panels of 8 weight rows: [N8][Kq][8 columns][4 k], zero past N and K. Whole panels move
// 32 k at a time as an 8 x 8 transpose of 4-byte units.
void pack_weight(const int8_t* w, int64_t N, int64_t K, int64_t Kq, int8_t* dst, int64_t p0, int64_t p1) {
  for (int64_t p = p0; p < p1; ++p) {
    int8_t* panel = dst + p * Kq * 32;
    int64_t k0 = 0;
    if (p * 8 + 8 <= N) {
      for (; k0 + 32 <= K; k0 += 32) {
        __m256i v[8];
        for (int j = 0; j < 8; ++j)
          v[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + (p * 8 + j) * K + k0));
        transpose8(v);
        for (int q = 0; q < 8; ++q)
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(panel + (k0 / 4 + q) * 32), v[q]);
      }
    }
    std::memset(panel + (k0 / 4) * 32, 0, (Kq - k0 / 4) * 32);
    for (int j = 0; j < 8; ++j) {
      const int64_t n = p * 8 + j;
      if (n >= N) break;
      const int8_t* row = w + n * K;
      for (int64_t k = k0; k < K; ++k) panel[(k >> 2) * 32 + j * 4 + (k & 3)] = row[k];
    }
  }
}

// acc[r][h] (8 columns each) = sum over k of c'[r] x panel h, for MR rows and NP panels.
template <int MR, int NP>
void tile(const int8_t* a, int64_t lda, const int8_t* b0, const int8_t* b1, int64_t Kq,
          int32_t* acc_out /* [MR][16] */) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[MR][NP];
  for (int r = 0; r < MR; ++r)
    for (int h = 0; h < NP; ++h) acc[r][h] = _mm256_setzero_si256();
  for (int64_t q = 0; q < Kq; ++q) {
    __m256i w[NP], wabs[NP];
    w[0] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b0 + q * 32));
    if (NP == 2) w[NP - 1] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b1 + q * 32));
    for (int h = 0; h < NP; ++h) wabs[h] = _mm256_abs_epi8(w[h]);  // -128 -> 128 as unsigned
    for (int r = 0; r < MR; ++r) {
      int32_t four;
      std::memcpy(&four, a + r * lda + q * 4, 4);
      const __m256i c = _mm256_set1_epi32(four);
      for (int h = 0; h < NP; ++h) {
        const __m256i pairs = _mm256_maddubs_epi16(wabs[h], _mm256_sign_epi8(c, w[h]));
        acc[r][h] = _mm256_add_epi32(acc[r][h], _mm256_madd_epi16(pairs, ones));
      }
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int h = 0; h < NP; ++h)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc_out + r * 16 + h * 8), acc[r][h]);
}

template <int NP>
void tile_rows(int mr, const int8_t* a, int64_t lda, const int8_t* b0, const int8_t* b1, int64_t Kq,
               int32_t* acc) {
  switch (mr) {
    case 1: return tile<1, NP>(a, lda, b0, b1, Kq, acc);
    case 2: return tile<2, NP>(a, lda, b0, b1, Kq, acc);
    case 3: return tile<3, NP>(a, lda, b0, b1, Kq, acc);
    default: return tile<4, NP>(a, lda, b0, b1, Kq, acc);
  }
}

// The weight panels prefetched this many bytes ahead, one line per step: the hardware
// prefetcher alone left the 1-8-row tiles waiting on L3 (4096 x 4096 from L3, 2 threads, 4 /
// 8 rows: 0.675 / 0.952 -> 0.441 / 0.781 ms; 512 / 1024 bytes ahead in between).
constexpr int64_t kAhead = 2048;

// acc + the 4-product sums of u's unsigned and s's signed bytes: Dot's vpdpbusd, or (NoVnni)
// vpmaddubsw + vpmaddwd, exact where no pair of products passes int16 (codes in [-64, 64]
// against uint8 codes).
template <class Dot>
inline __m256i dot4(__m256i acc, __m256i u, __m256i s) {
  if constexpr (std::is_same_v<Dot, NoVnni>)
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
  else
    return Dot::dpbusd(acc, u, s);
}

// The product on the codes as they are: acc[r][h] = sum over k of q[r][k] x panel h, q the
// uint8 codes (int8 ones flipped to q + 128 by kFlip), MR rows read in place (the last step's
// bytes past K as 0: their weights are 0), Dot a vpdpbusd form or NoVnni (dot4). vpdpbusd
// waits on its accumulator for several cycles and two issue per cycle, so tiles of up to 3 rows
// (<= 6 chains) alternate two sets of accumulators between steps (4096 x 4096 at 1 / 8 rows, EVEX form on Zen 4, one
// set: 0.184 / 0.568 ms against vpmaddubsw's 0.161 / 0.757, whose chain is a 1-cycle add; two
// sets: 0.142-0.158 / 0.386-0.475 against 0.156-0.178 / 0.677-0.818).
template <int MR, int NP, bool kFlip, class Dot>
void tile_u8(const uint8_t* a, int64_t K, const int8_t* b0, const int8_t* b1, int64_t Kq,
             int32_t* acc_out /* [MR][16] */) {
  constexpr int S = !std::is_same_v<Dot, NoVnni> && MR <= 3 ? 2 : 1;
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
  __m256i acc[S][MR][NP];
  for (int i = 0; i < S; ++i)
    for (int r = 0; r < MR; ++r)
      for (int h = 0; h < NP; ++h) acc[i][r][h] = _mm256_setzero_si256();
  auto step = [&](int64_t q, __m256i (&set)[MR][NP], auto codes_of) {
    __m256i w[NP];
    w[0] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b0 + q * 32));
    if (NP == 2) w[NP - 1] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b1 + q * 32));
    _mm_prefetch(reinterpret_cast<const char*>((q & 1) && NP == 2 ? b1 : b0) + q * 32 + kAhead, _MM_HINT_T0);
    for (int r = 0; r < MR; ++r) {
      __m256i c = _mm256_set1_epi32(codes_of(a + r * K + q * 4));
      if (kFlip) c = _mm256_xor_si256(c, flip);
      for (int h = 0; h < NP; ++h) set[r][h] = dot4<Dot>(set[r][h], c, w[h]);
    }
  };
  const auto whole_word = [](const uint8_t* p) { int32_t v; std::memcpy(&v, p, 4); return v; };
  const int64_t whole = K / 4;
  int64_t q = 0;
  for (; q + S <= whole; q += S)
    for (int i = 0; i < S; ++i) step(q + i, acc[i], whole_word);
  for (; q < whole; ++q) step(q, acc[0], whole_word);
  if (whole < Kq)
    step(whole, acc[S - 1], [&](const uint8_t* p) {
      int32_t v = 0;
      std::memcpy(&v, p, static_cast<size_t>(K - whole * 4));
      return v;
    });
  for (int r = 0; r < MR; ++r)
    for (int h = 0; h < NP; ++h) {
      __m256i sum = acc[0][r][h];
      if constexpr (S == 2) sum = _mm256_add_epi32(sum, acc[1][r][h]);  // int32 wrapping, as the reference's sum
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc_out + r * 16 + h * 8), sum);
    }
}

constexpr int kU8MR = 6;  // rows per tile_u8: 12 accumulators, 2 weights, 1 broadcast

template <int NP, bool kFlip, class Dot>
void u8_rows(int mr, const uint8_t* a, int64_t K, const int8_t* b0, const int8_t* b1, int64_t Kq,
             int32_t* acc) {
  static_assert(kU8MR == 6, "one case per row count");
  switch (mr) {
    case 1: return tile_u8<1, NP, kFlip, Dot>(a, K, b0, b1, Kq, acc);
    case 2: return tile_u8<2, NP, kFlip, Dot>(a, K, b0, b1, Kq, acc);
    case 3: return tile_u8<3, NP, kFlip, Dot>(a, K, b0, b1, Kq, acc);
    case 4: return tile_u8<4, NP, kFlip, Dot>(a, K, b0, b1, Kq, acc);
    case 5: return tile_u8<5, NP, kFlip, Dot>(a, K, b0, b1, Kq, acc);
    default: return tile_u8<6, NP, kFlip, Dot>(a, K, b0, b1, Kq, acc);
  }
}

template <class Dot>
void u8_tile_with(int mr, int np, bool flip, const uint8_t* a, int64_t K, const int8_t* b0, const int8_t* b1,
                  int64_t Kq, int32_t* acc) {
  if (np == 2)
    flip ? u8_rows<2, true, Dot>(mr, a, K, b0, b1, Kq, acc) : u8_rows<2, false, Dot>(mr, a, K, b0, b1, Kq, acc);
  else
    flip ? u8_rows<1, true, Dot>(mr, a, K, b0, b1, Kq, acc) : u8_rows<1, false, Dot>(mr, a, K, b0, b1, Kq, acc);
}

void u8_tile(AvxVnni dot, int mr, int np, bool flip, const uint8_t* a, int64_t K, const int8_t* b0,
             const int8_t* b1, int64_t Kq, int32_t* acc) {
  with_vnni256(dot, [&](auto d) { u8_tile_with<decltype(d)>(mr, np, flip, a, K, b0, b1, Kq, acc); });
}

// y[j] = float(acc[j] + shift_back * sums[j]) * (a_s * ws[j]) (+ b[j]) for j < nr: the
// reference's expression in its order (int32 wrapping, as its sum), 8 outputs per vector. Per
// element, this epilogue took ~25% of a 6-row tile at K = 384.
void rescale(const int32_t* acc, const int32_t* sums, int32_t shift_back, float a_s, const float* ws,
             const float* b, float* y, int64_t nr) {
  const __m256i shift = _mm256_set1_epi32(shift_back);
  const __m256 scale = _mm256_set1_ps(a_s);
  int64_t j = 0;
  for (; j + 8 <= nr; j += 8) {
    const __m256i v = _mm256_add_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc + j)),
                                       _mm256_mullo_epi32(shift, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sums + j))));
    __m256 o = _mm256_mul_ps(_mm256_cvtepi32_ps(v), _mm256_mul_ps(scale, _mm256_loadu_ps(ws + j)));
    if (b) o = _mm256_add_ps(o, _mm256_loadu_ps(b + j));
    _mm256_storeu_ps(y + j, o);
  }
  for (; j < nr; ++j) {
    const int32_t v = static_cast<int32_t>(static_cast<uint32_t>(acc[j]) +
                                           static_cast<uint32_t>(shift_back) * static_cast<uint32_t>(sums[j]));
    float o = static_cast<float>(v) * (a_s * ws[j]);
    if (b) o += b[j];
    y[j] = o;
  }
}

// The packed copy: a kInt8Avx2HeaderBytes header, then ceil(N / 8) panels of [ceil(K/4)][8][4]
// bytes (pack_weight's), then the N8 * 8 row sums as int32 (0 past N).
struct Avx2Header {
  char magic[8];
  int64_t K, N, narrow;  // narrow: every code in [-64, 64]
};
constexpr char kAvx2Magic[8] = {'t', 's', 'i', '8', 'a', 'v', '2', '1'};
static_assert(sizeof(Avx2Header) <= kInt8Avx2HeaderBytes, "header");

struct Avx2Packed {
  const int8_t* panels;
  const int32_t* sums;
  bool narrow;
};

Avx2Packed read_packed(const uint8_t* base, int64_t K, int64_t N) {
  Avx2Header h;
  std::memcpy(&h, base, sizeof(h));
  const int64_t Kq = (K + 3) / 4, N8 = (N + 7) / 8;
  const int8_t* panels = reinterpret_cast<const int8_t*>(base + kInt8Avx2HeaderBytes);
  return {panels, reinterpret_cast<const int32_t*>(panels + N8 * Kq * 32), h.narrow != 0};
}

}  // namespace

int64_t linear_int8_avx2_packed_bytes(int64_t K, int64_t N) {
  const int64_t Kq = (K + 3) / 4, N8 = (N + 7) / 8;
  return kInt8Avx2HeaderBytes + N8 * (Kq * 32 + 8 * 4);
}

bool linear_int8_avx2_packed_matches(const uint8_t* packed, int64_t K, int64_t N) {
  Avx2Header h;
  std::memcpy(&h, packed, sizeof(h));
  return std::memcmp(h.magic, kAvx2Magic, sizeof(kAvx2Magic)) == 0 && h.K == K && h.N == N;
}

bool linear_int8_avx2_packed_narrow(const uint8_t* packed) {
  Avx2Header h;
  std::memcpy(&h, packed, sizeof(h));
  return h.narrow != 0;
}

void linear_int8_avx2_pack(const TensorView& qweight, const TensorView& packed) {
  const int64_t N = qweight.shape[0], K = qweight.shape[1], Kq = (K + 3) / 4, N8 = (N + 7) / 8;
  uint8_t* base = static_cast<uint8_t*>(packed.data);
  int8_t* panels = reinterpret_cast<int8_t*>(base + kInt8Avx2HeaderBytes);
  int32_t* sums = reinterpret_cast<int32_t*>(panels + N8 * Kq * 32);
  const int8_t* wq = qweight.ptr<int8_t>();
  std::vector<char> wide(static_cast<size_t>(N8), 0);  // per panel: a code outside [-64, 64]
  parallel_for(N8, std::max<int64_t>(1, 4096 / std::max<int64_t>(Kq, 1)), [&](int64_t p0, int64_t p1) {
    pack_weight(wq, N, K, Kq, panels, p0, p1);
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t n = p * 8; n < p * 8 + 8; ++n) {
        if (n >= N) {
          sums[n] = 0;
          continue;
        }
        sums[n] = row_sum(wq + n * K, K);
        const int8_t* row = wq + n * K;
        for (int64_t k = 0; k < K && !wide[p]; ++k) wide[p] = row[k] < -64 || row[k] > 64;
      }
  });
  Avx2Header h{};
  std::memcpy(h.magic, kAvx2Magic, sizeof(kAvx2Magic));
  h.K = K;
  h.N = N;
  h.narrow = std::find(wide.begin(), wide.end(), 1) == wide.end();
  std::memset(base, 0, kInt8Avx2HeaderBytes);
  std::memcpy(base, &h, sizeof(h));
}

bool linear_int8_panels_avx2(const TensorView& qx, const TensorView& act_scales, int32_t act_zero_point,
                             const TensorView& qweight, const TensorView& w_scales,
                             const TensorView* bias, const TensorView& out, const uint8_t* prepacked) {
  if (active_isa() < Isa::kAVX2) return false;
  const int64_t M = qx.shape[0], K = qx.shape[1], N = qweight.shape[0];
  const bool is_u8 = qx.dtype == DType::kUInt8;
  const bool per_token = act_scales.shape[0] == M && M != 1;
  const int8_t* wq = qweight.ptr<int8_t>();
  const float* as = act_scales.ptr<float>();
  const float* ws = w_scales.ptr<float>();
  const float* b = bias ? bias->ptr<float>() : nullptr;
  float* y = out.ptr<float>();
  const int64_t Kq = (K + 3) / 4, Kp = Kq * 4;
  const int64_t N8 = (N + 7) / 8;

  Avx2Packed pk{};
  struct alignas(32) Block { int8_t v[32]; };
  // The per-call copy's buffer stays with the calling thread (the size of its largest weight):
  // allocated afresh, a 45 MB copy (4096 x 11008) paid its page faults on every call (128
  // rows with vpdpbusd: 36.8-45.1 -> 17.1-18.5 ms, Zen 4).
  thread_local std::vector<Block> per_call;
  std::vector<int32_t> per_call_sums;
  if (prepacked) {
    pk = read_packed(prepacked, K, N);
  } else {
    per_call.resize(N8 * Kq);
    per_call_sums.assign(N8 * 8, 0);
    int8_t* panels = per_call.front().v;
    parallel_for(N8, std::max<int64_t>(1, 4096 / std::max<int64_t>(Kq, 1)), [&](int64_t p0, int64_t p1) {
      pack_weight(wq, N, K, Kq, panels, p0, p1);
    });
    pk = {panels, per_call_sums.data(), false};
  }
  const AvxVnni vnni = avx2_vnni();
  const bool as_u8 = pk.narrow || vnni != AvxVnni::kNone;  // tile_u8 on the codes as they are
  Codes codes;
  int32_t shift_back = 0;  // the true sum (q - zp) w = the accumulators + shift_back * sum w
  if (as_u8) {
    shift_back = -(is_u8 ? act_zero_point : 128);
    if (shift_back && !prepacked)
      parallel_for(N, std::max<int64_t>(1, 65536 / std::max<int64_t>(K, 1)), [&](int64_t n0, int64_t n1) {
        for (int64_t n = n0; n < n1; ++n) per_call_sums[n] = row_sum(wq + n * K, K);
      });
  } else {
    codes = make_codes(qx.ptr<uint8_t>(), M, K, Kp, is_u8);
    shift_back = is_u8 ? codes.shift - act_zero_point : 0;
    if (shift_back && !prepacked)
      parallel_for(N, std::max<int64_t>(1, 65536 / std::max<int64_t>(K, 1)), [&](int64_t n0, int64_t n1) {
        for (int64_t n = n0; n < n1; ++n) per_call_sums[n] = row_sum(wq + n * K, K);
      });
  }
  const int mr_max = as_u8 ? kU8MR : kMR;

  const int64_t col_tiles = (N + kNR - 1) / kNR;
  const int64_t row_blocks = (M + kRowBlock - 1) / kRowBlock;
  parallel_for(col_tiles * row_blocks, 1, [&](int64_t t0, int64_t t1) {
    alignas(32) int32_t acc[kU8MR * 16];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t ct = t % col_tiles, rb = t / col_tiles;
      const int64_t n0 = ct * kNR, nr = std::min<int64_t>(kNR, N - n0);
      const int8_t* b0 = pk.panels + (n0 / 8) * Kq * 32;
      const int8_t* b1 = b0 + Kq * 32;
      const int64_t rend = std::min(M, (rb + 1) * kRowBlock);  // this task's rows: no tile crosses into the next
      for (int64_t m0 = rb * kRowBlock; m0 < rend; m0 += mr_max) {
        const int mr = static_cast<int>(std::min<int64_t>(mr_max, rend - m0));
        if (as_u8)
          u8_tile(vnni, mr, nr > 8 ? 2 : 1, !is_u8, qx.ptr<uint8_t>() + m0 * K, K, b0, b1, Kq, acc);
        else if (nr > 8)
          tile_rows<2>(mr, codes.c.data() + m0 * Kp, Kp, b0, b1, Kq, acc);
        else
          tile_rows<1>(mr, codes.c.data() + m0 * Kp, Kp, b0, b1, Kq, acc);
        for (int r = 0; r < mr; ++r) {
          const int64_t m = m0 + r;
          int32_t* accr = acc + r * 16;
          if (!as_u8)
            for (int64_t i = codes.first[m]; i < codes.first[m + 1]; ++i) {  // rare
              const Clamp& cl = codes.clamps[i];
              for (int64_t j = 0; j < nr; ++j) accr[j] += cl.delta * wq[(n0 + j) * K + cl.k];
            }
          rescale(accr, pk.sums + n0, shift_back, as[per_token ? m : 0], ws + n0, b ? b + n0 : nullptr,
                  y + m * N + n0, nr);
        }
      }
    }
  });
  return true;
}

}  // namespace cpu
}  // namespace tensorslim
