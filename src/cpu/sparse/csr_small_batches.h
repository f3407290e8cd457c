// CSR at batches 2..8, shared by the AVX-512 and AVX2 sparse files (the same 128- / 256-bit
// code on each; at batch 2 the AVX-512 file's own zmm spelling measured no faster). Included inside each file's anonymous namespace, after <immintrin.h>,
// <cstring>, sparse_kernels.h, csr_x_at.h and the file's own max_col and store_out; the AVX2 file wraps
// the include in `#pragma GCC target` so these functions get its ISA, as its TS_TARGET
// functions do. No include guard: each file takes its own copy.

// Batches 2..8 on x transposed to [K, ST] (SparseBatch::xt): each entry is one broadcast value
// times the ST batch values of its column, contiguous. ST = 4 (8) runs on 128 (256)-bit vectors.
template <int ST>
struct Lanes;
template <>
struct Lanes<4> {
  using V = __m128;
  static V zero() { return _mm_setzero_ps(); }
  static V load(const float* p) { return _mm_loadu_ps(p); }
  static V bcast(float v) { return _mm_set1_ps(v); }
  static V bcast(const float* p) { return _mm_broadcast_ss(p); }
  static V fma(V a, V b, V c) { return _mm_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm_add_ps(a, b); }
  static void store(float* p, V v) { _mm_store_ps(p, v); }
};
template <>
struct Lanes<8> {
  using V = __m256;
  static V zero() { return _mm256_setzero_ps(); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V bcast(float v) { return _mm256_set1_ps(v); }
  static V bcast(const float* p) { return _mm256_broadcast_ss(p); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static void store(float* p, V v) { _mm256_store_ps(p, v); }
};

template <DType VT>
inline float entry_value(const void* values, int64_t e) {
  if constexpr (VT == DType::kFloat32) return static_cast<const float*>(values)[e];
  else return static_cast<float>(static_cast<const int8_t*>(values)[e]);
}

template <DType VT, int ST>
inline typename Lanes<ST>::V value_bcast(const void* values, int64_t e) {
  if constexpr (VT == DType::kFloat32) return Lanes<ST>::bcast(static_cast<const float*>(values) + e);
  else return Lanes<ST>::bcast(entry_value<VT>(values, e));
}

// Before each 16-entry step at e of batches 2..8: its columns checked against K just before x
// is read at them, as batch 1 does, rather than in a pass over the row's columns first (two
// memory phases per row; with no check at all 4096 x 4096 90% batch 8 ran 4-6% faster,
// in-step checks measured 0-4% faster than the pass, Zen 4); false: the row holds a bad one.
// Then the weight streams prefetched as batch 1 does: with the weights evicted between calls
// (not in cache), 4096 x 4096 90% batch 8 0.89-1.06 -> 0.71-0.77 ms (Zen 4).
template <DType VT>
inline bool step16_ready(const SparseWeight& w, int64_t e, __m256i last_col) {
  if (!cols16_at_most(w.cols + e, last_col)) return false;
  prefetch_ahead(static_cast<const char*>(w.values) + value_bytes<VT>(e), value_bytes<VT>(16));
  if (e % 32 < 16) prefetch_ahead(w.cols + e, 64);  // a line of columns per 32 entries
  return true;
}

// 8 (4) entries' values as float, in lanes 0..7 (0..3).
template <DType VT>
inline __m256 values8(const void* values, int64_t e) {
  if constexpr (VT == DType::kFloat32) return _mm256_loadu_ps(static_cast<const float*>(values) + e);
  else return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(
      reinterpret_cast<const __m128i*>(static_cast<const int8_t*>(values) + e))));
}
template <DType VT>
inline __m256 values4(const void* values, int64_t e) {  // lanes 0..3
  if constexpr (VT == DType::kFloat32) {
    return _mm256_castps128_ps256(_mm_loadu_ps(static_cast<const float*>(values) + e));
  } else {
    int32_t four;
    std::memcpy(&four, static_cast<const int8_t*>(values) + e, 4);
    return _mm256_castps128_ps256(_mm_cvtepi32_ps(_mm_cvtepi8_epi32(_mm_cvtsi32_si128(four))));
  }
}

// Lane i of v in every batch lane.
template <int ST>
inline typename Lanes<ST>::V lane_bcast(__m256 v, int i) {
  const __m256 b = _mm256_permutevar8x32_ps(v, _mm256_set1_epi32(i));
  if constexpr (ST == 4) return _mm256_castps256_ps128(b);
  else return b;
}

// Entries e .. e + 3 into the four chains.
template <DType VT, int ST>
inline void csr_step4(const SparseWeight& w, const float* xt, int64_t e, typename Lanes<ST>::V acc[4]) {
  using L = Lanes<ST>;
  uint64_t c4;  // four columns in one load
  std::memcpy(&c4, w.cols + e, 8);
  acc[0] = L::fma(value_bcast<VT, ST>(w.values, e), L::load(xt + (c4 & 0xffff) * ST), acc[0]);
  acc[1] = L::fma(value_bcast<VT, ST>(w.values, e + 1), L::load(xt + ((c4 >> 16) & 0xffff) * ST), acc[1]);
  acc[2] = L::fma(value_bcast<VT, ST>(w.values, e + 2), L::load(xt + ((c4 >> 32) & 0xffff) * ST), acc[2]);
  acc[3] = L::fma(value_bcast<VT, ST>(w.values, e + 3), L::load(xt + (c4 >> 48) * ST), acc[3]);
}

// Entries e .. e + 15 of int8 values: the 16 codes converted in two vectors, each spread to the
// batch lanes by vpermps, rather than a movsx + cvtsi2ss + broadcast per entry (csr_step4's
// value_bcast). A / B, 90% int8, 3-8 rows: 4096 x 4096 1.10-1.25x, 4096 x 11008 1.07-1.14x
// (Zen 5, AVX-512 and AVX2, weights in and out of cache). Float32 values keep their broadcast
// loads: spread this way they ran 1.12-1.17x at 3-4 rows on 4096 x 4096 (in cache) but
// 0.93-0.96x on 4096 x 11008 out of cache, and ~1.0x at 6-8 rows.
template <int ST>
inline void csr_step16_int8(const SparseWeight& w, const float* xt, int64_t e, typename Lanes<ST>::V acc[4]) {
  using L = Lanes<ST>;
  uint64_t q[4];  // sixteen columns
  std::memcpy(q, w.cols + e, sizeof(q));
  for (int h = 0; h < 2; ++h) {
    const __m256 v = values8<DType::kInt8>(w.values, e + 8 * h);
    for (int i = 0; i < 8; ++i) {
      const uint64_t c = (q[2 * h + i / 4] >> (16 * (i % 4))) & 0xffff;
      acc[i % 4] = L::fma(lane_bcast<ST>(v, i), L::load(xt + c * ST), acc[i % 4]);
    }
  }
}

// Columns are checked per 16-entry step (step16_ready), the last < 16 entries with max_col.
template <DType VT, int ST>
bool csr_rows_small(const SparseWeight& w, const SparseBatch& a, int64_t r0, int64_t r1) {
  using L = Lanes<ST>;
  using V = typename L::V;
  bool bad = false;
  const float* xt = a.xt;
  alignas(32) float out[8];
  const __m256i last_col = _mm256_set1_epi16(static_cast<int16_t>(w.K - 1));  // K <= 65536
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t e1 = w.row_ptr[r + 1];
    V acc[4] = {L::zero(), L::zero(), L::zero(), L::zero()};
    int64_t e = w.row_ptr[r];
    bool row_ok = true;
    for (; e + 16 <= e1; e += 16) {
      if (!(row_ok = step16_ready<VT>(w, e, last_col))) break;
      if constexpr (VT == DType::kInt8) csr_step16_int8<ST>(w, xt, e, acc);
      else for (int i = 0; i < 16; i += 4) csr_step4<VT, ST>(w, xt, e + i, acc);
    }
    if (!row_ok || (e < e1 && max_col(w.cols + e, e1 - e) >= w.K)) {
      bad = true;
      continue;
    }
    for (; e + 4 <= e1; e += 4) csr_step4<VT, ST>(w, xt, e, acc);
    for (; e < e1; ++e) acc[0] = L::fma(value_bcast<VT, ST>(w.values, e), L::load(xt + int64_t{w.cols[e]} * ST), acc[0]);
    L::store(out, L::add(L::add(acc[0], acc[1]), L::add(acc[2], acc[3])));
    for (int64_t i = 0; i < a.M; ++i) store_out(w, a, r, i, out[i]);
  }
  return bad;
}

// Batch 2 on x transposed to [K, 2]: four entries per 256-bit vector, lanes (entry j, row b)
// at 2j + b, each column's two x values from one 64-bit load (x2_at4), values spread to lane
// pairs by vpermps. The broadcast kernel above at stride 4 (half its lanes zero) costs ~1.9
// core cycles per entry; this ~1.1, like batch 1 (Zen 4, one thread, 4096 x 4096 90%,
// standalone: 0.86 -> 0.50 ms). Strides 4 and 8 the same way (128-bit loads put together
// with vinsertf32x4 / vinsertf32x8) were slower than the broadcasts: 0.85 -> 1.08 ms at 4
// rows, 0.95 -> 1.53 at 8. Where cpu::sparse_gathers() (Intel) one vgatherdpd fetches the four
// columns' pairs (x2_gather4): 4096 x 4096 90% 0.39 -> 0.33-0.34 ms hot, 4096 x 11008 0.99 ->
// 0.95 (float32) / 1.08 -> 0.94 (int8), AVX-512, 2 threads, thirty-seventh session's Xeon.
template <DType VT, bool Gathers>
bool csr_rows_pair(const SparseWeight& w, const SparseBatch& a, int64_t r0, int64_t r1) {
  const __m256i lo = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3), hi = _mm256_setr_epi32(4, 4, 5, 5, 6, 6, 7, 7);
  const __m256i last_col = _mm256_set1_epi16(static_cast<int16_t>(w.K - 1));  // K <= 65536
  const float* xt = a.xt;
  bool bad = false;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t e1 = w.row_ptr[r + 1];
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    int64_t e = w.row_ptr[r];
    bool row_ok = true;
    for (; e + 16 <= e1; e += 16) {
      if (!(row_ok = step16_ready<VT>(w, e, last_col))) break;
      uint64_t q[4];
      std::memcpy(q, w.cols + e, sizeof(q));
      const __m256 v0 = values8<VT>(w.values, e), v1 = values8<VT>(w.values, e + 8);
      acc[0] = _mm256_fmadd_ps(_mm256_permutevar8x32_ps(v0, lo), x2_at<Gathers>(xt, q[0]), acc[0]);
      acc[1] = _mm256_fmadd_ps(_mm256_permutevar8x32_ps(v0, hi), x2_at<Gathers>(xt, q[1]), acc[1]);
      acc[2] = _mm256_fmadd_ps(_mm256_permutevar8x32_ps(v1, lo), x2_at<Gathers>(xt, q[2]), acc[2]);
      acc[3] = _mm256_fmadd_ps(_mm256_permutevar8x32_ps(v1, hi), x2_at<Gathers>(xt, q[3]), acc[3]);
    }
    if (!row_ok || (e < e1 && max_col(w.cols + e, e1 - e) >= w.K)) {
      bad = true;
      continue;
    }
    for (; e + 4 <= e1; e += 4) {
      uint64_t q;
      std::memcpy(&q, w.cols + e, sizeof(q));
      acc[0] = _mm256_fmadd_ps(_mm256_permutevar8x32_ps(values4<VT>(w.values, e), lo), x2_at4(xt, q), acc[0]);
    }
    const __m256 s8 = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));  // lane 0: row 0, lane 1: row 1
    float s[2] = {_mm_cvtss_f32(s4), _mm_cvtss_f32(_mm_movehdup_ps(s4))};
    for (; e < e1; ++e) {
      const float v = entry_value<VT>(w.values, e);
      s[0] += v * xt[int64_t{w.cols[e]} * 2];
      s[1] += v * xt[int64_t{w.cols[e]} * 2 + 1];
    }
    for (int64_t i = 0; i < a.M; ++i) store_out(w, a, r, i, s[i]);
  }
  return bad;
}
