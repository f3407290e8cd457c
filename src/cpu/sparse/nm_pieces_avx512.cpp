// N:M INT8 / INT4 values at small batches with integer products (AVX-512 VNNI + VBMI), for the
// patterns whose 64 slots cover one 128-column block (m = 2n: 2:4, 4:8) and K a multiple of 128.
// The float row kernel spends six port-0/5 vector uops per 16 slots (index decode, code
// widening, permute, FMA): 2:4 INT8 at batch 1 ran compute-bound at ~6 cycles per 16 slots
// (Intel Xeon with AMX, 4096 x 4096). Here x is split into three int8 pieces per value
// (activation_pieces.h: x = s * (h + l1 / 254 + l2 / 254^2), within ~6e-8 * max|x| of x),
// stored as unsigned bytes (+128); per 64 slots one decode (vpermb, vpmultishiftqb, vpternlogd)
// gives each lane's column in the block, two vpermb per piece and batch row (one per 64-byte
// half) pick those columns' bytes out of the block's 128, and vpdpbusd multiplies them with the
// codes: ~10 cycles per 64 slots at batch 1 against ~24 for the float kernel. INT8
// codes are read as stored; INT4 words are read with each nibble moved to the high half of a
// byte (16 x the code: one shift and one mask per 64), lane by lane in storage order, which the
// decode follows. The +128 comes off with the row's code sum.
#include <immintrin.h>

#include <algorithm>

#include "sparse_kernels.h"

#define TS_NM_PIECES_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")))

namespace tensorslim {
namespace cpu {
namespace {

constexpr int kMaxRowsPerPass = 4;  // 3 accumulators per batch row: 12 of the 32 zmm

struct Decode {
  __m512i spread, shifts, base, field_mask;
};

// The slot (0..63 in the block) whose code lane `lane` holds. INT8: lane = slot. INT4: the 32
// bytes of four 16-slot words, low nibbles in lanes 0..31 and high ones in 32..63; nibble t of
// word c holds slot 16c + 2 (t % 8) + t / 8 (docs/formats.md).
int lane_slot(int lane, bool int4) {
  if (!int4) return lane;
  const int byte = lane % 32, t = 2 * (byte % 8) + lane / 32;
  return 16 * (byte / 8) + 2 * (t % 8) + t / 8;
}

// The B-bit fields (16 B bytes per block) of the eight slots qword q's lanes hold lie within 8
// bytes from byte first[q]: `spread` copies those to qword q, `shifts` moves each lane's field to
// its low bits, and `base` is the column its group starts at in the block (m * (slot / n)).
template <int B>
TS_NM_PIECES_TARGET Decode make_decode(int n, int m, bool int4) {
  alignas(64) uint8_t spread[64], shifts[64], base[64];
  for (int q = 0; q < 8; ++q) {
    int first = 64;
    for (int t = 0; t < 8; ++t) first = std::min(first, B * lane_slot(8 * q + t, int4) / 8);
    for (int t = 0; t < 8; ++t) {
      const int lane = 8 * q + t, slot = lane_slot(lane, int4);
      spread[lane] = static_cast<uint8_t>(std::min(first + t, 8 * B - 1));
      shifts[lane] = static_cast<uint8_t>(B * slot - 8 * first);  // at most 3 * 15: within the qword
      const int column = m * (slot / n);  // 0..127; bit 7 repeats bit 6, the half it is in
      base[lane] = static_cast<uint8_t>(column | (column & 64) << 1);
    }
  }
  return {_mm512_load_si512(spread), _mm512_load_si512(shifts), _mm512_load_si512(base),
          _mm512_set1_epi8(static_cast<char>((1 << B) - 1))};
}

// Each lane's column in the block (bits 0..5 within its 64-byte half, bits 6 and 7: which half),
// for a vpermb of each half (vpermt2b over both took 2 port-5 uops as well, plus one).
template <int B>
TS_NM_PIECES_TARGET inline __m512i slot_columns(const uint8_t* idx, const Decode& d) {
  const __m512i bits = B == 2 ? _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(idx)))
                              : _mm512_castsi256_si512(_mm256_maskz_loadu_epi8(0xFFFFFF, idx));
  const __m512i fields = _mm512_multishift_epi64_epi8(d.shifts, _mm512_permutexvar_epi8(d.spread, bits));
  return _mm512_ternarylogic_epi32(fields, d.field_mask, d.base, 0xEA);  // (fields & mask) | base
}

// A block's 64 codes (INT4: 16 x the codes) in lane order.
template <bool kInt4>
TS_NM_PIECES_TARGET inline __m512i block_codes(const uint8_t* v) {
  if constexpr (!kInt4) {
    return _mm512_loadu_si512(v);
  } else {
    const __m512i both = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v)));
    const __m512i low_up = _mm512_mask_slli_epi16(both, 0x0000FFFF, both, 4);  // lanes 0..31: low nibbles up
    return _mm512_and_si512(low_up, _mm512_set1_epi8(static_cast<char>(0xF0)));
  }
}

// Output row r for batch rows m0 .. m0+MB-1. xq: per batch row, per 128-column block, the
// pieces h, l1, l2 (128 unsigned bytes each).
template <int MB, int B, bool kInt4>
TS_NM_PIECES_TARGET void pieces_row(const SparseWeight& w, const SparseBatch& a, const uint8_t* xq,
                                    const float* steps, const Decode& d, int64_t r, int64_t m0) {
  const int64_t K = w.K, blocks = K / 128;
  constexpr int kBlockBytes = kInt4 ? 32 : 64;
  const uint8_t* v = static_cast<const uint8_t*>(w.values) + r * w.val_stride / (kInt4 ? 2 : 1);
  const uint8_t* idx = w.indices + r * w.idx_row_bytes;
  const __m512i ones = _mm512_set1_epi8(1);
  __m512i acc[MB][3], code_sum = _mm512_setzero_si512();
  for (auto& row : acc)
    for (auto& p : row) p = _mm512_setzero_si512();
  const uint8_t* x = xq + m0 * 3 * K;
  for (int64_t c = 0; c < blocks; ++c, v += kBlockBytes, idx += 8 * B, x += 3 * 128) {
    _mm_prefetch(reinterpret_cast<const char*>(v) + kPrefetchAhead, _MM_HINT_T0);
    if (c * 8 * B % 64 < 8 * B)  // once per line of indices: the block that starts in its first 8B bytes
      _mm_prefetch(reinterpret_cast<const char*>(idx) + kPrefetchAhead / 4, _MM_HINT_T0);
    const __m512i cols = slot_columns<B>(idx, d);
    const __m512i codes = block_codes<kInt4>(v);
    code_sum = _mm512_dpbusd_epi32(code_sum, ones, codes);
    const __mmask64 upper = _mm512_movepi8_mask(cols);  // columns 64..127
    for (int mb = 0; mb < MB; ++mb) {
      for (int j = 0; j < 3; ++j) {
        const uint8_t* p = x + mb * 3 * K + j * 128;
        const __m512i low = _mm512_permutexvar_epi8(cols, _mm512_loadu_si512(p));
        const __m512i picked = _mm512_mask_permutexvar_epi8(low, upper, cols, _mm512_loadu_si512(p + 64));
        acc[mb][j] = _mm512_dpbusd_epi32(acc[mb][j], picked, codes);
      }
    }
  }
  const int64_t offset = 128 * static_cast<int64_t>(_mm512_reduce_add_epi32(code_sum));
  const float scale = w.scales[r], bias = a.bias ? a.bias[r] : 0.0f;
  for (int mb = 0; mb < MB; ++mb) {
    const int64_t h = _mm512_reduce_add_epi32(acc[mb][0]), l1 = _mm512_reduce_add_epi32(acc[mb][1]),
                  l2 = _mm512_reduce_add_epi32(acc[mb][2]);
    a.y[(m0 + mb) * a.ldy + r] =
        pieces_output(h - offset, l1 - offset, l2 - offset, kInt4, steps[m0 + mb], scale, bias);
  }
}

template <int B, bool kInt4>
TS_NM_PIECES_TARGET void pieces_rows(const SparseWeight& w, const SparseBatch& a, const uint8_t* xq,
                                     const float* steps, int64_t r0, int64_t r1) {
  const Decode d = make_decode<B>(w.n, w.m, kInt4);
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t m0 = 0; m0 < a.M; m0 += kMaxRowsPerPass) {
      switch (std::min<int64_t>(a.M - m0, kMaxRowsPerPass)) {
        case 1: pieces_row<1, B, kInt4>(w, a, xq, steps, d, r, m0); break;
        case 2: pieces_row<2, B, kInt4>(w, a, xq, steps, d, r, m0); break;
        case 3: pieces_row<3, B, kInt4>(w, a, xq, steps, d, r, m0); break;
        default: pieces_row<4, B, kInt4>(w, a, xq, steps, d, r, m0); break;
      }
    }
  }
}

}  // namespace

void nm_rows_pieces_avx512(const SparseWeight& w, const SparseBatch& a, const uint8_t* xq, const float* steps,
                           int64_t r0, int64_t r1) {
  const bool int4 = w.vdtype == kInt4Values;
  if (w.b == 2) int4 ? pieces_rows<2, true>(w, a, xq, steps, r0, r1) : pieces_rows<2, false>(w, a, xq, steps, r0, r1);
  else int4 ? pieces_rows<3, true>(w, a, xq, steps, r0, r1) : pieces_rows<3, false>(w, a, xq, steps, r0, r1);
}

}  // namespace cpu
}  // namespace tensorslim
