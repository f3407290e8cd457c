// The transposed kernels' walk over one tile, shared by the AVX-512 and AVX2 sparse files
// (each with its own W and TAcc<V>). Included inside each file's anonymous namespace after
// <cstring>, sparse_kernels.h, TAcc and the file's store_out; the AVX2 file wraps the include
// in `#pragma GCC target` so this gets its ISA, as its TS_TARGET functions do. No include
// guard: each file takes its own copy.

// Row blocks x column blocks of one tile (`rows` stages tile offsets: col * st, or
// SparseBatch::col_off for a convolution's planes); `Rows::stage(r, kb0, kb1, last, st, ci, vf, more, bad)`
// writes the row's entries at columns [kb0, kb1) (N:M; CSR: whole chunks up to the first
// past kb1) or all remaining ones when last, to ci / vf as whole vectors (skipped lanes:
// offset 0, value 0), and returns their count; `more` says it stopped at the staging
// capacity and has more for this block.
template <int V, typename Rows>
bool t_tiles(const SparseWeight& w, const SparseBatch& a, int64_t r0, int64_t r1, Rows& rows) {
  constexpr int64_t cap = stage_capacity(W);
  bool bad = false;
  alignas(64) float part[kRowBlock * kTileM];
  alignas(64) int32_t ci[kStageRows * cap];
  alignas(64) float vf[kStageRows * cap];
  int64_t count[kStageRows];
  bool more[kStageRows];
  for (int64_t m0 = 0; m0 < a.M; m0 += kTileM) {
    const int64_t mt = a.M - m0 < kTileM ? a.M - m0 : kTileM;
    if ((mt + W - 1) / W != V) continue;  // this instantiation runs tiles of its width only
    const int64_t st = tile_stride(mt, W), kb = k_block(st);
    const float* xt = a.col_off ? a.xt + m0 : a.xt + (m0 / kTileM) * w.K * kTileM;
    for (int64_t rb = r0; rb < r1; rb += kRowBlock) {
      const int64_t re = rb + kRowBlock < r1 ? rb + kRowBlock : r1;
      std::memset(part, 0, sizeof(part));
      rows.begin(rb, re);
      for (int64_t kb0 = 0; kb0 < w.K; kb0 += kb) {
        const bool last = kb0 + kb >= w.K;
        for (int64_t g0 = rb; g0 < re; g0 += kStageRows) {
          const int64_t g1 = g0 + kStageRows < re ? g0 + kStageRows : re;
          for (int64_t r = g0; r < g1; ++r) {
            const int64_t q = r - g0;
            count[q] = rows.stage(r, kb0, kb0 + kb, last, st, ci + q * cap, vf + q * cap, more[q], bad);
          }
          for (int64_t r = g0; r < g1; ++r) {
            const int64_t q = r - g0;
            for (;;) {
              TAcc<V>::add(part + (r - rb) * kTileM, xt, ci + q * cap, vf + q * cap, count[q]);
              if (!more[q]) break;
              count[q] = rows.stage(r, kb0, kb0 + kb, last, st, ci + q * cap, vf + q * cap, more[q], bad);
            }
          }
        }
      }
      // In the order y is laid out: a linear's batch row by batch row (row by row, each store
      // was to another line of y), a convolution's output channel by channel.
      if (a.ldr == 1) {
        for (int64_t i = 0; i < mt; ++i)
          for (int64_t r = rb; r < re; ++r) store_out(w, a, r, m0 + i, part[(r - rb) * kTileM + i]);
      } else {
        for (int64_t r = rb; r < re; ++r)
          for (int64_t i = 0; i < mt; ++i) store_out(w, a, r, m0 + i, part[(r - rb) * kTileM + i]);
      }
    }
  }
  return bad;
}
