// AVX2 W4A8 kernel, the twin of gemm_w4a8_avx512.cpp (layout and driver: w4a8_panels.h):
// 8 rows per panel (an 8 x 8 dword transpose unpacks 8 rows x 64 k at a time) and tiles of
// up to 4 tokens x 8 rows in registers. The u8 x s8 products go through vpmaddubsw, whose
// int16 pair sums cannot saturate (2 * 15 * 128 < 2^15) and add up in int16 for a few steps
// before vpmaddwd widens them (DotMadd), or where the AVX2 kernels have vpdpbusd
// (cpu::avx2_vnni) go straight into int32 (Dot = that form), so the group dots are exact and the
// output bit-exact with linear_w4a8_reference.
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

#include "half.h"
#include "tensorslim/gemm_w4a8.h"
#include "tensorslim/quantize.h"
#include "transpose8_avx2.h"
#include "vnni_dot.h"
#include "w4a8_panels.h"
#include "w4a8_relayout_avx2.h"

namespace tensorslim {
namespace cpu {
namespace {

// next_rows: how many rows the following panel has (0: none); their bytes are prefetched
// into L2 one line per row per 64 k, as the AVX-512 kernel does.
void pack_panel256(const W4A8Args& a, int64_t n0, int64_t rows, int64_t K8, int64_t groups,
                   int64_t next_rows, Panel& p) {
  constexpr int R = 8;
  const int64_t row_bytes = (a.K + 1) / 2;
  const __m256i low = _mm256_set1_epi8(0x0F);
  // int4: u = nibble XOR 8, both nibbles of a byte at once.
  const __m256i flip = _mm256_set1_epi8(a.zero_points ? 0 : static_cast<char>(0x88));
  const uint8_t* next = next_rows ? a.qweight + (n0 + R) * a.ldw : nullptr;
  if (next_rows) {  // the next panel's scales (and zero points): [8, groups], contiguous
    const int64_t at = (n0 + R) * groups, bytes = next_rows * groups * 4;
    for (int64_t b = 0; b < bytes; b += 64) {
      _mm_prefetch(reinterpret_cast<const char*>(a.scales + at) + b, _MM_HINT_T1);
      if (a.zero_points && b % 256 == 0)
        _mm_prefetch(reinterpret_cast<const char*>(a.zero_points + at) + b / 4, _MM_HINT_T1);
    }
  }
  for (int64_t c = 0; c < K8; c += 8) {  // 8 steps of 8 k = 32 packed bytes per row
    if (c % 16 == 0)
      for (int64_t r = 0; r < next_rows; ++r)
        _mm_prefetch(reinterpret_cast<const char*>(next + r * a.ldw + c * 4), _MM_HINT_T1);
    const int64_t avail = row_bytes - c * 4;
    __m256i v[8];
    for (int r = 0; r < R; ++r) {
      const uint8_t* src = a.qweight + (n0 + r) * a.ldw + c * 4;
      __m256i b = _mm256_setzero_si256();
      if (r < rows) {
        if (avail >= 32) {
          b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
        } else {  // the row's last bytes: never read past them
          alignas(32) uint8_t tmp[32] = {};
          std::memcpy(tmp, src, static_cast<size_t>(avail));
          b = _mm256_load_si256(reinterpret_cast<const __m256i*>(tmp));
        }
        b = _mm256_xor_si256(b, flip);
      }
      v[r] = b;
    }
    transpose8(v);
    const int64_t steps = std::min<int64_t>(8, K8 - c);
    for (int64_t j = 0; j < steps; ++j) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p.w.data() + (c + j) * 64),
                          _mm256_and_si256(v[j], low));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p.w.data() + (c + j) * 64 + 32),
                          _mm256_and_si256(_mm256_srli_epi16(v[j], 4), low));
    }
  }
}

inline __m256i broadcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// vpmaddubsw's int16 pair sums of u8 * s8 stay within 2 * 15 * 128 = 3840, so kPairSteps
// steps of two of them (8 k per lane) add up in int16 (4 * 2 * 3840 = 30720 < 2^15) before one
// vpmaddwd widens them into the int32 group dot: half the multiplies of widening every pair
// sum (exact either way).
struct DotMadd {
  static constexpr int64_t kPairSteps = 4;
  static inline __m256i pairs(__m256i u, __m256i x) { return _mm256_maddubs_epi16(u, x); }
  static inline __m256i widen(__m256i acc, __m256i p16) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(p16, _mm256_set1_epi16(1)));
  }
};

// Tokens m0 .. m0+MB-1 x the panel's rows n0 .. n0+rows-1. Dot: DotMadd, or a vpdpbusd form
// (VnniVex256 / VnniEvex256) that sums straight into int32, the low and high nibbles in a chain
// each per token (vpdpbusd waits on its accumulator).
template <int MB, class Dot>
void tile256(const W4A8Args& a, const Acts& x, const Panel& p, const Shape& sh, int64_t n0,
             int64_t rows, int64_t m0) {
  constexpr int R = 8;
  __m256 facc[MB];
  const int8_t* xr[MB];
  for (int m = 0; m < MB; ++m) {
    facc[m] = _mm256_setzero_ps();
    xr[m] = x.q + (m0 + m) * x.Kp;
  }
  for (int64_t g = 0; g < sh.groups; ++g) {
    __m256i acc[MB];
    for (int m = 0; m < MB; ++m) acc[m] = _mm256_setzero_si256();
    const uint8_t* w = p.w.data() + g * sh.gsteps * 64;
    const int64_t k0 = g * sh.gsteps * 8;
    const int64_t steps = sh.steps(g);  // a short last group: fewer
    if constexpr (!std::is_same_v<Dot, DotMadd>) {
      __m256i acc_hi[MB];
      for (int m = 0; m < MB; ++m) acc_hi[m] = _mm256_setzero_si256();
      for (int64_t j = 0; j < steps; ++j) {
        const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + j * 64));
        const __m256i hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + j * 64 + 32));
        for (int m = 0; m < MB; ++m) {
          acc[m] = Dot::dpbusd(acc[m], lo, broadcast4(xr[m] + k0 + j * 8));
          acc_hi[m] = Dot::dpbusd(acc_hi[m], hi, broadcast4(xr[m] + k0 + j * 8 + 4));
        }
      }
      for (int m = 0; m < MB; ++m) acc[m] = _mm256_add_epi32(acc[m], acc_hi[m]);
    } else {
      for (int64_t j0 = 0; j0 < steps; j0 += Dot::kPairSteps) {
        __m256i p16[MB];
        for (int m = 0; m < MB; ++m) p16[m] = _mm256_setzero_si256();
        for (int64_t j = j0; j < std::min(steps, j0 + Dot::kPairSteps); ++j) {
          const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + j * 64));
          const __m256i hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + j * 64 + 32));
          for (int m = 0; m < MB; ++m) {
            const __m256i both = _mm256_add_epi16(Dot::pairs(lo, broadcast4(xr[m] + k0 + j * 8)),
                                                  Dot::pairs(hi, broadcast4(xr[m] + k0 + j * 8 + 4)));
            p16[m] = _mm256_add_epi16(p16[m], both);
          }
        }
        for (int m = 0; m < MB; ++m) acc[m] = Dot::widen(acc[m], p16[m]);
      }
    }
    // d = sum(u * q) - o * sum(q), exact; then the reference's acc = acc + float(d) * scale.
    const __m256i o = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.o.data() + g * R));
    const __m256 s = _mm256_loadu_ps(p.s.data() + g * R);
    for (int m = 0; m < MB; ++m) {
      const __m256i sum = _mm256_set1_epi32(x.sums[(m0 + m) * sh.groups + g]);
      const __m256 d = _mm256_cvtepi32_ps(_mm256_sub_epi32(acc[m], _mm256_mullo_epi32(o, sum)));
      facc[m] = _mm256_add_ps(facc[m], _mm256_mul_ps(d, s));
    }
  }
  const __m256i keep = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(rows)),
                                          _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  const __m256 bias = a.bias ? _mm256_maskload_ps(a.bias + n0, keep) : _mm256_setzero_ps();
  for (int m = 0; m < MB; ++m) {
    __m256 y = _mm256_mul_ps(facc[m], _mm256_set1_ps(a.act_scales[m0 + m]));
    if (a.bias) y = _mm256_add_ps(y, bias);  // no bias: no + 0 (it would turn -0 into +0)
    const int64_t at = (m0 + m) * a.ldo + n0;
    if (!a.out_bf16) {
      _mm256_maskstore_ps(static_cast<float*>(a.out) + at, keep, y);
    } else {
      alignas(32) float t[R];
      _mm256_store_ps(t, y);
      uint16_t* o16 = static_cast<uint16_t*>(a.out) + at;
      for (int64_t r = 0; r < rows; ++r) o16[r] = float_to_bf16(t[r]);
    }
  }
}

// The vector part for w4a8_panels.h.
struct Kernel256 {
  static constexpr int kRows = 8;
  static constexpr int kTokens = 4;  // 4 int32 + 4 fp32 accumulators of the 16 ymm registers
  static void relayout_row(const int8_t* src, int64_t K, int64_t Kp, int8_t* dst) {
    relayout_row256(src, K, Kp, dst);
  }
  static void pack_panel(const W4A8Args& a, int64_t n0, int64_t rows, int64_t K8, int64_t groups,
                         int64_t next_rows, Panel& p) {
    pack_panel256(a, n0, rows, K8, groups, next_rows, p);
  }
  template <int MB, class Dot>
  static void tile(const W4A8Args& a, const Acts& x, const Panel& p, const Shape& sh, int64_t n0,
                   int64_t rows, int64_t m0) {
    tile256<MB, Dot>(a, x, p, sh, n0, rows, m0);
  }
};

}  // namespace

bool linear_w4a8_avx2(const W4A8Args& a) {
  if (!linear_w4a8_native_fits(a.K, a.group) || active_isa() < Isa::kAVX2) return false;
  const AvxVnni vnni = avx2_vnni();
  w4a8_drive<Kernel256>(a, [vnni](const W4A8Args& args, const Acts& x, const Shape& sh, int64_t b, int64_t e) {
    with_vnni256(vnni, [&](auto dot) {
      using V = decltype(dot);
      run_panels<Kernel256, std::conditional_t<std::is_same_v<V, NoVnni>, DotMadd, V>>(args, x, sh, b, e);
    });
  });
  return true;
}

}  // namespace cpu
}  // namespace tensorslim
