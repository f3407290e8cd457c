// 2:4 and 4:8 INT8 / INT4 values at small batches with integer products on AVX2 CPUs with a 256-bit
// vpdpbusd (cpu::avx2_vnni: AVX-VNNI, as Intel's client cores from Alder Lake and its E-core
// Xeons have without AVX-512, or AVX512-VNNI's EVEX form standing in), K a multiple of 128:
// nm_pieces_avx512.cpp's scheme without its cross-lane byte permute. x is split into three int8
// pieces per value (activation_pieces.h), stored +128 as unsigned bytes, each 64 columns of a
// piece ordered c0-15, c32-47, c16-31, c48-63 (order_pieces_for_avx2), so that the 32 slots of a vector
// (lane 0: columns 0-31, lane 1: 32-63) find their columns in the same 128-bit lane of two
// loads: per slot one vpshufb on each (an index with bit 7 set reads 0) and an or pick the byte,
// and vpdpbusd multiplies it with the code. Per 32 slots the positions become byte indices in
// 9-11 uops: 2:4's two nibbles per index byte, one vpshufb to spread them and a 16-bit multiply
// by 65 to put a nibble's two fields in its word's two bytes; 4:8's 6-bit field pairs, one
// vpshufb to put the two bytes holding a pair in its word and one vpmulhuw to shift it down.
// vpmaddubsw would saturate u8 x s8 pairs (no VNNI: the float kernels run, as for the dense
// pieces).
#include <immintrin.h>

#include <cstring>
#include <type_traits>

#include "../vnni_dot.h"
#include "sparse_kernels.h"

namespace tensorslim {
namespace cpu {
namespace {

constexpr int kMaxRowsPerPass = 2;  // 3 accumulators per batch row: VEX vpdpbusd reaches ymm0-15 only
static_assert(kMaxRowsPerPass == 2, "pieces_rows runs the last odd batch row alone");

// Constants of one 32-slot vector. 2:4 (B = 2): `spread` picks, for word w of each lane (slots
// 2w, 2w + 1 of the lane), the nibble holding both fields (index bytes' low nibbles in bytes 0-7
// of the source, high ones in 8-15). 4:8 (B = 3): the two index bytes holding the pair's 6 bits
// (the byte before them where the pair starts a byte, so every shift is 2-8 bits), and
// `shift_mul` the vpmulhuw factor 2^(16 - shift) that moves them to bits 0-5. base0 / base1: the
// column of the slot's group within its lane's 32, + 0x70 (reads X0 while < 16) or - 16 (reads X1
// from 16).
struct Decode {
  __m256i spread, shift_mul, base0, base1, to_slots;
};

Decode make_decode(int B) {
  alignas(32) uint8_t spread[32], base0[32], base1[32], to_slots[32];
  alignas(32) uint16_t shift_mul[16] = {};
  for (int lane = 0; lane < 2; ++lane) {
    for (int b = 0; b < 16; ++b) {
      const int slot = 16 * lane + b, i = 16 * lane + b;
      if (B == 2) {
        if (b % 2 == 0) spread[i] = static_cast<uint8_t>((slot % 4 == 0 ? 0 : 8) + slot / 4);
        else spread[i] = 0x80;
      } else {
        const int bit = 3 * (slot - slot % 2), first = bit / 8 - (bit % 8 == 0 ? 1 : 0);
        const int byte = first + b % 2;  // the word's low byte, then its high one
        spread[i] = byte < 0 ? 0x80 : static_cast<uint8_t>(byte);
        shift_mul[i / 2] = static_cast<uint16_t>(1u << (16 - (bit - 8 * first)));
      }
      const int col = B == 2 ? 4 * (b / 2) : 8 * (b / 4);  // the slot's group: 2 of 4, 4 of 8 columns
      base0[i] = static_cast<uint8_t>(col + 0x70);
      base1[i] = static_cast<uint8_t>(col - 16);
      // INT4: bytes 0-7 of a lane hold the word's low nibbles (slots 0, 4, 8, 12, 1, 5, 9, 13),
      // bytes 8-15 its high ones (2, 6, 10, 14, 3, 7, 11, 15); slot s sits at 4 (s % 4) + s / 4
      to_slots[i] = static_cast<uint8_t>(4 * (b % 4) + b / 4);
    }
  }
  auto load = [](const uint8_t* p) { return _mm256_load_si256(reinterpret_cast<const __m256i*>(p)); };
  return {load(spread), load(reinterpret_cast<const uint8_t*>(shift_mul)), load(base0), load(base1), load(to_slots)};
}

// The 32 slots' byte indices into X0 (idx0) and X1 (idx1) from their 4 B index bytes.
template <int B>
inline void slot_indices(const uint8_t* idx, const Decode& d, __m256i& idx0, __m256i& idx1) {
  __m256i pos;
  if constexpr (B == 3) {
    // 12 bytes, the masked dword not read (the row's last ones end its buffer)
    const __m128i raw = _mm_maskload_epi32(reinterpret_cast<const int*>(idx), _mm_setr_epi32(-1, -1, -1, 0));
    const __m256i pair = _mm256_mulhi_epu16(_mm256_shuffle_epi8(_mm256_broadcastsi128_si256(raw), d.spread),
                                            d.shift_mul);  // bits 0-2: the first field, 3-5: the second
    pos = _mm256_or_si256(_mm256_and_si256(pair, _mm256_set1_epi16(7)),
                          _mm256_and_si256(_mm256_slli_epi16(pair, 5), _mm256_set1_epi16(0x700)));
  } else {
    // broadcast from memory: a load-port uop, where set1 from a register took two port-5 ones
    const __m256i v = _mm256_castpd_si256(_mm256_broadcast_sd(reinterpret_cast<const double*>(idx)));
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    const __m256i nibbles = _mm256_unpacklo_epi64(_mm256_and_si256(v, low4),
                                                  _mm256_and_si256(_mm256_srli_epi16(v, 4), low4));
    // word = nibble * 65: the first field in bits 0-1, the second (nibble bits 2-3) in bits 8-9
    const __m256i words = _mm256_mullo_epi16(_mm256_shuffle_epi8(nibbles, d.spread), _mm256_set1_epi16(65));
    pos = _mm256_and_si256(words, _mm256_set1_epi8(3));
  }
  idx0 = _mm256_add_epi8(pos, d.base0);
  idx1 = _mm256_add_epi8(pos, d.base1);
}

// The 32 codes of a half block in slot order (INT4: 16 x the code, nibble moved to the top).
template <bool kInt4>
inline __m256i half_codes(const uint8_t* v, const Decode& d) {
  if constexpr (!kInt4) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v));
  } else {
    long long q[2];
    std::memcpy(q, v, 16);
    const __m256i words = _mm256_setr_epi64x(q[0], q[0], q[1], q[1]);  // lane i: word i, twice
    const __m256i high = _mm256_set1_epi8(static_cast<char>(0xF0));
    const __m256i lo = _mm256_and_si256(_mm256_slli_epi16(words, 4), high), hi = _mm256_and_si256(words, high);
    return _mm256_shuffle_epi8(_mm256_blend_epi32(lo, hi, 0xCC), d.to_slots);  // bytes 8-15: high nibbles
  }
}

inline int64_t hsum_epi32(__m256i v) {
  alignas(32) int32_t t[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(t), v);
  int64_t s = 0;
  for (int32_t e : t) s += e;
  return s;
}

template <class Dot, int B, int MB, bool kInt4>
void pieces_row(const SparseWeight& w, const SparseBatch& a, const uint8_t* xq, const float* steps, const Decode& d,
                int64_t r, int64_t m0) {
  const int64_t K = w.K, blocks = K / 128;
  constexpr int kHalfBytes = kInt4 ? 16 : 32;
  const uint8_t* v = static_cast<const uint8_t*>(w.values) + r * w.val_stride / (kInt4 ? 2 : 1);
  const uint8_t* idx = w.indices + r * w.idx_row_bytes;
  const __m256i ones = _mm256_set1_epi8(1);
  __m256i acc[MB][3], code_sum = _mm256_setzero_si256();
  for (auto& row : acc)
    for (auto& p : row) p = _mm256_setzero_si256();
  const uint8_t* x = xq + m0 * 3 * K;
  for (int64_t c = 0; c < blocks; ++c, x += 3 * 128) {
    _mm_prefetch(reinterpret_cast<const char*>(v) + kPrefetchAhead, _MM_HINT_T0);
    if (c * 8 * B % 64 < 8 * B)  // once per line of indices, as the AVX-512 kernel
      _mm_prefetch(reinterpret_cast<const char*>(idx) + kPrefetchAhead / 4, _MM_HINT_T0);
    for (int h = 0; h < 2; ++h, v += kHalfBytes, idx += 4 * B) {
      __m256i idx0, idx1;
      slot_indices<B>(idx, d, idx0, idx1);
      const __m256i codes = half_codes<kInt4>(v, d);
      code_sum = Dot::dpbusd(code_sum, ones, codes);
      for (int mb = 0; mb < MB; ++mb) {
        for (int j = 0; j < 3; ++j) {
          const uint8_t* p = x + mb * 3 * K + j * 128 + 64 * h;
          const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
          const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32));
          const __m256i picked = _mm256_or_si256(_mm256_shuffle_epi8(x0, idx0), _mm256_shuffle_epi8(x1, idx1));
          acc[mb][j] = Dot::dpbusd(acc[mb][j], picked, codes);
        }
      }
    }
  }
  const int64_t offset = 128 * hsum_epi32(code_sum);
  const float scale = w.scales[r], bias = a.bias ? a.bias[r] : 0.0f;
  for (int mb = 0; mb < MB; ++mb) {
    const int64_t h = hsum_epi32(acc[mb][0]), l1 = hsum_epi32(acc[mb][1]), l2 = hsum_epi32(acc[mb][2]);
    a.y[(m0 + mb) * a.ldy + r] =
        pieces_output(h - offset, l1 - offset, l2 - offset, kInt4, steps[m0 + mb], scale, bias);
  }
}

template <class Dot, int B, bool kInt4>
void pieces_rows(const SparseWeight& w, const SparseBatch& a, const uint8_t* xq, const float* steps, int64_t r0,
                 int64_t r1) {
  const Decode d = make_decode(B);
  for (int64_t r = r0; r < r1; ++r) {
    int64_t m0 = 0;
    for (; m0 + kMaxRowsPerPass <= a.M; m0 += kMaxRowsPerPass)
      pieces_row<Dot, B, kMaxRowsPerPass, kInt4>(w, a, xq, steps, d, r, m0);
    if (m0 < a.M) pieces_row<Dot, B, 1, kInt4>(w, a, xq, steps, d, r, m0);
  }
}

}  // namespace

void order_pieces_for_avx2(uint8_t* q, int64_t bytes) {
  for (int64_t o = 0; o + 128 <= bytes; o += 128) {  // one piece of one block: 64 even k, 64 odd k
    __m128i out[8];
    for (int i = 0; i < 4; ++i) {
      const __m128i e = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + o + 16 * i));
      const __m128i od = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + o + 64 + 16 * i));
      out[2 * i] = _mm_unpacklo_epi8(e, od);      // columns 32i .. 32i + 15
      out[2 * i + 1] = _mm_unpackhi_epi8(e, od);  // 32i + 16 .. 32i + 31
    }
    static constexpr int kChunk[8] = {0, 2, 1, 3, 4, 6, 5, 7};  // c0-15, c32-47, c16-31, c48-63 per 64
    for (int i = 0; i < 8; ++i)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + o + 16 * i), out[kChunk[i]]);
  }
}

void nm_rows_pieces_avx2(const SparseWeight& w, const SparseBatch& a, const uint8_t* xq, const float* steps,
                         int64_t r0, int64_t r1) {
  const bool int4 = w.vdtype == kInt4Values;
  with_vnni256(avx2_vnni(), [&](auto dot) {
    using Dot = decltype(dot);
    if constexpr (!std::is_same_v<Dot, NoVnni>) {  // nm_pieces_split takes this kernel only with one
      if (w.b == 2) int4 ? pieces_rows<Dot, 2, true>(w, a, xq, steps, r0, r1)
                         : pieces_rows<Dot, 2, false>(w, a, xq, steps, r0, r1);
      else int4 ? pieces_rows<Dot, 3, true>(w, a, xq, steps, r0, r1)
                : pieces_rows<Dot, 3, false>(w, a, xq, steps, r0, r1);
    }
  });
}

}  // namespace cpu
}  // namespace tensorslim
