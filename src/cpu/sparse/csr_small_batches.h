// CSR at batches 2..8, shared by the AVX-512 and AVX2 sparse files (the same 128- / 256-bit
// code on each; at batch 2 the AVX-512 file's own zmm spelling measured no faster). Included
// inside each file's anonymous namespace, after <immintrin.h>, <cstring>, sparse_kernels.h,
// csr_x_at.h and the file's own store_out; the AVX2 file wraps the include in `#pragma GCC
// target` so these functions get its ISA, as its TS_TARGET functions do. No include guard: each
// file takes its own copy.

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

// Batches 3..8 walk x in column panels: a block of rows runs over one panel's slice of x
// transposed ([P, ST], 32 KiB: P = 2048 columns at stride 4, 1024 at 8) while it stays in L1,
// each row resuming where the last panel stopped (its cursor), its partial sum carried over.
// Row by row over the whole of x (128 KiB at K = 4096, stride 8), nearly every entry's x load
// missed L1: standalone, one thread, 2048 x 4096 90%, 0.405 -> 0.335 ms at stride 4 and 0.70
// -> 0.48 at 8 (Zen 4, twenty-second session; 32 KiB panels beat 24 and 40 KiB ones).
template <int ST>
constexpr int64_t kCsrPanelCols = 32768 / (ST * 4);
constexpr int kCsrPanelRows = 64;  // a block's weights (~157 KiB at 90% of 4096) sit in L2

// The weights of rows r0 .. r1 - 1 toward L2, a block ahead of their use: a row block reads its
// rows' streams a panel's slice at a time, which the hardware prefetchers do not follow.
template <DType VT>
inline void prefetch_rows_l2(const SparseWeight& w, int64_t r0, int64_t r1) {
  if (r0 >= r1) return;
  const char* v = static_cast<const char*>(w.values);
  for (int64_t b = w.row_ptr[r0] * kValueBytes<VT>; b < w.row_ptr[r1] * kValueBytes<VT>; b += 64)
    _mm_prefetch(v + b, _MM_HINT_T1);
  const char* c = reinterpret_cast<const char*>(w.cols);
  for (int64_t b = w.row_ptr[r0] * 2; b < w.row_ptr[r1] * 2; b += 64) _mm_prefetch(c + b, _MM_HINT_T1);
}

// A step runs once every column it reads is below the panel's end (checked in a vector before
// x is read), so a row whose columns do not increase is still summed whole, and a column >= K
// stops its cursor short of the row's end: that row is reported, its output not written.
template <DType VT, int ST>
bool csr_rows_small(const SparseWeight& w, const SparseBatch& a, int64_t r0, int64_t r1) {
  using L = Lanes<ST>;
  using V = typename L::V;
  constexpr int64_t P = kCsrPanelCols<ST>;
  bool bad = false;
  const float* xt = a.xt;
  int64_t cursor[kCsrPanelRows];
  alignas(32) float part[kCsrPanelRows][8];
  prefetch_rows_l2<VT>(w, r0, std::min(r1, r0 + kCsrPanelRows));
  for (int64_t b0 = r0; b0 < r1; b0 += kCsrPanelRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kCsrPanelRows, r1 - b0));
    prefetch_rows_l2<VT>(w, b0 + rows, std::min(r1, b0 + rows + kCsrPanelRows));
    for (int i = 0; i < rows; ++i) {
      cursor[i] = w.row_ptr[b0 + i];
      L::store(part[i], L::zero());
    }
    for (int64_t c0 = 0; c0 < w.K; c0 += P) {
      const int64_t c1 = std::min(w.K, c0 + P);
      const __m256i last = _mm256_set1_epi16(static_cast<int16_t>(c1 - 1));  // K <= 65536
      for (int i = 0; i < rows; ++i) {
        const int64_t e1 = w.row_ptr[b0 + i + 1];
        int64_t e = cursor[i];
        V acc[4] = {L::load(part[i]), L::zero(), L::zero(), L::zero()};
        for (; e + 16 <= e1 && cols16_at_most(w.cols + e, last); e += 16)
          for (int j = 0; j < 16; j += 4) csr_step4<VT, ST>(w, xt, e + j, acc);
        for (; e + 4 <= e1 && cols4_at_most(w.cols + e, last); e += 4) csr_step4<VT, ST>(w, xt, e, acc);
        for (; e < e1 && w.cols[e] < c1; ++e)
          acc[1] = L::fma(value_bcast<VT, ST>(w.values, e), L::load(xt + int64_t{w.cols[e]} * ST), acc[1]);
        L::store(part[i], L::add(L::add(acc[0], acc[1]), L::add(acc[2], acc[3])));
        cursor[i] = e;
      }
    }
    for (int i = 0; i < rows; ++i) {
      if (cursor[i] != w.row_ptr[b0 + i + 1]) {
        bad = true;
        continue;
      }
      for (int64_t m = 0; m < a.M; ++m) store_out(w, a, b0 + i, m, part[i][m]);
    }
  }
  return bad;
}

// Batch 2 on x transposed to [K, 2]: four entries per 256-bit vector, lanes (entry j, row b)
// at 2j + b, each column's two x values from one 64-bit load (x2_at4), values spread to lane
// pairs by vpermps. The broadcast kernel above at stride 4 (half its lanes zero) costs ~1.9
// core cycles per entry; this ~1.1, like batch 1 (Zen 4, one thread, 4096 x 4096 90%,
// standalone: 0.86 -> 0.50 ms). Strides 4 and 8 the same way (128-bit loads put together
// with vinsertf32x4 / vinsertf32x8) were slower than the broadcasts: 0.85 -> 1.08 ms at 4
// rows, 0.95 -> 1.53 at 8.
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

template <DType VT>
bool csr_rows_pair(const SparseWeight& w, const SparseBatch& a, int64_t r0, int64_t r1) {
  const __m256i lo = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3), hi = _mm256_setr_epi32(4, 4, 5, 5, 6, 6, 7, 7);
  constexpr int64_t P = kCsrPanelCols<2>;  // in panels as batches 3..8: one up to K = 4096
  const float* xt = a.xt;
  bool bad = false;
  int64_t cursor[kCsrPanelRows];
  alignas(32) float part[kCsrPanelRows][8];  // lanes (entry j, row b) at 2j + b, not yet summed
  float tail[kCsrPanelRows][2];              // the entries no 4-entry step took
  prefetch_rows_l2<VT>(w, r0, std::min(r1, r0 + kCsrPanelRows));
  for (int64_t b0 = r0; b0 < r1; b0 += kCsrPanelRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kCsrPanelRows, r1 - b0));
    prefetch_rows_l2<VT>(w, b0 + rows, std::min(r1, b0 + rows + kCsrPanelRows));
    for (int i = 0; i < rows; ++i) {
      cursor[i] = w.row_ptr[b0 + i];
      _mm256_store_ps(part[i], _mm256_setzero_ps());
      tail[i][0] = tail[i][1] = 0.0f;
    }
    for (int64_t c0 = 0; c0 < w.K; c0 += P) {
      const int64_t c1 = std::min(w.K, c0 + P);
      const __m256i last = _mm256_set1_epi16(static_cast<int16_t>(c1 - 1));  // K <= 65536
      for (int i = 0; i < rows; ++i) {
        const int64_t e1 = w.row_ptr[b0 + i + 1];
        int64_t e = cursor[i];
        __m256 acc[4] = {_mm256_load_ps(part[i]), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        for (; e + 16 <= e1 && cols16_at_most(w.cols + e, last); e += 16) {
          uint64_t q[4];
          std::memcpy(q, w.cols + e, sizeof(q));
          const __m256 v0 = values8<VT>(w.values, e), v1 = values8<VT>(w.values, e + 8);
          acc[0] = _mm256_fmadd_ps(_mm256_permutevar8x32_ps(v0, lo), x2_at4(xt, q[0]), acc[0]);
          acc[1] = _mm256_fmadd_ps(_mm256_permutevar8x32_ps(v0, hi), x2_at4(xt, q[1]), acc[1]);
          acc[2] = _mm256_fmadd_ps(_mm256_permutevar8x32_ps(v1, lo), x2_at4(xt, q[2]), acc[2]);
          acc[3] = _mm256_fmadd_ps(_mm256_permutevar8x32_ps(v1, hi), x2_at4(xt, q[3]), acc[3]);
        }
        for (; e + 4 <= e1 && cols4_at_most(w.cols + e, last); e += 4) {
          uint64_t q;
          std::memcpy(&q, w.cols + e, sizeof(q));
          acc[1] = _mm256_fmadd_ps(_mm256_permutevar8x32_ps(values4<VT>(w.values, e), lo), x2_at4(xt, q), acc[1]);
        }
        _mm256_store_ps(part[i], _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
        for (; e < e1 && w.cols[e] < c1; ++e) {
          const float v = entry_value<VT>(w.values, e);
          tail[i][0] += v * xt[int64_t{w.cols[e]} * 2];
          tail[i][1] += v * xt[int64_t{w.cols[e]} * 2 + 1];
        }
        cursor[i] = e;
      }
    }
    for (int i = 0; i < rows; ++i) {
      if (cursor[i] != w.row_ptr[b0 + i + 1]) {  // a column >= K stopped it
        bad = true;
        continue;
      }
      const __m256 s8 = _mm256_load_ps(part[i]);
      __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
      s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));  // lane 0: row 0, lane 1: row 1
      const float s[2] = {_mm_cvtss_f32(s4) + tail[i][0], _mm_cvtss_f32(_mm_movehdup_ps(s4)) + tail[i][1]};
      for (int64_t m = 0; m < a.M; ++m) store_out(w, a, b0 + i, m, s[m]);
    }
  }
  return bad;
}
