// CSR at batches 2..8, shared by the AVX-512 and AVX2 sparse files (the same 128- / 256-bit
// code on each). Included inside each file's anonymous namespace, after <immintrin.h>,
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

template <DType VT, int ST>
inline typename Lanes<ST>::V value_bcast(const void* values, int64_t e) {
  if constexpr (VT == DType::kFloat32) return Lanes<ST>::bcast(static_cast<const float*>(values) + e);
  else return Lanes<ST>::bcast(static_cast<float>(static_cast<const int8_t*>(values)[e]));
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

// Each 16 entries' columns are checked against K just before x is read at them, as batch 1
// does, rather than in a pass over the row's columns first (two memory phases per row; with
// no check at all 4096 x 4096 90% batch 8 ran 4-6% faster, in-step checks measured 0-4%
// faster than the pass, Zen 4); the last < 16 entries are checked with max_col.
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
    // Weights that come from memory (not cache) need the prefetches batch 1 makes too: 4096 x
    // 4096 90% batch 8 with the weights evicted between calls, 0.89-1.06 -> 0.71-0.77 ms (Zen 4).
    for (; e + 16 <= e1; e += 16) {
      if (!cols16_at_most(w.cols + e, last_col)) {
        row_ok = false;
        break;
      }
      prefetch_ahead(static_cast<const char*>(w.values) + e * kValueBytes<VT>, 16 * kValueBytes<VT>);
      if (e % 32 < 16) prefetch_ahead(w.cols + e, 64);  // a line of columns per 32 entries
      for (int i = 0; i < 16; i += 4) csr_step4<VT, ST>(w, xt, e + i, acc);
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
