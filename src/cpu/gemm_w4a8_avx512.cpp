// AVX-512 W4A8 kernel (this file is compiled with -mavx512f/bw/vl/dq; VNNI is enabled per
// function and checked at run time). Bit-exact with linear_w4a8_reference: the integer group
// dots are exact, and the fp32 rescale runs the reference's operations in its order, one
// output (token m, row n) per lane. Layout and driver: w4a8_panels.h; here 16 rows per
// panel (a 16 x 16 dword transpose unpacks 16 rows x 128 k at a time) and tiles of up to
// 8 tokens x 16 rows held in registers.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>

#include "parallel.h"
#include "tensorslim/gemm_w4a8.h"
#include "tensorslim/quantize.h"
#include "transpose16_avx512.h"
#include "vnni_dot.h"
#include "w4a8_panels.h"
#include "w4a8_common_avx512.h"

namespace tensorslim {
namespace cpu {
namespace {

constexpr int kRows = 16;   // output rows per panel (lanes)
constexpr int kTokens = 8;  // tokens per register tile: 8 int32 + 8 fp32 accumulators

// next_rows: how many rows the following panel has (0: none). They are prefetched into L2,
// one line per row per step: a panel's 16 rows are 16 short streams that the hardware
// prefetcher barely picks up, and without this the unpacking waits on memory.
void pack_panel512(const W4A8Args& a, int64_t n0, int64_t rows, int64_t K8, int64_t groups,
                   int64_t next_rows, Panel& p) {
  const int64_t row_bytes = (a.K + 1) / 2;
  const __m512i low = _mm512_set1_epi8(0x0F);
  // int4: u = nibble XOR 8, both nibbles of a byte at once.
  const __m512i flip = _mm512_set1_epi8(a.zero_points ? 0 : static_cast<char>(0x88));
  const uint8_t* next = next_rows ? a.qweight + (n0 + kRows) * a.ldw : nullptr;
  if (next_rows) {  // the next panel's scales (and zero points): [16, groups], contiguous
    const int64_t at = (n0 + kRows) * groups, bytes = next_rows * groups * 4;
    for (int64_t b = 0; b < bytes; b += 64) {
      _mm_prefetch(reinterpret_cast<const char*>(a.scales + at) + b, _MM_HINT_T1);
      if (a.zero_points && b % 256 == 0)
        _mm_prefetch(reinterpret_cast<const char*>(a.zero_points + at) + b / 4, _MM_HINT_T1);
    }
  }
  for (int64_t c = 0; c < K8; c += 16) {  // 16 steps of 8 k = 64 packed bytes per row
    const __mmask64 m = bytes_mask(row_bytes - c * 4);
    for (int64_t r = 0; r < next_rows; ++r)
      _mm_prefetch(reinterpret_cast<const char*>(next + r * a.ldw + c * 4), _MM_HINT_T1);
    __m512i v[16];
    for (int r = 0; r < kRows; ++r)
      v[r] = r < rows ? _mm512_xor_si512(
                            _mm512_maskz_loadu_epi8(m, a.qweight + (n0 + r) * a.ldw + c * 4), flip)
                      : _mm512_setzero_si512();
    transpose16(v);
    const int64_t steps = std::min<int64_t>(16, K8 - c);
    for (int64_t j = 0; j < steps; ++j) {
      _mm512_storeu_si512(p.w.data() + (c + j) * 128, _mm512_and_si512(v[j], low));
      _mm512_storeu_si512(p.w.data() + (c + j) * 128 + 64,
                          _mm512_and_si512(_mm512_srli_epi16(v[j], 4), low));
    }
  }
}

inline __m512i broadcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// acc += per lane, sum over its 4 byte pairs of u8 * s8 (exact: |sum| <= 4 * 15 * 128).
struct DotVnni {
  __attribute__((target("avx512vnni"))) static inline __m512i step(__m512i acc, __m512i u,
                                                                    __m512i x) {
    return dpbusd(acc, u, x);
  }
};
struct DotBW {  // vpmaddubsw cannot saturate here: 2 * 15 * 128 < 2^15
  static inline __m512i step(__m512i acc, __m512i u, __m512i x) {
    return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(u, x),
                                                   _mm512_set1_epi16(1)));
  }
};

// Tokens m0 .. m0+MB-1 x the panel's rows n0 .. n0+rows-1.
template <int MB, class Dot>
__attribute__((always_inline)) inline void tile512(const W4A8Args& a, const Acts& x,
                                                   const Panel& p, const Shape& sh, int64_t n0,
                                                   int64_t rows, int64_t m0) {
  __m512 facc[MB];
  const int8_t* xr[MB];
  for (int m = 0; m < MB; ++m) {
    facc[m] = _mm512_setzero_ps();
    xr[m] = x.q + (m0 + m) * x.Kp;
  }
  for (int64_t g = 0; g < sh.groups; ++g) {
    __m512i acc[MB];
    for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_si512();
    const uint8_t* w = p.w.data() + g * sh.gsteps * 128;
    const int64_t k0 = g * sh.gsteps * 8;
    const int64_t steps = sh.steps(g);  // a short last group: fewer
    for (int64_t j = 0; j < steps; ++j) {
      const __m512i lo = _mm512_loadu_si512(w + j * 128);
      const __m512i hi = _mm512_loadu_si512(w + j * 128 + 64);
      for (int m = 0; m < MB; ++m) {
        acc[m] = Dot::step(acc[m], lo, broadcast4(xr[m] + k0 + j * 8));
        acc[m] = Dot::step(acc[m], hi, broadcast4(xr[m] + k0 + j * 8 + 4));
      }
    }
    // d = sum(u * q) - o * sum(q), exact; then the reference's acc = acc + float(d) * scale.
    const __m512i o = _mm512_loadu_si512(p.o.data() + g * kRows);
    const __m512 s = _mm512_loadu_ps(p.s.data() + g * kRows);
    for (int m = 0; m < MB; ++m) {
      const __m512i sum = _mm512_set1_epi32(x.sums[(m0 + m) * sh.groups + g]);
      const __m512i corr = _mm512_mullo_epi32(o, sum);
      const __m512 d = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[m], corr));
      facc[m] = _mm512_add_ps(facc[m], _mm512_mul_ps(d, s));
    }
  }
  store_tokens512(a, facc, n0, rows, m0);
}

// The vector part for w4a8_panels.h.
struct Kernel512 {
  static constexpr int kRows = cpu::kRows, kTokens = cpu::kTokens;
  static void relayout_row(const int8_t* src, int64_t K, int64_t Kp, int8_t* dst) {
    relayout_row512(src, K, Kp, dst);
  }
  static void pack_panel(const W4A8Args& a, int64_t n0, int64_t rows, int64_t K8, int64_t groups,
                         int64_t next_rows, Panel& p) {
    pack_panel512(a, n0, rows, K8, groups, next_rows, p);
  }
  template <int MB, class Dot>
  __attribute__((always_inline)) static void tile(const W4A8Args& a, const Acts& x, const Panel& p,
                                                  const Shape& sh, int64_t n0, int64_t rows,
                                                  int64_t m0) {
    tile512<MB, Dot>(a, x, p, sh, n0, rows, m0);
  }
};

// vpdpbusd is inlined only into a function compiled for VNNI.
__attribute__((target("avx512vnni"))) void run_vnni(const W4A8Args& a, const Acts& x,
                                                    const Shape& sh, int64_t pb, int64_t pe) {
  run_panels<Kernel512, DotVnni>(a, x, sh, pb, pe);
}

void run_bw(const W4A8Args& a, const Acts& x, const Shape& sh, int64_t pb, int64_t pe) {
  run_panels<Kernel512, DotBW>(a, x, sh, pb, pe);
}

std::atomic<bool>& vnni_enabled() {
  static std::atomic<bool> on{true};
  return on;
}

}  // namespace

bool w4a8_uses_vnni() {
  return cpu_has_avx512_vnni() && vnni_enabled().load();
}

void set_w4a8_vnni_enabled(bool enabled) { vnni_enabled().store(enabled); }

bool linear_w4a8_avx512(const W4A8Args& a) {
  if (!linear_w4a8_native_fits(a.K, a.group) || active_isa() != Isa::kAVX512) return false;
  const bool vnni = w4a8_uses_vnni();
  w4a8_drive<Kernel512>(a, [vnni](const W4A8Args& args, const Acts& x, const Shape& sh,
                                   int64_t b, int64_t e) {
    if (vnni)
      run_vnni(args, x, sh, b, e);
    else
      run_bw(args, x, sh, b, e);
  });
  return true;
}

}  // namespace cpu
}  // namespace tensorslim
