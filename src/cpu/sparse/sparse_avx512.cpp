// AVX-512 sparse linears (compiled with -mavx512f/bw/vl/dq). 16 stored entries per step.
// Row-wise (small batches): N:M 2:4 and 4:8 pick their 16 x values out of a 32-column window
// with one vpermt2ps (also 3:4, 5:8, 6:8, 7:8), 1:4, 2:8 and 3:8 out of a 64-column one with
// two, 1:8 out of 128 columns with four. Transposed (larger batches): every stored entry does
// one FMA per 16 batch rows against the transposed activations. CSR at batch 1 reads x with
// scalar loads or, on Intel, gathers (csr_x_at.h); CSR at batches 2..8 runs on x transposed to
// [K, 2|4|8] (one broadcast value per entry at 3..8).
#include <immintrin.h>

#include <cstring>

#include "sparse_kernels.h"
#include "tensorslim/sparse.h"  // sparse_gathers

namespace tensorslim {
namespace cpu {
namespace {

constexpr int W = 16;

inline uint64_t load_bits(const uint8_t* p, const uint8_t* end) {
  uint64_t v = 0;
  if (end - p >= 8) {
    std::memcpy(&v, p, 8);  // one unaligned load
  } else {
    for (int i = 0; p + i < end; ++i) v |= static_cast<uint64_t>(p[i]) << (8 * i);  // never past the buffer
  }
  return v;
}

// The 16 B-bit index fields of one vector, field j shifted down to lane j's low bits (the bits
// above it hold later fields), from the bits broadcast: to 32-bit lanes at B = 2, 64-bit at B = 3.
template <int B>
inline __m512i fields(__m512i v) {
  if constexpr (B == 2) {
    return _mm512_srlv_epi32(v, _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30));
  } else {
    const __m512i lo = _mm512_srlv_epi64(v, _mm512_setr_epi64(0, 3, 6, 9, 12, 15, 18, 21));
    const __m512i hi = _mm512_srlv_epi64(v, _mm512_setr_epi64(24, 27, 30, 33, 36, 39, 42, 45));
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi64_epi32(lo)), _mm512_cvtepi64_epi32(hi), 1);
  }
}

// In-group positions of 16 slots from their index bits (the low 16*B bits of `bits`).
template <int B>
inline __m512i positions(uint64_t bits) {
  const __m512i v = B == 2 ? _mm512_set1_epi32(static_cast<int>(bits)) : _mm512_set1_epi64(static_cast<long long>(bits));
  return _mm512_and_si512(fields<B>(v), _mm512_set1_epi32((1 << B) - 1));
}

// off + positions<B> of the 16 slots whose index bits start at p (8 readable bytes), where off's
// lanes are multiples of m = 2^B (group offsets), so the add is an OR: one vpternlogd with the
// mask. At B = 2 the 32 bits are broadcast straight from memory (a load-port vpbroadcastd, not a
// port-5 one from a general register). Intel's cores run 512-bit vector ops on ports 0 and 5
// only, and 2:4 at batch 1 is bound by them there: 4096 x 4096 int8 0.50 -> 0.41-0.45 ms (the
// broadcast) on a 2-core Intel Xeon with AMX.
template <int B>
inline __m512i slots_at(const uint8_t* p, __m512i off) {
  __m512i v;
  if constexpr (B == 2) {
    int32_t bits;
    std::memcpy(&bits, p, 4);
    v = _mm512_set1_epi32(bits);
  } else {
    uint64_t bits;
    std::memcpy(&bits, p, 8);
    v = _mm512_set1_epi64(static_cast<long long>(bits));
  }
  return _mm512_ternarylogic_epi32(fields<B>(v), _mm512_set1_epi32((1 << B) - 1), off, 0xEA);  // (a & b) | c
}

// The positions of the 16 slots from j0 (a multiple of 16, so byte aligned).
template <int B>
inline __m512i decode_pos(const uint8_t* row, int64_t j0, const uint8_t* end) {
  return positions<B>(load_bits(row + ((j0 * B) >> 3), end));
}

// Slots j0 < fast_end(...) may read their 8 index bytes without a bounds check.
template <int B>
inline int64_t fast_end(const uint8_t* row, const uint8_t* end, int64_t full) {
  const int64_t avail = end - row;
  if (avail < 8) return 0;
  const int64_t lim = (avail - 8) * 8 / B + W;
  return lim < full ? lim : full;
}

// 16 stored values from index i as float32 (masked lanes read nothing and give 0).
template <DType VT, bool MASKED>
inline __m512 load_vals(const void* base, int64_t i, __mmask16 k) {
  if constexpr (VT == DType::kFloat32) {
    const float* p = static_cast<const float*>(base) + i;
    return MASKED ? _mm512_maskz_loadu_ps(k, p) : _mm512_loadu_ps(p);
  } else if constexpr (VT == DType::kInt8) {
    const int8_t* p = static_cast<const int8_t*>(base) + i;
    const __m128i c = MASKED ? _mm_maskz_loadu_epi8(k, p) : _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(c));
  } else if constexpr (VT == kInt4Values) {
    // i a multiple of 16: one whole 64-bit word of the row (include/tensorslim/sparse.h). Lane j
    // of the broadcast word sees its low 32 bits (j even) or high 32 (j odd), where slot j is
    // nibble j / 2: shifted down to bits 0..3, which is all vpermps reads of an index, and
    // looked up as the float code.
    long long word;
    std::memcpy(&word, static_cast<const uint8_t*>(base) + i / 2, 8);
    const __m512i down = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
    const __m512 code = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1);
    const __m512i nib = _mm512_srlv_epi32(_mm512_set1_epi64(word), down);
    return MASKED ? _mm512_maskz_permutexvar_ps(k, nib, code) : _mm512_permutexvar_ps(nib, code);
  } else {
    const uint16_t* p = static_cast<const uint16_t*>(base) + i;
    const __m256i h = MASKED ? _mm256_maskz_loadu_epi16(k, p) : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    if constexpr (VT == DType::kFloat16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
}

inline __mmask16 first_lanes(int64_t count) {
  return count >= W ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << count) - 1u);
}

// Up to 16 CSR entries from e (of a row ending at e1): their columns and values, and `use`,
// the lanes that hold an entry with a column < K; entries at columns >= K set their lanes in *bad.
template <DType VT>
struct CsrChunk {
  __m512i col;
  __m512 vals;
  __mmask16 use;
  CsrChunk(const SparseWeight& w, int64_t e, int64_t e1, __m512i kv, __mmask16* bad) {
    const __mmask16 act = first_lanes(e1 - e);
    if (act == 0xffff) {
      col = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.cols + e)));
      vals = load_vals<VT, false>(w.values, e, 0);
    } else {
      col = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(act, w.cols + e));
      vals = load_vals<VT, true>(w.values, e, act);
    }
    const __mmask16 ok = _mm512_cmplt_epi32_mask(col, kv);
    *bad |= act & static_cast<__mmask16>(~ok);
    use = act & ok;
  }
};

inline void store_out(const SparseWeight& w, const SparseBatch& a, int64_t r, int64_t i, float acc) {
  a.y[i * a.ldy + r * a.ldr] = acc * (w.scales ? w.scales[r] : 1.0f) + (a.bias ? a.bias[r] : 0.0f);
}

// Stages the tile offsets ci[0, 16) of the columns in col (lanes in k; the others 0): col * st
// into a transposed tile, or a convolution's per-column offsets into its input planes
// (col_off), looked up one by one or, where `gathers` (cpu::sparse_gathers: Intel), with one
// vpgatherdd: microcoded on AMD, it made a 90% 64 -> 64 3 x 3 convolution at 56 x 56 ~1.6x
// slower than the same kernel without the lookup (Zen 5); on an Intel Xeon it made 90% and 75%
// 3 x 3 layers 7-16% faster than the loop (bench_sparse_conv.py --gathers).
inline void stage_offsets(int32_t* ci, __m512i col, __mmask16 k, int64_t st, const int32_t* col_off, bool gathers) {
  if (!col_off) {
    _mm512_store_si512(ci, _mm512_maskz_mullo_epi32(k, col, _mm512_set1_epi32(static_cast<int>(st))));
    return;
  }
  if (gathers) {
    _mm512_store_si512(ci, _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), k, col, col_off, 4));
    return;
  }
  alignas(64) int32_t c[16];
  _mm512_store_si512(c, col);
  for (int j = 0; j < 16; ++j) ci[j] = (k >> j) & 1 ? col_off[c[j]] : 0;
}

// The slot layout of one N:M row, the same for every row: a period of P = lcm(n, 16) slots
// starts at a group boundary; vector v of a period holds the groups at column offsets offs[v].
struct NmLayout {
  __m512i offs[8];
  __m512i rel[8];      // offs[v] - base[v]: offsets from the vector's first group
  // Bits 5 and 6 of rel[v] per lane: which 32-column part of a 64- or 128-column window a
  // lane's x comes from. A slot's window offset is rel[v] (a multiple of m) plus its position
  // (< m <= 8), so those bits are rel[v]'s: set once, not tested per vector.
  __mmask16 part_bit[8][2] = {};
  int64_t base[8] = {};  // offs[v]'s first lane
  int nper = 1;
  int64_t period_cols = 0;
  int64_t full = 0;  // slots whose groups lie wholly inside [0, K)
  explicit NmLayout(const SparseWeight& w) {
    int P = W;
    while (P % w.n) P += W;
    nper = P / W;
    period_cols = P / w.n * w.m;
    for (int v = 0; v < nper; ++v) {
      alignas(64) int32_t o[W];
      for (int l = 0; l < W; ++l) o[l] = (v * W + l) / w.n * w.m;
      offs[v] = _mm512_load_si512(o);
      base[v] = o[0];
      rel[v] = _mm512_sub_epi32(offs[v], _mm512_set1_epi32(o[0]));
      part_bit[v][0] = _mm512_test_epi32_mask(rel[v], _mm512_set1_epi32(32));
      part_bit[v][1] = _mm512_test_epi32_mask(rel[v], _mm512_set1_epi32(64));
    }
    full = w.K / w.m * w.n;
  }
};

// Output row r for batch rows i0 .. i0+R-1. WIN: the x window 16 slots are read from
// (nm_window): 32 columns (one vpermt2ps), 64 (two and a blend) or 128 (four and three). A
// window that would reach past K (near the row's end, where a vector starts mid-group) gathers.
template <DType VT, int B, int WIN, int R>
void nm_row(const SparseWeight& w, const SparseBatch& a, const NmLayout& L, int64_t r, int64_t i0) {
  __m512 acc[R];
  for (int q = 0; q < R; ++q) acc[q] = _mm512_setzero_ps();
  const uint8_t* idx = w.indices + r * w.idx_row_bytes;
  const int64_t vb = r * w.val_stride;
  const float* x = a.x + i0 * a.ldx;
  int64_t j0 = 0, col0 = 0;
  int v = 0;
  const int64_t lim = fast_end<B>(idx, w.idx_end, L.full);
  __m512 acc2[R];  // a second set for the unrolled loop: two FMA chains per batch row
  for (int q = 0; q < R; ++q) acc2[q] = _mm512_setzero_ps();
  auto body = [&](const __m512i rel, int v, int64_t j, int64_t c0, __m512* A) __attribute__((always_inline)) {
    const __m512 vals = load_vals<VT, false>(w.values, vb + j, 0);
    const __mmask16 upper = L.part_bit[v][0], bit6 = L.part_bit[v][1];  // WIN 64, 128
    const bool window = c0 + WIN <= w.K;
    for (int q = 0; q < R; ++q) {
      const float* xq = x + q * a.ldx;
      __m512 xv;
      // 32 columns of x from 32 * k on, picked by rel's low 5 bits
      auto part = [&](int k) __attribute__((always_inline)) {
        return _mm512_permutex2var_ps(_mm512_loadu_ps(xq + c0 + 2 * k * W), rel,
                                      _mm512_loadu_ps(xq + c0 + (2 * k + 1) * W));
      };
      if (WIN == 32 && window) {
        xv = part(0);
      } else if (WIN == 64 && window) {  // vpermt2ps reads the index's low 5 bits
        xv = _mm512_mask_blend_ps(upper, part(0), part(1));
      } else if (WIN == 128 && window) {
        xv = _mm512_mask_blend_ps(bit6, _mm512_mask_blend_ps(upper, part(0), part(1)),
                                  _mm512_mask_blend_ps(upper, part(2), part(3)));
      } else {
        xv = _mm512_i32gather_ps(_mm512_add_epi32(rel, _mm512_set1_epi32(static_cast<int>(c0))), xq, 4);
      }
      A[q] = _mm512_fmadd_ps(vals, xv, A[q]);
    }
  };
  if (L.nper == 1) {  // n divides 16: every vector starts a group, one offset pattern
    const __m512i off = L.offs[0];
    for (; j0 + 2 * W <= lim; j0 += 2 * W, col0 += 2 * L.period_cols) {
      prefetch_ahead(static_cast<const char*>(w.values) + value_bytes<VT>(vb + j0), value_bytes<VT>(2 * W));
      body(slots_at<B>(idx + ((j0 * B) >> 3), off), 0, j0, col0, acc);
      body(slots_at<B>(idx + (((j0 + W) * B) >> 3), off), 0, j0 + W, col0 + L.period_cols, acc2);
    }
    for (; j0 + W <= lim; j0 += W, col0 += L.period_cols)
      body(slots_at<B>(idx + ((j0 * B) >> 3), off), 0, j0, col0, acc);
  } else {
    for (; j0 + W <= lim; j0 += W) {
      body(slots_at<B>(idx + ((j0 * B) >> 3), L.rel[v]), v, j0, col0 + L.base[v], acc);
      if (++v == L.nper) {
        v = 0;
        col0 += L.period_cols;
      }
    }
  }
  // The last groups: lanes past the row's slots or at virtual columns >= K read nothing.
  const __m512i kv = _mm512_set1_epi32(static_cast<int>(w.K));
  for (; j0 < w.slots; j0 += W) {
    const __mmask16 act = first_lanes(w.slots - j0);
    const __m512i col = _mm512_add_epi32(_mm512_add_epi32(L.offs[v], decode_pos<B>(idx, j0, w.idx_end)),
                                         _mm512_set1_epi32(static_cast<int>(col0)));
    const __mmask16 k = act & _mm512_cmplt_epi32_mask(col, kv);
    const __m512 vals = load_vals<VT, true>(w.values, vb + j0, act);
    for (int q = 0; q < R; ++q) {
      const __m512 xv = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), k, col, x + q * a.ldx, 4);
      acc[q] = _mm512_fmadd_ps(vals, xv, acc[q]);
    }
    if (++v == L.nper) {
      v = 0;
      col0 += L.period_cols;
    }
  }
  for (int q = 0; q < R; ++q) store_out(w, a, r, i0 + q, _mm512_reduce_add_ps(_mm512_add_ps(acc[q], acc2[q])));
}

template <DType VT, int B, int WIN>
void nm_rows_typed(const SparseWeight& w, const SparseBatch& a, int64_t r0, int64_t r1) {
  const NmLayout L(w);
  for (int64_t r = r0; r < r1; ++r) {
    int64_t i = 0;
    for (; i + 8 <= a.M; i += 8) nm_row<VT, B, WIN, 8>(w, a, L, r, i);
    for (; i + 4 <= a.M; i += 4) nm_row<VT, B, WIN, 4>(w, a, L, r, i);
    for (; i + 2 <= a.M; i += 2) nm_row<VT, B, WIN, 2>(w, a, L, r, i);
    for (; i < a.M; ++i) nm_row<VT, B, WIN, 1>(w, a, L, r, i);
  }
}

// Transposed kernel: a[s][u] holds batch rows 16u .. 16u+15 of the tile for one output
// row; S independent sets (entries t, t+S, ...) keep the FMA latency off the critical path
// when the tile is narrow.
template <int V>
struct TAcc {
  static constexpr int S = V == 1 ? 4 : V == 2 ? 2 : 1;
  // part[0 .. V * W) += the n staged entries (tile offsets ci, values vf; n a multiple of W)
  // times their tile rows. The sums live in locals for the whole loop: as members of an
  // object some instantiations (2:4 bf16) kept one in memory, a store and a load per entry.
  static void add(float* part, const float* xt, const int32_t* ci, const float* vf, int64_t n) {
    __m512 a[S][V];
    for (int u = 0; u < V; ++u) a[0][u] = _mm512_load_ps(part + u * W);
    for (int s = 1; s < S; ++s)
      for (int u = 0; u < V; ++u) a[s][u] = _mm512_setzero_ps();
    for (int64_t t = 0; t < n; t += S) {
      for (int s = 0; s < S; ++s) {
        const float* xr = xt + ci[t + s];
        const __m512 bv = _mm512_set1_ps(vf[t + s]);
        for (int u = 0; u < V; ++u) a[s][u] = _mm512_fmadd_ps(bv, _mm512_loadu_ps(xr + u * W), a[s][u]);
      }
    }
    for (int u = 0; u < V; ++u) {
      __m512 sum = a[0][u];
      for (int s = 1; s < S; ++s) sum = _mm512_add_ps(sum, a[s][u]);
      _mm512_store_ps(part + u * W, sum);
    }
  }
};

#include "transposed_tiles.h"

template <DType VT, int B>
struct NmRows {
  const SparseWeight& w;
  NmLayout L;
  __m512i kv;
  const int32_t* col_off;
  const bool gathers = sparse_gathers();
  NmRows(const SparseWeight& w_, const int32_t* off)
      : w(w_), L(w_), kv(_mm512_set1_epi32(static_cast<int>(w_.K))), col_off(off) {}
  void begin(int64_t, int64_t) {}
  // At most kMaxKBlock + 8 slots per block (sparse_kernels.h): never `more`.
  int64_t stage(int64_t r, int64_t kb0, int64_t kb1, bool last, int64_t st, int32_t* ci, float* vf, bool& more,
                bool&) {
    more = false;
    const uint8_t* idx = w.indices + r * w.idx_row_bytes;
    const int64_t vb = r * w.val_stride;
    const int64_t P = static_cast<int64_t>(L.nper) * W;
    const int64_t j1 = last ? w.slots : kb1 / L.period_cols * P;
    int64_t col0 = kb0, n = 0;
    int v = 0;
    for (int64_t j0 = kb0 / L.period_cols * P; j0 < j1; j0 += W, n += W) {
      const __mmask16 act = first_lanes(w.slots - j0);
      const __m512i col = _mm512_add_epi32(_mm512_add_epi32(L.offs[v], decode_pos<B>(idx, j0, w.idx_end)),
                                           _mm512_set1_epi32(static_cast<int>(col0)));
      const __mmask16 k = act & _mm512_cmplt_epi32_mask(col, kv);
      const __m512 vals = act == 0xffff ? load_vals<VT, false>(w.values, vb + j0, 0)
                                        : load_vals<VT, true>(w.values, vb + j0, act);
      stage_offsets(ci + n, col, k, st, col_off, gathers);
      _mm512_store_ps(vf + n, _mm512_maskz_mov_ps(k, vals));
      if (++v == L.nper) {
        v = 0;
        col0 += L.period_cols;
      }
    }
    // The row's next block, ahead of its staging (rows are a block's slots apart in memory, so
    // the hardware prefetchers do not follow them).
    if (!last) prefetch_block(static_cast<const char*>(w.values) + value_bytes<VT>(vb + j1),
                              value_bytes<VT>(j1 - kb0 / L.period_cols * P), idx + j1 * B / 8);
    return n;
  }
};

template <DType VT>
struct CsrRows {
  const SparseWeight& w;
  __m512i kv;
  int64_t base = 0;
  int64_t cur[kRowBlock];
  const int32_t* col_off;
  const bool gathers = sparse_gathers();
  CsrRows(const SparseWeight& w_, const int32_t* off)
      : w(w_), kv(_mm512_set1_epi32(static_cast<int>(w_.K))), col_off(off) {}
  void begin(int64_t rb, int64_t re) {
    base = rb;
    for (int64_t r = rb; r < re; ++r) cur[r - rb] = w.row_ptr[r];
  }
  // The block's entries are whole chunks of 16 from cur[]: up to and including the first
  // chunk with a column >= kb1 (columns increase within a row). Which block adds an entry
  // does not change the sum, only where x is read from: cutting chunks at kb1 instead left
  // partial chunks at both ends of each block, ~25% zero lanes at 64 entries per block. A
  // binary search for the block's end per row and block mispredicted its way to ~half the
  // time at 4096 columns in blocks of 128. Out-of-order columns still each get used once:
  // the last block takes all that remains.
  int64_t stage(int64_t r, int64_t, int64_t kb1, bool last, int64_t st, int32_t* ci, float* vf, bool& more,
                bool& bad) {
    const int64_t row_end = w.row_ptr[r + 1];
    const __m512i kb1v = _mm512_set1_epi32(static_cast<int>(kb1));
    __mmask16 bad_lanes = 0;
    int64_t e = cur[r - base], n = 0;
    more = false;
    while (e < row_end) {
      if (n == stage_capacity(W) - W) {
        more = true;
        break;
      }
      const CsrChunk<VT> c(w, e, row_end, kv, &bad_lanes);
      stage_offsets(ci + n, c.col, c.use, st, col_off, gathers);
      _mm512_store_ps(vf + n, _mm512_maskz_mov_ps(c.use, c.vals));
      n += W;
      e = e + W < row_end ? e + W : row_end;
      if (!last && _mm512_mask_cmpge_epi32_mask(c.use, c.col, kb1v)) break;
    }
    if (!last) prefetch_block(static_cast<const char*>(w.values) + value_bytes<VT>(e),
                              value_bytes<VT>(e - cur[r - base]), w.cols + e);
    cur[r - base] = e;
    bad |= bad_lanes != 0;
    return n;
  }
};

template <typename Rows>
bool t_all_widths(const SparseWeight& w, const SparseBatch& a, int64_t r0, int64_t r1) {
  Rows rows(w, a.col_off);
  bool bad = t_tiles<1>(w, a, r0, r1, rows);
  bad |= t_tiles<2>(w, a, r0, r1, rows);
  bad |= t_tiles<3>(w, a, r0, r1, rows);
  bad |= t_tiles<4>(w, a, r0, r1, rows);
  return bad;
}

template <DType VT, int B>
void nm_rows_t_typed(const SparseWeight& w, const SparseBatch& a, int64_t r0, int64_t r1) {
  t_all_widths<NmRows<VT, B>>(w, a, r0, r1);
}

template <DType VT>
bool csr_rows_t_typed(const SparseWeight& w, const SparseBatch& a, int64_t r0, int64_t r1) {
  return t_all_widths<CsrRows<VT>>(w, a, r0, r1);
}

// CSR, small batches (the AVX2 file's structure). A row's columns are checked before any x is
// read at them (per step of entries, and max_col for the last entries of a row at batches
// 2..8), so no x is read out of bounds; a row with a column >= K is reported (the call
// fails). The row's last partial step uses masked loads.

// The largest of n columns at c (0 for none).
inline unsigned max_col(const uint16_t* c, int64_t n) {
  __m512i mx = _mm512_setzero_si512();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) mx = _mm512_max_epu16(mx, _mm512_loadu_si512(c + i));
  const __m256i m256 = _mm256_max_epu16(_mm512_castsi512_si256(mx), _mm512_extracti64x4_epi64(mx, 1));
  const __m128i m = _mm_max_epu16(_mm256_castsi256_si128(m256), _mm256_extracti128_si256(m256, 1));
  // max(v) = ~min(~v), and minpos finds the min of 8 words.
  unsigned best = ~static_cast<unsigned>(_mm_cvtsi128_si32(_mm_minpos_epu16(_mm_xor_si128(m, _mm_set1_epi32(-1))))) & 0xffffu;
  for (; i < n; ++i) best = c[i] > best ? c[i] : best;
  return best;
}

#include "csr_x_at.h"

// Batch 1: x at 32 columns per step from scalar loads (csr_x_at.h) or, on Intel, two gathers
// (cpu::sparse_gathers); two FMA chains. Each step's columns are checked against K first (one
// compare of 32 words); a step with a column >= K, and the row's last partial step, gather
// masked by column < K instead, and *bad collects the lanes that failed.
template <DType VT, bool Gathers>
float csr_dot1(const SparseWeight& w, const float* x, int64_t e, int64_t e1, __mmask16& bad) {
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  const __m512i kv = _mm512_set1_epi32(static_cast<int>(w.K));
  const __m512i last_col = _mm512_set1_epi16(static_cast<int16_t>(w.K - 1));  // K <= 65536
  auto gather = [&](__m512i col, __mmask16 use) {
    const __mmask16 ok = _mm512_mask_cmplt_epi32_mask(use, col, kv);
    bad |= use & ~ok;
    return _mm512_mask_i32gather_ps(_mm512_setzero_ps(), ok, col, x, 4);
  };
  auto cols16 = [&](int64_t i) {
    return _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.cols + i)));
  };
  auto x_at16 = [&](int64_t i) {  // columns checked
    if constexpr (Gathers) return _mm512_i32gather_ps(cols16(i), x, 4);
    else return _mm512_insertf32x8(_mm512_castps256_ps512(x_at8(x, w.cols + i)), x_at8(x, w.cols + i + 8), 1);
  };
  for (; e + 2 * W <= e1; e += 2 * W) {
    prefetch_ahead(static_cast<const char*>(w.values) + value_bytes<VT>(e), value_bytes<VT>(2 * W));
    prefetch_ahead(w.cols + e, 2 * W * static_cast<int64_t>(sizeof(*w.cols)));
    __m512 x0, x1;
    if (_mm512_cmpgt_epu16_mask(_mm512_loadu_si512(w.cols + e), last_col) == 0) {
      x0 = x_at16(e);
      x1 = x_at16(e + W);
    } else {
      x0 = gather(cols16(e), 0xffff);
      x1 = gather(cols16(e + W), 0xffff);
    }
    acc0 = _mm512_fmadd_ps(load_vals<VT, false>(w.values, e, 0), x0, acc0);
    acc1 = _mm512_fmadd_ps(load_vals<VT, false>(w.values, e + W, 0), x1, acc1);
  }
  if (e + W <= e1) {
    const bool in_range = cols16_at_most(w.cols + e, _mm512_castsi512_si256(last_col));
    const __m512 x0 = in_range ? x_at16(e) : gather(cols16(e), 0xffff);
    acc0 = _mm512_fmadd_ps(load_vals<VT, false>(w.values, e, 0), x0, acc0);
    e += W;
  }
  if (e < e1) {
    const __mmask16 use = first_lanes(e1 - e);
    const __m512i col = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(use, w.cols + e));
    acc1 = _mm512_fmadd_ps(load_vals<VT, true>(w.values, e, use), gather(col, use), acc1);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

template <DType VT, bool Gathers>
bool csr_rows1(const SparseWeight& w, const SparseBatch& a, int64_t r0, int64_t r1) {
  __mmask16 bad = 0;
  for (int64_t r = r0; r < r1; ++r)
    store_out(w, a, r, 0, csr_dot1<VT, Gathers>(w, a.x, w.row_ptr[r], w.row_ptr[r + 1], bad));
  return bad != 0;
}

#include "csr_small_batches.h"

template <DType VT>
bool csr_rows_typed(const SparseWeight& w, const SparseBatch& a, int64_t r0, int64_t r1) {
  const bool gathers = sparse_gathers();
  if (a.M == 1) return gathers ? csr_rows1<VT, true>(w, a, r0, r1) : csr_rows1<VT, false>(w, a, r0, r1);
  if (a.M == 2) return gathers ? csr_rows_pair<VT, true>(w, a, r0, r1) : csr_rows_pair<VT, false>(w, a, r0, r1);
  if (csr_small_stride(a.M) == 4) return csr_rows_small<VT, 4>(w, a, r0, r1);
  return csr_rows_small<VT, 8>(w, a, r0, r1);
}

template <DType VT>
void nm_rows_dispatch(const SparseWeight& w, const SparseBatch& a, int64_t r0, int64_t r1) {
  const int win = nm_window(w.n, w.m, W);
  if (w.b == 2) {  // m = 4: 1:4 64 columns, 2:4 and 3:4 32
    if (win == 32) nm_rows_typed<VT, 2, 32>(w, a, r0, r1);
    else nm_rows_typed<VT, 2, 64>(w, a, r0, r1);
  } else {  // m = 8
    if (win == 32) nm_rows_typed<VT, 3, 32>(w, a, r0, r1);
    else if (win == 64) nm_rows_typed<VT, 3, 64>(w, a, r0, r1);
    else nm_rows_typed<VT, 3, 128>(w, a, r0, r1);  // 1:8
  }
}

template <DType VT>
void nm_rows_t_dispatch(const SparseWeight& w, const SparseBatch& a, int64_t r0, int64_t r1) {
  if (w.b == 2) nm_rows_t_typed<VT, 2>(w, a, r0, r1);
  else nm_rows_t_typed<VT, 3>(w, a, r0, r1);
}

}  // namespace

void nm_rows_avx512(const SparseWeight& w, const SparseBatch& a, int64_t r0, int64_t r1) {
  switch (w.vdtype) {
    case DType::kFloat32: nm_rows_dispatch<DType::kFloat32>(w, a, r0, r1); break;
    case DType::kBFloat16: nm_rows_dispatch<DType::kBFloat16>(w, a, r0, r1); break;
    case DType::kFloat16: nm_rows_dispatch<DType::kFloat16>(w, a, r0, r1); break;
    case kInt4Values: nm_rows_dispatch<kInt4Values>(w, a, r0, r1); break;
    default: nm_rows_dispatch<DType::kInt8>(w, a, r0, r1);
  }
}

void nm_rows_t_avx512(const SparseWeight& w, const SparseBatch& a, int64_t r0, int64_t r1) {
  switch (w.vdtype) {
    case DType::kFloat32: nm_rows_t_dispatch<DType::kFloat32>(w, a, r0, r1); break;
    case DType::kBFloat16: nm_rows_t_dispatch<DType::kBFloat16>(w, a, r0, r1); break;
    case DType::kFloat16: nm_rows_t_dispatch<DType::kFloat16>(w, a, r0, r1); break;
    case kInt4Values: nm_rows_t_dispatch<kInt4Values>(w, a, r0, r1); break;
    default: nm_rows_t_dispatch<DType::kInt8>(w, a, r0, r1);
  }
}

bool csr_rows_avx512(const SparseWeight& w, const SparseBatch& a, int64_t r0, int64_t r1) {
  return w.vdtype == DType::kInt8 ? csr_rows_typed<DType::kInt8>(w, a, r0, r1)
                                  : csr_rows_typed<DType::kFloat32>(w, a, r0, r1);
}

bool csr_rows_t_avx512(const SparseWeight& w, const SparseBatch& a, int64_t r0, int64_t r1) {
  return w.vdtype == DType::kInt8 ? csr_rows_t_typed<DType::kInt8>(w, a, r0, r1)
                                  : csr_rows_t_typed<DType::kFloat32>(w, a, r0, r1);
}

}  // namespace cpu
}  // namespace tensorslim
