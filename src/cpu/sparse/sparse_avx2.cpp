// AVX2 sparse linears (compiled with -mavx2 -mfma; F16C, which every AVX2 CPU has, is
// enabled per function for the fp16 values). 8 stored entries per step. Row-wise (small
// batches): N:M 2:4, 4:8, 3:4 and 7:8 pick their 8 x values out of a 16-column window with
// two vpermps and a blend on the window half, 1:4, 2:8, 3:8, 5:8 and 6:8 out of a 32-column
// one with four and three blends, 1:8 out of 64 columns with eight. Transposed (larger
// batches, and AVX-512 batches of up to 8 rows): every stored entry does one FMA per 8 batch
// rows. CSR at batch 1 reads x with scalar loads or, on Intel, gathers (csr_x_at.h); CSR at
// batches 2..8 runs on x transposed to [K, 2|4|8] (transpose_small_avx2, also AVX-512's).
#include <immintrin.h>

#include <cstring>

#include "sparse_kernels.h"
#include "tensorslim/sparse.h"  // sparse_gathers

#define TS_TARGET __attribute__((target("avx2,fma,f16c")))
// The per-vector helpers, forced inline: GCC left load_vals out of line (a call, and a stack
// buffer, per 8 slots: 2:4 int8 at batch 1 took 1.63 ns per vector against 1.19 for int4,
// whose path it did inline).
#define TS_VECTOR_HELPER TS_TARGET __attribute__((always_inline)) inline

namespace tensorslim {
namespace cpu {
namespace {

constexpr int W = 8;

TS_VECTOR_HELPER uint64_t load_bits(const uint8_t* p, const uint8_t* end) {
  uint64_t v = 0;
  if (end - p >= 8) {
    std::memcpy(&v, p, 8);  // one unaligned load
  } else {
    for (int i = 0; p + i < end; ++i) v |= static_cast<uint64_t>(p[i]) << (8 * i);  // never past the buffer
  }
  return v;
}

// In-group positions of 8 slots from their index bits broadcast to every lane of v (the bits
// past the 8 fields are masked off).
template <int B>
TS_VECTOR_HELPER __m256i positions_of(__m256i v) {
  const __m256i sh = B == 2 ? _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14) : _mm256_setr_epi32(0, 3, 6, 9, 12, 15, 18, 21);
  return _mm256_and_si256(_mm256_srlv_epi32(v, sh), _mm256_set1_epi32((1 << B) - 1));
}

// In-group positions of 8 slots from their index bits (the low 8*B bits of `bits`).
template <int B>
TS_VECTOR_HELPER __m256i positions(uint64_t bits) {
  return positions_of<B>(_mm256_set1_epi32(static_cast<int>(bits & 0xffffffu)));
}

// off + positions<B> of the 8 slots whose index bits start at p (8 readable bytes): the bits
// broadcast straight from memory (a load-port vpbroadcastd, not a port-5 one from a general
// register, as in the AVX-512 file's slots_at).
template <int B>
TS_VECTOR_HELPER __m256i slots_at(const uint8_t* p, __m256i off) {
  int32_t bits;
  std::memcpy(&bits, p, 4);
  return _mm256_add_epi32(off, positions_of<B>(_mm256_set1_epi32(bits)));
}

// The positions of the 8 slots from j0 (a multiple of 8, so byte aligned).
template <int B>
TS_VECTOR_HELPER __m256i decode_pos(const uint8_t* row, int64_t j0, const uint8_t* end) {
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

TS_VECTOR_HELPER __m256 lanes_below(int64_t count) {  // all-ones in the first `count` lanes
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(count < W ? count : W)),
                                                _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
}

// 8 stored values from index i as float32; `count` < 8 reads only that many (rest 0).
template <DType VT>
TS_VECTOR_HELPER __m256 load_vals(const void* base, int64_t i, int64_t count) {
  if constexpr (VT == kInt4Values) {
    // i a multiple of 8: half of one 64-bit word of the row (include/tensorslim/sparse.h). Lane
    // j of the broadcast word sees its low 32 bits (j even) or high 32 (j odd), where slot
    // 8 * half + j is nibble 4 * half + j / 2: shifted to the top, then arithmetically back down.
    alignas(32) static constexpr int32_t kUp[2][8] = {{28, 28, 24, 24, 20, 20, 16, 16}, {12, 12, 8, 8, 4, 4, 0, 0}};
    long long word;
    std::memcpy(&word, static_cast<const unsigned char*>(base) + (i >> 4) * 8, 8);
    const __m256i up = _mm256_load_si256(reinterpret_cast<const __m256i*>(kUp[(i >> 3) & 1]));
    const __m256 v = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_sllv_epi32(_mm256_set1_epi64x(word), up), 28));
    return count < W ? _mm256_and_ps(v, lanes_below(count)) : v;
  }
  alignas(32) unsigned char buf[32];
  const unsigned char* p = static_cast<const unsigned char*>(base) + value_bytes<VT>(i);
  if (count < W) {
    std::memset(buf, 0, sizeof(buf));
    std::memcpy(buf, p, value_bytes<VT>(count));
    p = buf;
  }
  if constexpr (VT == DType::kFloat32) {
    return _mm256_loadu_ps(reinterpret_cast<const float*>(p));
  } else if constexpr (VT == DType::kInt8) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  } else {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    if constexpr (VT == DType::kFloat16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
}

TS_TARGET inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Up to 8 CSR entries from e (of a row ending at e1): their columns, their count, and `use`,
// the lanes (all-ones) that hold an entry with a column < K; entries at columns >= K set their
// bits in *bad.
struct CsrChunk {
  __m256i col;
  __m256 use;
  int64_t count;
  TS_TARGET CsrChunk(const SparseWeight& w, int64_t e, int64_t e1, __m256i kv, int* bad)
      : count(e1 - e < W ? e1 - e : W) {
    __m128i c16;
    if (count == W) {
      c16 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w.cols + e));
    } else {
      alignas(16) uint16_t buf[W] = {};
      std::memcpy(buf, w.cols + e, count * 2);
      c16 = _mm_load_si128(reinterpret_cast<const __m128i*>(buf));
    }
    col = _mm256_cvtepu16_epi32(c16);
    const __m256 act = lanes_below(count);
    const __m256 ok = _mm256_castsi256_ps(_mm256_cmpgt_epi32(kv, col));
    *bad |= _mm256_movemask_ps(_mm256_andnot_ps(ok, act));
    use = _mm256_and_ps(ok, act);
  }
};

// Scalar code: no target attribute, so that the shared t_tiles (transposed_tiles.h) may inline it
// under clang too.
__attribute__((always_inline)) inline void store_out(const SparseWeight& w, const SparseBatch& a, int64_t r,
                                                     int64_t i, float acc) {
  a.y[i * a.ldy + r * a.ldr] = acc * (w.scales ? w.scales[r] : 1.0f) + (a.bias ? a.bias[r] : 0.0f);
}

// Stages the tile offsets ci[0, 8) of the columns in col (lanes in k; the others 0), as the
// AVX-512 file does.
TS_TARGET inline void stage_offsets(int32_t* ci, __m256i col, __m256 k, int64_t st, const int32_t* col_off,
                                    bool gathers) {
  if (!col_off) {
    _mm256_store_si256(reinterpret_cast<__m256i*>(ci),
                       _mm256_and_si256(_mm256_mullo_epi32(col, _mm256_set1_epi32(static_cast<int>(st))),
                                        _mm256_castps_si256(k)));
    return;
  }
  if (gathers) {
    const __m256i use = _mm256_castps_si256(k);
    _mm256_store_si256(reinterpret_cast<__m256i*>(ci),
                       _mm256_mask_i32gather_epi32(_mm256_setzero_si256(), col_off, col, use, 4));
    return;
  }
  alignas(32) int32_t c[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(c), col);
  const int use = _mm256_movemask_ps(k);
  for (int j = 0; j < 8; ++j) ci[j] = (use >> j) & 1 ? col_off[c[j]] : 0;
}

// The slot layout of one N:M row (see the AVX-512 file): periods of lcm(n, 8) slots.
struct NmLayout {
  __m256i offs[8];
  __m256i rel[8];        // offs[v] - base[v]: offsets from the vector's first group
  // Bits 3, 4 and 5 of rel[v] in the sign bit, as blendv reads them: which 8-column part of
  // the window a lane's x comes from. A slot's window offset is rel[v] (a multiple of m) plus
  // its position (< m <= 8), so those bits are rel[v]'s: set once, not per vector.
  __m256 part_bit[8][3];
  int64_t base[8] = {};  // offs[v]'s first lane
  int nper = 1;
  int64_t period_cols = 0;
  int64_t full = 0;
  TS_TARGET explicit NmLayout(const SparseWeight& w) {
    int P = W;
    while (P % w.n) P += W;
    nper = P / W;
    period_cols = P / w.n * w.m;
    for (int v = 0; v < nper; ++v) {
      alignas(32) int32_t o[W];
      for (int l = 0; l < W; ++l) o[l] = (v * W + l) / w.n * w.m;
      offs[v] = _mm256_load_si256(reinterpret_cast<const __m256i*>(o));
      base[v] = o[0];
      rel[v] = _mm256_sub_epi32(offs[v], _mm256_set1_epi32(o[0]));
      for (int b = 0; b < 3; ++b)
        part_bit[v][b] = _mm256_castsi256_ps(_mm256_sllv_epi32(rel[v], _mm256_set1_epi32(28 - b)));
    }
    full = w.K / w.m * w.n;
  }
};

// Output row r for batch rows i0 .. i0+R-1. WIN: the x window 8 slots are read from
// (nm_window): 16 columns (two vpermps and a blend), 32 (four and three blends) or 64 (eight
// and seven). A window that would reach past K (near the row's end, where a vector starts
// mid-group) gathers.
template <DType VT, int B, int WIN, int R>
TS_TARGET void nm_row(const SparseWeight& w, const SparseBatch& a, const NmLayout& L, int64_t r, int64_t i0) {
  __m256 acc[R];
  for (int q = 0; q < R; ++q) acc[q] = _mm256_setzero_ps();
  const uint8_t* idx = w.indices + r * w.idx_row_bytes;
  const int64_t vb = r * w.val_stride;
  const float* x = a.x + i0 * a.ldx;
  int64_t j0 = 0, col0 = 0;
  int v = 0;
  const int64_t lim = fast_end<B>(idx, w.idx_end, L.full);
  __m256 acc2[R];  // a second set for the unrolled loop: two FMA chains per batch row
  for (int q = 0; q < R; ++q) acc2[q] = _mm256_setzero_ps();
  auto body = [&](const __m256i rel, int v, int64_t j, int64_t c0, __m256* A) TS_TARGET __attribute__((always_inline)) {
    const __m256 vals = load_vals<VT>(w.values, vb + j, W);
    const __m256 bit3 = L.part_bit[v][0], bit4 = L.part_bit[v][1], bit5 = L.part_bit[v][2];  // WIN 16 / 32 / 64
    const bool window = c0 + WIN <= w.K;
    for (int q = 0; q < R; ++q) {
      const float* xq = x + q * a.ldx;
      __m256 xv;
      // 8 columns of x from 8 * k on, picked by rel's low 3 bits
      auto part = [&](int k) TS_TARGET {
        return _mm256_permutevar8x32_ps(_mm256_loadu_ps(xq + c0 + k * W), rel);
      };
      if (WIN == 16 && window) {
        xv = _mm256_blendv_ps(part(0), part(1), bit3);  // bit 3: upper half
      } else if (WIN == 32 && window) {
        xv = _mm256_blendv_ps(_mm256_blendv_ps(part(0), part(1), bit3), _mm256_blendv_ps(part(2), part(3), bit3),
                              bit4);
      } else if (WIN == 64 && window) {
        const __m256 lo = _mm256_blendv_ps(_mm256_blendv_ps(part(0), part(1), bit3),
                                           _mm256_blendv_ps(part(2), part(3), bit3), bit4);
        const __m256 hi = _mm256_blendv_ps(_mm256_blendv_ps(part(4), part(5), bit3),
                                           _mm256_blendv_ps(part(6), part(7), bit3), bit4);
        xv = _mm256_blendv_ps(lo, hi, bit5);
      } else {
        xv = _mm256_i32gather_ps(xq, _mm256_add_epi32(rel, _mm256_set1_epi32(static_cast<int>(c0))), 4);
      }
      A[q] = _mm256_fmadd_ps(vals, xv, A[q]);
    }
  };
  if (L.nper == 1) {  // n divides 8: every vector starts a group, one offset pattern
    const __m256i off = L.offs[0];
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
  const __m256i kv = _mm256_set1_epi32(static_cast<int>(w.K));
  for (; j0 < w.slots; j0 += W) {
    const __m256i col = _mm256_add_epi32(_mm256_add_epi32(L.offs[v], decode_pos<B>(idx, j0, w.idx_end)),
                                         _mm256_set1_epi32(static_cast<int>(col0)));
    const __m256 k = _mm256_and_ps(lanes_below(w.slots - j0), _mm256_castsi256_ps(_mm256_cmpgt_epi32(kv, col)));
    const __m256 vals = load_vals<VT>(w.values, vb + j0, w.slots - j0);
    for (int q = 0; q < R; ++q) {
      const __m256 xv = _mm256_mask_i32gather_ps(_mm256_setzero_ps(), x + q * a.ldx, col, k, 4);
      acc[q] = _mm256_fmadd_ps(vals, xv, acc[q]);
    }
    if (++v == L.nper) {
      v = 0;
      col0 += L.period_cols;
    }
  }
  for (int q = 0; q < R; ++q) store_out(w, a, r, i0 + q, hsum(_mm256_add_ps(acc[q], acc2[q])));
}

template <DType VT, int B, int WIN>
TS_TARGET void nm_rows_typed(const SparseWeight& w, const SparseBatch& a, int64_t r0, int64_t r1) {
  const NmLayout L(w);
  for (int64_t r = r0; r < r1; ++r) {
    int64_t i = 0;
    for (; i + 4 <= a.M; i += 4) nm_row<VT, B, WIN, 4>(w, a, L, r, i);
    for (; i + 2 <= a.M; i += 2) nm_row<VT, B, WIN, 2>(w, a, L, r, i);
    for (; i < a.M; ++i) nm_row<VT, B, WIN, 1>(w, a, L, r, i);
  }
}

// Transposed kernel: a[s][u] holds batch rows 8u .. 8u+7 of the tile for one output row;
// S independent sets (entries t, t+S, ...) keep the FMA latency off the critical path when
// the tile is narrow.
template <int V>
struct TAcc {
  static constexpr int S = V == 1 ? 4 : V == 2 ? 2 : 1;
  // part[0 .. V * W) += the n staged entries (tile offsets ci, values vf; n a multiple of W)
  // times their tile rows. The sums live in locals for the whole loop: as members of an
  // object some instantiations (2:4 bf16) kept one in memory, a store and a load per entry.
  TS_TARGET static void add(float* part, const float* xt, const int32_t* ci, const float* vf, int64_t n) {
    __m256 a[S][V];
    for (int u = 0; u < V; ++u) a[0][u] = _mm256_load_ps(part + u * W);
    for (int s = 1; s < S; ++s)
      for (int u = 0; u < V; ++u) a[s][u] = _mm256_setzero_ps();
    for (int64_t t = 0; t < n; t += S) {
      for (int s = 0; s < S; ++s) {
        const float* xr = xt + ci[t + s];
        const __m256 bv = _mm256_set1_ps(vf[t + s]);
        for (int u = 0; u < V; ++u) a[s][u] = _mm256_fmadd_ps(bv, _mm256_loadu_ps(xr + u * W), a[s][u]);
      }
    }
    for (int u = 0; u < V; ++u) {
      __m256 sum = a[0][u];
      for (int s = 1; s < S; ++s) sum = _mm256_add_ps(sum, a[s][u]);
      _mm256_store_ps(part + u * W, sum);
    }
  }
};

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#include "transposed_tiles.h"
#pragma GCC pop_options

template <DType VT, int B>
struct NmRows {
  const SparseWeight& w;
  NmLayout L;
  __m256i kv;
  const int32_t* col_off;
  const bool gathers = sparse_gathers();
  TS_TARGET NmRows(const SparseWeight& w_, const int32_t* off)
      : w(w_), L(w_), kv(_mm256_set1_epi32(static_cast<int>(w_.K))), col_off(off) {}
  void begin(int64_t, int64_t) {}
  // At most kMaxKBlock + 8 slots per block (sparse_kernels.h): never `more`.
  TS_TARGET int64_t stage(int64_t r, int64_t kb0, int64_t kb1, bool last, int64_t st, int32_t* ci, float* vf,
                          bool& more, bool&) {
    more = false;
    const uint8_t* idx = w.indices + r * w.idx_row_bytes;
    const int64_t vb = r * w.val_stride;
    const int64_t P = static_cast<int64_t>(L.nper) * W;
    const int64_t j1 = last ? w.slots : kb1 / L.period_cols * P;
    int64_t col0 = kb0, n = 0;
    int v = 0;
    for (int64_t j0 = kb0 / L.period_cols * P; j0 < j1; j0 += W, n += W) {
      const __m256i col = _mm256_add_epi32(_mm256_add_epi32(L.offs[v], decode_pos<B>(idx, j0, w.idx_end)),
                                           _mm256_set1_epi32(static_cast<int>(col0)));
      const int64_t count = w.slots - j0 < W ? w.slots - j0 : W;
      const __m256 k = _mm256_and_ps(lanes_below(count), _mm256_castsi256_ps(_mm256_cmpgt_epi32(kv, col)));
      // Skipped lanes: offset 0, value 0.
      stage_offsets(ci + n, col, k, st, col_off, gathers);
      _mm256_store_ps(vf + n, _mm256_and_ps(load_vals<VT>(w.values, vb + j0, count), k));
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
  __m256i kv;
  int64_t base = 0;
  int64_t cur[kRowBlock];
  const int32_t* col_off;
  const bool gathers = sparse_gathers();
  TS_TARGET CsrRows(const SparseWeight& w_, const int32_t* off)
      : w(w_), kv(_mm256_set1_epi32(static_cast<int>(w_.K))), col_off(off) {}
  void begin(int64_t rb, int64_t re) {
    base = rb;
    for (int64_t r = rb; r < re; ++r) cur[r - rb] = w.row_ptr[r];
  }
  // The block's entries: whole chunks from cur[] up to and including the first with a
  // column >= kb1 (see the AVX-512 file).
  TS_TARGET int64_t stage(int64_t r, int64_t, int64_t kb1, bool last, int64_t st, int32_t* ci, float* vf,
                          bool& more, bool& bad) {
    const int64_t row_end = w.row_ptr[r + 1];
    const __m256i kb1v = _mm256_set1_epi32(static_cast<int>(kb1));
    int bad_lanes = 0;
    int64_t e = cur[r - base], n = 0;
    more = false;
    while (e < row_end) {
      if (n == stage_capacity(W) - W) {
        more = true;
        break;
      }
      const CsrChunk c(w, e, row_end, kv, &bad_lanes);
      stage_offsets(ci + n, c.col, c.use, st, col_off, gathers);
      _mm256_store_ps(vf + n, _mm256_and_ps(load_vals<VT>(w.values, e, c.count), c.use));
      n += W;
      e += c.count;
      const __m256 past = _mm256_andnot_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(kb1v, c.col)), c.use);
      if (!last && _mm256_movemask_ps(past)) break;
    }
    if (!last) prefetch_block(static_cast<const char*>(w.values) + value_bytes<VT>(e),
                              value_bytes<VT>(e - cur[r - base]), w.cols + e);
    cur[r - base] = e;
    bad |= bad_lanes != 0;
    return n;
  }
};

template <typename Rows>
TS_TARGET bool t_all_widths(const SparseWeight& w, const SparseBatch& a, int64_t r0, int64_t r1) {
  Rows rows(w, a.col_off);
  bool bad = t_tiles<1>(w, a, r0, r1, rows);
  bad |= t_tiles<2>(w, a, r0, r1, rows);
  bad |= t_tiles<3>(w, a, r0, r1, rows);
  bad |= t_tiles<4>(w, a, r0, r1, rows);
  bad |= t_tiles<5>(w, a, r0, r1, rows);
  bad |= t_tiles<6>(w, a, r0, r1, rows);
  bad |= t_tiles<7>(w, a, r0, r1, rows);
  bad |= t_tiles<8>(w, a, r0, r1, rows);
  return bad;
}

template <DType VT, int B>
TS_TARGET void nm_rows_t_typed(const SparseWeight& w, const SparseBatch& a, int64_t r0, int64_t r1) {
  t_all_widths<NmRows<VT, B>>(w, a, r0, r1);
}

template <DType VT>
TS_TARGET bool csr_rows_t_typed(const SparseWeight& w, const SparseBatch& a, int64_t r0, int64_t r1) {
  return t_all_widths<CsrRows<VT>>(w, a, r0, r1);
}

// CSR, small batches. A row's columns are checked before any x is read at them (per step of
// entries, and max_col for the last entries of a row at batches 2..8), so no x is read out of
// bounds; a row with a column >= K is reported (the call fails). Entries past the row's end
// that a full 8-lane load reads (inside the buffer) are masked off; only the buffer's last
// entries are copied.

// The largest of n columns at c (0 for none).
TS_TARGET inline unsigned max_col(const uint16_t* c, int64_t n) {
  __m256i mx = _mm256_setzero_si256();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) mx = _mm256_max_epu16(mx, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + i)));
  const __m128i m = _mm_max_epu16(_mm256_castsi256_si128(mx), _mm256_extracti128_si256(mx, 1));
  // max(v) = ~min(~v), and minpos finds the min of 8 words.
  unsigned best = ~static_cast<unsigned>(_mm_cvtsi128_si32(_mm_minpos_epu16(_mm_xor_si128(m, _mm_set1_epi32(-1))))) & 0xffffu;
  for (; i < n; ++i) best = c[i] > best ? c[i] : best;
  return best;
}

#include "csr_x_at.h"

// Batch 1: x at 16 columns per step from scalar loads (csr_x_at.h) or, on Intel, two gathers
// (cpu::sparse_gathers); two FMA chains. Each step's columns are checked against K first (one
// compare of 16 words); a step with a column >= K, and the row's last partial step, gather
// masked by column < K instead, and *bad collects the lanes that failed.
template <DType VT, bool Gathers>
TS_TARGET float csr_dot1(const SparseWeight& w, const float* x, int64_t e, int64_t e1, int64_t nnz,
                         __m256i& bad) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  const __m256i kv = _mm256_set1_epi32(static_cast<int>(w.K));
  const __m256i last_col = _mm256_set1_epi16(static_cast<int16_t>(w.K - 1));  // K <= 65536
  auto gather = [&](__m256i col, __m256 use) TS_TARGET {
    const __m256 ok = _mm256_and_ps(use, _mm256_castsi256_ps(_mm256_cmpgt_epi32(kv, col)));
    bad = _mm256_or_si256(bad, _mm256_castps_si256(_mm256_andnot_ps(ok, use)));
    return _mm256_mask_i32gather_ps(_mm256_setzero_ps(), x, col, ok, 4);
  };
  auto cols8 = [&](int64_t i) TS_TARGET {
    return _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.cols + i)));
  };
  auto x_at = [&](int64_t i) TS_TARGET {  // columns checked
    if constexpr (Gathers) return _mm256_i32gather_ps(x, cols8(i), 4);
    else return x_at8(x, w.cols + i);
  };
  const __m256 all = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
  for (; e + 2 * W <= e1; e += 2 * W) {
    prefetch_ahead(static_cast<const char*>(w.values) + value_bytes<VT>(e), value_bytes<VT>(2 * W));
    prefetch_ahead(w.cols + e, 2 * W * static_cast<int64_t>(sizeof(*w.cols)));
    __m256 x0, x1;
    if (cols16_at_most(w.cols + e, last_col)) {
      x0 = x_at(e);
      x1 = x_at(e + W);
    } else {
      x0 = gather(cols8(e), all);
      x1 = gather(cols8(e + W), all);
    }
    acc0 = _mm256_fmadd_ps(load_vals<VT>(w.values, e, W), x0, acc0);
    acc1 = _mm256_fmadd_ps(load_vals<VT>(w.values, e + W, W), x1, acc1);
  }
  if (e + W <= e1) {
    const __m256 x0 = cols8_at_most(w.cols + e, last_col) ? x_at(e) : gather(cols8(e), all);
    acc0 = _mm256_fmadd_ps(load_vals<VT>(w.values, e, W), x0, acc0);
    e += W;
  }
  if (e < e1) {
    const int64_t count = e1 - e;
    const __m256 use = lanes_below(count);
    __m256i col;
    __m256 vals;
    if (e + W <= nnz) {
      col = cols8(e);
      vals = load_vals<VT>(w.values, e, W);
    } else {
      alignas(16) uint16_t buf[W] = {};
      std::memcpy(buf, w.cols + e, count * 2);
      col = _mm256_cvtepu16_epi32(_mm_load_si128(reinterpret_cast<const __m128i*>(buf)));
      vals = load_vals<VT>(w.values, e, count);
    }
    acc1 = _mm256_fmadd_ps(_mm256_and_ps(vals, use), gather(col, use), acc1);  // lanes past the row: 0 x 0
  }
  return hsum(_mm256_add_ps(acc0, acc1));
}

template <DType VT, bool Gathers>
TS_TARGET bool csr_rows1(const SparseWeight& w, const SparseBatch& a, int64_t r0, int64_t r1) {
  const int64_t nnz = w.row_ptr[w.N];
  __m256i bad = _mm256_setzero_si256();
  for (int64_t r = r0; r < r1; ++r)
    store_out(w, a, r, 0, csr_dot1<VT, Gathers>(w, a.x, w.row_ptr[r], w.row_ptr[r + 1], nnz, bad));
  return !_mm256_testz_si256(bad, bad);
}

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#include "csr_small_batches.h"
#pragma GCC pop_options

// 8 rows of 8 floats (r[i]: x row i, columns k .. k + 7) transposed in registers and stored as
// 8 rows of 8 floats, ld apart (xt rows k .. k + 7).
TS_TARGET inline void store_transposed8(__m256 r[8], float* d, int64_t ld) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int j = 0; j < 4; ++j) {
    _mm256_storeu_ps(d + ld * j, _mm256_permute2f128_ps(u[j], u[j + 4], 0x20));
    _mm256_storeu_ps(d + ld * (j + 4), _mm256_permute2f128_ps(u[j], u[j + 4], 0x31));
  }
}

// Rows i0 .. i0 + 7 of x (rows >= M read as zeros), columns k .. k + 7, into xt rows k .. k + 7
// at column i0 (row stride st).
TS_TARGET inline void transpose_block8(const float* x, int64_t M, int64_t ldx, int64_t i0, int64_t k, float* xt,
                                       int64_t st) {
  __m256 r[8];
  for (int i = 0; i < 8; ++i) r[i] = i0 + i < M ? _mm256_loadu_ps(x + (i0 + i) * ldx + k) : _mm256_setzero_ps();
  store_transposed8(r, xt + k * st + i0, st);
}

}  // namespace

// st = 8 is one tile of the larger batches' kind (transpose_tile_avx2); st = 2 and 4 take 4
// columns per step, rows past M read as zeros, the last K % 4 one element at a time. All of it
// one element at a time, batch 8 of 4096 columns took ~17 us of a 4096 x 4096 90% product's
// ~0.5 ms (2-core Intel Xeon, thirty-seventh session); this ~5 us.
TS_TARGET void transpose_small_avx2(const float* x, int64_t M, int64_t K, int64_t ldx, int st, float* xt) {
  if (st == 8) {  // one tile of 8 columns
    transpose_tile_avx2(x, M, ldx, 0, K, xt, 8);
    return;
  }
  int64_t k = 0;
  if (st == 4) {
    for (; k + 4 <= K; k += 4) {
      __m128 r[4];
      for (int i = 0; i < 4; ++i) r[i] = i < M ? _mm_loadu_ps(x + i * ldx + k) : _mm_setzero_ps();
      _MM_TRANSPOSE4_PS(r[0], r[1], r[2], r[3]);
      for (int j = 0; j < 4; ++j) _mm_storeu_ps(xt + (k + j) * 4, r[j]);
    }
  } else {  // st == 2, M == 2
    for (; k + 4 <= K; k += 4) {
      const __m128 a = _mm_loadu_ps(x + k), b = _mm_loadu_ps(x + ldx + k);
      _mm_storeu_ps(xt + k * 2, _mm_unpacklo_ps(a, b));
      _mm_storeu_ps(xt + k * 2 + 4, _mm_unpackhi_ps(a, b));
    }
  }
  for (; k < K; ++k) {
    for (int64_t i = 0; i < st; ++i) xt[k * st + i] = i < M ? x[i * ldx + k] : 0.0f;
  }
}

// Columns [k0, k1) of x [M, K] into one transposed tile [K, st] (rows >= M zeros up to st, a
// multiple of 8) in 8 x 8 blocks, the last (k1 - k0) % 8 columns one element at a time. One
// element at a time throughout, 64 rows of 16 KiB stride all fell in one L1 set: a 16 x 4096
// CSR layer's call (nearly all transposition) took 183 us at 64 rows and 639 at 256 on the
// thirty-seventh session's Xeon.
TS_TARGET void transpose_tile_avx2(const float* x, int64_t M, int64_t ldx, int64_t k0, int64_t k1, float* xt,
                                   int64_t st) {
  int64_t k = k0;
  for (; k + 8 <= k1; k += 8)
    for (int64_t i0 = 0; i0 < st; i0 += 8) transpose_block8(x, M, ldx, i0, k, xt, st);
  for (; k < k1; ++k)
    for (int64_t i = 0; i < st; ++i) xt[k * st + i] = i < M ? x[i * ldx + k] : 0.0f;
}

namespace {

template <DType VT>
TS_TARGET bool csr_rows_typed(const SparseWeight& w, const SparseBatch& a, int64_t r0, int64_t r1) {
  const bool gathers = sparse_gathers();
  if (a.M == 1) return gathers ? csr_rows1<VT, true>(w, a, r0, r1) : csr_rows1<VT, false>(w, a, r0, r1);
  if (a.M == 2) return gathers ? csr_rows_pair<VT, true>(w, a, r0, r1) : csr_rows_pair<VT, false>(w, a, r0, r1);
  if (csr_small_stride(a.M) == 4) return csr_rows_small<VT, 4>(w, a, r0, r1);
  return csr_rows_small<VT, 8>(w, a, r0, r1);
}

template <DType VT>
TS_TARGET void nm_rows_dispatch(const SparseWeight& w, const SparseBatch& a, int64_t r0, int64_t r1) {
  const int win = nm_window(w.n, w.m, W);
  if (w.b == 2) {  // m = 4: 1:4 32 columns, 2:4 and 3:4 16
    if (win == 16) nm_rows_typed<VT, 2, 16>(w, a, r0, r1);
    else nm_rows_typed<VT, 2, 32>(w, a, r0, r1);
  } else {  // m = 8
    if (win == 16) nm_rows_typed<VT, 3, 16>(w, a, r0, r1);
    else if (win == 32) nm_rows_typed<VT, 3, 32>(w, a, r0, r1);
    else nm_rows_typed<VT, 3, 64>(w, a, r0, r1);  // 1:8
  }
}

template <DType VT>
TS_TARGET void nm_rows_t_dispatch(const SparseWeight& w, const SparseBatch& a, int64_t r0, int64_t r1) {
  if (w.b == 2) nm_rows_t_typed<VT, 2>(w, a, r0, r1);
  else nm_rows_t_typed<VT, 3>(w, a, r0, r1);
}

}  // namespace

TS_TARGET void nm_rows_avx2(const SparseWeight& w, const SparseBatch& a, int64_t r0, int64_t r1) {
  switch (w.vdtype) {
    case DType::kFloat32: nm_rows_dispatch<DType::kFloat32>(w, a, r0, r1); break;
    case DType::kBFloat16: nm_rows_dispatch<DType::kBFloat16>(w, a, r0, r1); break;
    case DType::kFloat16: nm_rows_dispatch<DType::kFloat16>(w, a, r0, r1); break;
    case kInt4Values: nm_rows_dispatch<kInt4Values>(w, a, r0, r1); break;
    default: nm_rows_dispatch<DType::kInt8>(w, a, r0, r1);
  }
}

TS_TARGET void nm_rows_t_avx2(const SparseWeight& w, const SparseBatch& a, int64_t r0, int64_t r1) {
  switch (w.vdtype) {
    case DType::kFloat32: nm_rows_t_dispatch<DType::kFloat32>(w, a, r0, r1); break;
    case DType::kBFloat16: nm_rows_t_dispatch<DType::kBFloat16>(w, a, r0, r1); break;
    case DType::kFloat16: nm_rows_t_dispatch<DType::kFloat16>(w, a, r0, r1); break;
    case kInt4Values: nm_rows_t_dispatch<kInt4Values>(w, a, r0, r1); break;
    default: nm_rows_t_dispatch<DType::kInt8>(w, a, r0, r1);
  }
}

TS_TARGET bool csr_rows_avx2(const SparseWeight& w, const SparseBatch& a, int64_t r0, int64_t r1) {
  return w.vdtype == DType::kInt8 ? csr_rows_typed<DType::kInt8>(w, a, r0, r1)
                                  : csr_rows_typed<DType::kFloat32>(w, a, r0, r1);
}

TS_TARGET bool csr_rows_t_avx2(const SparseWeight& w, const SparseBatch& a, int64_t r0, int64_t r1) {
  return w.vdtype == DType::kInt8 ? csr_rows_t_typed<DType::kInt8>(w, a, r0, r1)
                                  : csr_rows_t_typed<DType::kFloat32>(w, a, r0, r1);
}

}  // namespace cpu
}  // namespace tensorslim
