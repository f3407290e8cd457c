// x at CSR columns, assembled from scalar loads or gathered; shared by the AVX-512 and AVX2
// sparse files.
// Included inside each file's anonymous namespace, after <immintrin.h> and <cstring> (AVX2 is
// all it needs, and both files are compiled with it). No include guard: each file takes its
// own copy.
//
// Gathers or scalar loads: on AMD Zen 2-4 a gather is microcoded (uops.info, Zen 3: vpgatherdd
// ymm 39 uops, one per 8 cycles), and batch-1 CSR is gather-bound. On this project's Zen 4 VM a
// standalone 90%-sparse 4096 x 4096 row loop took 17.0 -> 11.0 TSC ticks per 16 entries with
// AVX-512 and 16.0-17.7 -> 9.5-10.8 with AVX2 ymm. ARM-software/astc-encoder#511 measured the
// same trade on Zen 2 / Zen 4. On the thirty-seventh session's Intel Xeon (AMX; 2 threads, the
// same row loop) gathers won: scalar loads 0.28-0.35 ms (zmm) / 0.25 (ymm), vgatherdps 0.23-0.24
// (zmm) / 0.22 (ymm); every vinsertps is a port-5 uop there, and Intel's 512-bit FMAs share
// that port. So batches 1 and 2 gather on Intel (cpu::sparse_gathers()). x_at* do not check
// columns: the caller checks them (< K) first, with cols16_at_most / cols8_at_most or a 512-bit
// compare. They are forced inline: GCC left x2_at4 a call per 8 entries in the AVX2 file.
#define TS_X_AT __attribute__((always_inline)) inline

// True when the 16 (8) columns at c are all <= last (every lane K - 1).
TS_X_AT bool cols16_at_most(const uint16_t* c, __m256i last) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c));
  return _mm256_movemask_epi8(_mm256_cmpeq_epi16(_mm256_max_epu16(v, last), last)) == -1;
}
TS_X_AT bool cols8_at_most(const uint16_t* c, __m256i last) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(c)), l = _mm256_castsi256_si128(last);
  return _mm_movemask_epi8(_mm_cmpeq_epi16(_mm_max_epu16(v, l), l)) == 0xffff;
}

// x at the 4 columns packed little-endian in q.
TS_X_AT __m128 x_at4(const float* x, uint64_t q) {
  __m128 v = _mm_load_ss(x + (q & 0xffff));
  v = _mm_insert_ps(v, _mm_load_ss(x + ((q >> 16) & 0xffff)), 0x10);
  v = _mm_insert_ps(v, _mm_load_ss(x + ((q >> 32) & 0xffff)), 0x20);
  return _mm_insert_ps(v, _mm_load_ss(x + (q >> 48)), 0x30);
}

// x at the 8 columns c[0..7]: two 64-bit loads of columns (fewer load-port slots than one
// 16-bit load per column), eight scalar loads of x.
TS_X_AT __m256 x_at8(const float* x, const uint16_t* c) {
  uint64_t q[2];
  std::memcpy(q, c, sizeof(q));
  return _mm256_insertf128_ps(_mm256_castps128_ps256(x_at4(x, q[0])), x_at4(x, q[1]), 1);
}

// Rows 0 and 1 of x at 4 columns packed little-endian in q, from x transposed to [K, 2]
// (SparseBatch::xt at batch 2): lanes (column j, row b) at 2j + b, one 64-bit load per column.
TS_X_AT __m128 x2_at2(const float* xt, uint64_t q) {
  const __m128d lo = _mm_load_sd(reinterpret_cast<const double*>(xt + (q & 0xffff) * 2));
  return _mm_castpd_ps(_mm_loadh_pd(lo, reinterpret_cast<const double*>(xt + ((q >> 16) & 0xffff) * 2)));
}
TS_X_AT __m256 x2_at4(const float* xt, uint64_t q) {
  return _mm256_insertf128_ps(_mm256_castps128_ps256(x2_at2(xt, q)), x2_at2(xt, q >> 32), 1);
}

// x2_at4 as one gather of the four columns' 64-bit pairs.
TS_X_AT __m256 x2_gather4(const float* xt, uint64_t q) {
  const __m128i cols = _mm_cvtepu16_epi32(_mm_cvtsi64_si128(static_cast<int64_t>(q)));
  return _mm256_castpd_ps(_mm256_i32gather_pd(reinterpret_cast<const double*>(xt), cols, 8));
}
template <bool Gathers>
TS_X_AT __m256 x2_at(const float* xt, uint64_t q) {
  if constexpr (Gathers) return x2_gather4(xt, q);
  else return x2_at4(xt, q);
}

#undef TS_X_AT
