// AVX-512 sparse linears (compiled with -mavx512f/bw/vl/dq). 16 stored entries per step.
// Row-wise (small batches): N:M 2:4 and 4:8 pick their 16 x values out of a 32-column window
// with one vpermt2ps; other N:M and CSR gather them. Transposed (larger batches): every
// stored entry does one FMA per 16 batch rows against the transposed activations.
#include <immintrin.h>

#include <cstring>

#include "sparse_kernels.h"

namespace tensorslim {
namespace cpu {
namespace {

constexpr int W = 16;

inline uint64_t load_bits(const uint8_t* p, const uint8_t* end) {
  uint64_t v = 0;
  std::memcpy(&v, p, end - p >= 8 ? 8 : static_cast<size_t>(end - p));  // never past the buffer
  return v;
}

// In-group positions of the 16 slots from j0 (a multiple of 16, so byte aligned).
template <int B>
inline __m512i decode_pos(const uint8_t* row, int64_t j0, const uint8_t* end) {
  const uint64_t bits = load_bits(row + ((j0 * B) >> 3), end);
  if constexpr (B == 2) {
    const __m512i sh = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    return _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32(static_cast<int>(bits)), sh),
                            _mm512_set1_epi32(3));
  } else {
    const __m512i v = _mm512_set1_epi64(static_cast<long long>(bits));
    const __m512i lo = _mm512_srlv_epi64(v, _mm512_setr_epi64(0, 3, 6, 9, 12, 15, 18, 21));
    const __m512i hi = _mm512_srlv_epi64(v, _mm512_setr_epi64(24, 27, 30, 33, 36, 39, 42, 45));
    const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi64_epi32(lo)),
                                            _mm512_cvtepi64_epi32(hi), 1);
    return _mm512_and_si512(both, _mm512_set1_epi32(7));
  }
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

inline void store_out(const SparseWeight& w, const SparseBatch& a, int64_t r, int64_t i, float acc) {
  a.y[i * a.ldy + r] = acc * (w.scales ? w.scales[r] : 1.0f) + (a.bias ? a.bias[r] : 0.0f);
}

// The slot layout of one N:M row, the same for every row: a period of P = lcm(n, 16) slots
// starts at a group boundary; vector v of a period holds the groups at column offsets offs[v].
struct NmLayout {
  __m512i offs[8];
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
    }
    full = w.K / w.m * w.n;
  }
};

// Output row r for batch rows i0 .. i0+R-1. PERM: n | 16 and 16 slots span 32 columns.
template <DType VT, int B, bool PERM, int R>
void nm_row(const SparseWeight& w, const SparseBatch& a, const NmLayout& L, int64_t r, int64_t i0) {
  __m512 acc[R];
  for (int q = 0; q < R; ++q) acc[q] = _mm512_setzero_ps();
  const uint8_t* idx = w.indices + r * w.idx_row_bytes;
  const int64_t vb = r * w.slots;
  const float* x = a.x + i0 * a.ldx;
  int64_t j0 = 0, col0 = 0;
  int v = 0;
  for (; j0 + W <= L.full; j0 += W) {
    const __m512i rel = _mm512_add_epi32(L.offs[v], decode_pos<B>(idx, j0, w.idx_end));
    const __m512 vals = load_vals<VT, false>(w.values, vb + j0, 0);
    for (int q = 0; q < R; ++q) {
      const float* xq = x + q * a.ldx;
      __m512 xv;
      if constexpr (PERM) {
        xv = _mm512_permutex2var_ps(_mm512_loadu_ps(xq + col0), rel, _mm512_loadu_ps(xq + col0 + W));
      } else {
        xv = _mm512_i32gather_ps(_mm512_add_epi32(rel, _mm512_set1_epi32(static_cast<int>(col0))), xq, 4);
      }
      acc[q] = _mm512_fmadd_ps(vals, xv, acc[q]);
    }
    if (++v == L.nper) {
      v = 0;
      col0 += L.period_cols;
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
  for (int q = 0; q < R; ++q) store_out(w, a, r, i0 + q, _mm512_reduce_add_ps(acc[q]));
}

template <DType VT, int B, bool PERM>
void nm_rows_typed(const SparseWeight& w, const SparseBatch& a, int64_t r0, int64_t r1) {
  const NmLayout L(w);
  for (int64_t r = r0; r < r1; ++r) {
    int64_t i = 0;
    for (; i + 4 <= a.M; i += 4) nm_row<VT, B, PERM, 4>(w, a, L, r, i);
    for (; i + 2 <= a.M; i += 2) nm_row<VT, B, PERM, 2>(w, a, L, r, i);
    for (; i < a.M; ++i) nm_row<VT, B, PERM, 1>(w, a, L, r, i);
  }
}

// Transposed kernel: acc[v] holds batch rows 16v .. 16v+15 of the tile for one output row.
template <int V>
inline void t_step(const float* xt, int64_t st, const int32_t* ci, const float* vf, __m512* acc) {
  for (int t = 0; t < W; ++t) {
    const float* xr = xt + static_cast<int64_t>(ci[t]) * st;
    const __m512 bv = _mm512_set1_ps(vf[t]);
    for (int u = 0; u < V; ++u) acc[u] = _mm512_fmadd_ps(bv, _mm512_loadu_ps(xr + u * W), acc[u]);
  }
}

template <int V>
inline void t_store(const SparseWeight& w, const SparseBatch& a, int64_t r, int64_t m0, int64_t mt, __m512* acc) {
  alignas(64) float buf[V * W];
  for (int u = 0; u < V; ++u) _mm512_store_ps(buf + u * W, acc[u]);
  for (int64_t i = 0; i < mt; ++i) store_out(w, a, r, m0 + i, buf[i]);
}

template <DType VT, int B, int V>
void nm_rows_t_tile(const SparseWeight& w, const SparseBatch& a, int64_t r0, int64_t r1, int64_t m0, int64_t mt) {
  const NmLayout L(w);
  const int64_t st = tile_stride(mt, W);
  const float* xt = a.xt + (m0 / kTileM) * w.K * kTileM;
  const __m512i kv = _mm512_set1_epi32(static_cast<int>(w.K));
  alignas(64) int32_t ci[W];
  alignas(64) float vf[W];
  for (int64_t r = r0; r < r1; ++r) {
    __m512 acc[V];
    for (int u = 0; u < V; ++u) acc[u] = _mm512_setzero_ps();
    const uint8_t* idx = w.indices + r * w.idx_row_bytes;
    const int64_t vb = r * w.slots;
    int64_t col0 = 0;
    int v = 0;
    for (int64_t j0 = 0; j0 < w.slots; j0 += W) {
      const __mmask16 act = first_lanes(w.slots - j0);
      const __m512i col = _mm512_add_epi32(_mm512_add_epi32(L.offs[v], decode_pos<B>(idx, j0, w.idx_end)),
                                           _mm512_set1_epi32(static_cast<int>(col0)));
      const __mmask16 k = act & _mm512_cmplt_epi32_mask(col, kv);
      const __m512 vals = act == 0xffff ? load_vals<VT, false>(w.values, vb + j0, 0)
                                        : load_vals<VT, true>(w.values, vb + j0, act);
      _mm512_store_si512(ci, _mm512_maskz_mov_epi32(k, col));  // skipped lanes: column 0, value 0
      _mm512_store_ps(vf, _mm512_maskz_mov_ps(k, vals));
      t_step<V>(xt, st, ci, vf, acc);
      if (++v == L.nper) {
        v = 0;
        col0 += L.period_cols;
      }
    }
    t_store<V>(w, a, r, m0, mt, acc);
  }
}

template <DType VT, int B>
void nm_rows_t_typed(const SparseWeight& w, const SparseBatch& a, int64_t r0, int64_t r1) {
  for (int64_t m0 = 0; m0 < a.M; m0 += kTileM) {
    const int64_t mt = a.M - m0 < kTileM ? a.M - m0 : kTileM;
    switch ((mt + W - 1) / W) {
      case 1: nm_rows_t_tile<VT, B, 1>(w, a, r0, r1, m0, mt); break;
      case 2: nm_rows_t_tile<VT, B, 2>(w, a, r0, r1, m0, mt); break;
      case 3: nm_rows_t_tile<VT, B, 3>(w, a, r0, r1, m0, mt); break;
      default: nm_rows_t_tile<VT, B, 4>(w, a, r0, r1, m0, mt);
    }
  }
}

// CSR, row-wise: gathers of x at 16 columns at a time.
template <DType VT, int R>
bool csr_row(const SparseWeight& w, const SparseBatch& a, int64_t r, int64_t i0) {
  __m512 acc[R];
  for (int q = 0; q < R; ++q) acc[q] = _mm512_setzero_ps();
  const float* x = a.x + i0 * a.ldx;
  const __m512i kv = _mm512_set1_epi32(static_cast<int>(w.K));
  const int64_t e1 = w.row_ptr[r + 1];
  __mmask16 bad = 0;
  for (int64_t e = w.row_ptr[r]; e < e1; e += W) {
    const __mmask16 act = first_lanes(e1 - e);
    __m512i col;
    __m512 vals;
    if (act == 0xffff) {
      col = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.cols + e)));
      vals = load_vals<VT, false>(w.values, e, 0);
    } else {
      col = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(act, w.cols + e));
      vals = load_vals<VT, true>(w.values, e, act);
    }
    const __mmask16 ok = _mm512_cmplt_epi32_mask(col, kv);
    bad |= act & ~ok;
    for (int q = 0; q < R; ++q) {
      const __m512 xv = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), act & ok, col, x + q * a.ldx, 4);
      acc[q] = _mm512_fmadd_ps(vals, xv, acc[q]);
    }
  }
  for (int q = 0; q < R; ++q) store_out(w, a, r, i0 + q, _mm512_reduce_add_ps(acc[q]));
  return bad != 0;
}

template <DType VT>
bool csr_rows_typed(const SparseWeight& w, const SparseBatch& a, int64_t r0, int64_t r1) {
  bool bad = false;
  for (int64_t r = r0; r < r1; ++r) {
    int64_t i = 0;
    for (; i + 4 <= a.M; i += 4) bad |= csr_row<VT, 4>(w, a, r, i);
    for (; i + 2 <= a.M; i += 2) bad |= csr_row<VT, 2>(w, a, r, i);
    for (; i < a.M; ++i) bad |= csr_row<VT, 1>(w, a, r, i);
  }
  return bad;
}

template <DType VT, int V>
bool csr_rows_t_tile(const SparseWeight& w, const SparseBatch& a, int64_t r0, int64_t r1, int64_t m0, int64_t mt) {
  const int64_t st = tile_stride(mt, W);
  const float* xt = a.xt + (m0 / kTileM) * w.K * kTileM;
  const __m512i kv = _mm512_set1_epi32(static_cast<int>(w.K));
  alignas(64) int32_t ci[W];
  alignas(64) float vf[W];
  __mmask16 bad = 0;
  for (int64_t r = r0; r < r1; ++r) {
    __m512 acc[V];
    for (int u = 0; u < V; ++u) acc[u] = _mm512_setzero_ps();
    const int64_t e1 = w.row_ptr[r + 1];
    int64_t e = w.row_ptr[r];
    for (; e + W <= e1; e += W) {
      const __m512i col = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.cols + e)));
      const __mmask16 ok = _mm512_cmplt_epi32_mask(col, kv);
      bad |= static_cast<__mmask16>(~ok);
      _mm512_store_si512(ci, _mm512_maskz_mov_epi32(ok, col));
      _mm512_store_ps(vf, _mm512_maskz_mov_ps(ok, load_vals<VT, false>(w.values, e, 0)));
      t_step<V>(xt, st, ci, vf, acc);
    }
    // The row's last entries one at a time: no wasted FMAs on padding lanes.
    for (; e < e1; ++e) {
      const int64_t c = w.cols[e];
      if (c >= w.K) {
        bad = 1;
        continue;
      }
      const __m512 bv = _mm512_set1_ps(_mm512_cvtss_f32(load_vals<VT, true>(w.values, e, 1)));
      const float* xr = xt + c * st;
      for (int u = 0; u < V; ++u) acc[u] = _mm512_fmadd_ps(bv, _mm512_loadu_ps(xr + u * W), acc[u]);
    }
    t_store<V>(w, a, r, m0, mt, acc);
  }
  return bad != 0;
}

template <DType VT>
bool csr_rows_t_typed(const SparseWeight& w, const SparseBatch& a, int64_t r0, int64_t r1) {
  bool bad = false;
  for (int64_t m0 = 0; m0 < a.M; m0 += kTileM) {
    const int64_t mt = a.M - m0 < kTileM ? a.M - m0 : kTileM;
    switch ((mt + W - 1) / W) {
      case 1: bad |= csr_rows_t_tile<VT, 1>(w, a, r0, r1, m0, mt); break;
      case 2: bad |= csr_rows_t_tile<VT, 2>(w, a, r0, r1, m0, mt); break;
      case 3: bad |= csr_rows_t_tile<VT, 3>(w, a, r0, r1, m0, mt); break;
      default: bad |= csr_rows_t_tile<VT, 4>(w, a, r0, r1, m0, mt);
    }
  }
  return bad;
}

template <DType VT>
void nm_rows_dispatch(const SparseWeight& w, const SparseBatch& a, int64_t r0, int64_t r1) {
  if (w.b == 2) {
    if (w.n == 2) nm_rows_typed<VT, 2, true>(w, a, r0, r1);
    else nm_rows_typed<VT, 2, false>(w, a, r0, r1);
  } else {
    if (w.n == 4) nm_rows_typed<VT, 3, true>(w, a, r0, r1);
    else nm_rows_typed<VT, 3, false>(w, a, r0, r1);
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
    default: nm_rows_dispatch<DType::kInt8>(w, a, r0, r1);
  }
}

void nm_rows_t_avx512(const SparseWeight& w, const SparseBatch& a, int64_t r0, int64_t r1) {
  switch (w.vdtype) {
    case DType::kFloat32: nm_rows_t_dispatch<DType::kFloat32>(w, a, r0, r1); break;
    case DType::kBFloat16: nm_rows_t_dispatch<DType::kBFloat16>(w, a, r0, r1); break;
    case DType::kFloat16: nm_rows_t_dispatch<DType::kFloat16>(w, a, r0, r1); break;
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
