// W4A8: the scalar reference against a float64 product of the dequantized weights and the
// quantized activations, and the AVX-512 kernel (VNNI and vpmaddubsw paths) and the AVX2 one
// against the reference bit for bit on odd shapes.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <optional>

#include "half.h"
#include "tensorslim/gemm_int8.h"
#include "tensorslim/gemm_w4a8.h"
#include "tensorslim/quantize.h"
#include "test_helpers.h"

namespace tensorslim {
namespace {

using testing::avx2_vnni_settings;
using testing::Avx2VnniScope;
using testing::random_weights;
using testing::view1;
using testing::view2;

struct Weight {
  std::vector<uint8_t> q, zps;
  std::vector<float> scales, deq;  // deq: the exact dequantized weight
  TensorView qv, sv, zv;
  bool asym;
  const TensorView* zp() const { return asym ? &zv : nullptr; }
};

// A random weight, or the given values (N * K) when `values` is set.
Weight make_weight(Format fmt, int64_t N, int64_t K, int64_t group, uint32_t seed,
                   const std::vector<float>* values = nullptr) {
  Weight w;
  w.asym = fmt == Format::kUInt4;
  std::vector<float> x = values ? *values : random_weights(N * K, seed);
  const int64_t groups = (K + group - 1) / group, bytes = (K + 1) / 2;  // the last may be short
  w.q.resize(N * bytes);
  w.scales.resize(N * groups);
  w.zps.resize(N * groups);
  w.deq.resize(N * K);
  w.qv = view2(w.q.data(), DType::kUInt8, N, bytes);
  w.sv = view2(w.scales.data(), DType::kFloat32, N, groups);
  w.zv = view2(w.zps.data(), DType::kUInt8, N, groups);
  quantize(view2(x.data(), DType::kFloat32, N, K), fmt, group, w.qv, w.sv, w.zp());
  dequantize(w.qv, w.sv, w.zp(), fmt, group, view2(w.deq.data(), DType::kFloat32, N, K));
  return w;
}

// Activations with a wide range per token, an all-zero token, and x stored with a row stride.
std::vector<float> make_x(int64_t M, int64_t K, int64_t ld, uint32_t seed) {
  std::vector<float> v = random_weights(M * ld, seed);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) v[m * ld + k] *= 1.0f + static_cast<float>(m % 5);
  if (M > 2)
    for (int64_t k = 0; k < K; ++k) v[2 * ld + k] = 0.0f;
  return v;
}

struct Case {
  int64_t M, N, K, group;
};

// M = 1, 3, 17, 64; N not a multiple of 16; groups of 32 / 64 / 128 and per channel (incl. K
// not a multiple of 8, and K spanning several 128-value transpose blocks).
const Case kCases[] = {
    {1, 40, 256, 32},   {3, 17, 192, 64},   {17, 100, 384, 128}, {64, 33, 1024, 128},
    {1, 5, 200, 200},   {3, 21, 100, 100},  {17, 16, 77, 77},    {64, 47, 96, 32},
    {5, 1, 512, 64},    {9, 70, 640, 128},
    // more than 16 groups, not a multiple of 16 (the small-batch kernels transpose the
    // scales 16 groups at a time), with row tails
    {2, 23, 1280, 64},  {1, 35, 2304, 128},
};

// The ISA the kernels run now: the avx2.* ctest pass caps it (TENSORSLIM_ISA=avx2).
bool have_avx512() { return cpu::active_isa() == cpu::Isa::kAVX512; }

void run(const Case& c, Format fmt, bool bias, DType xdt, GemmBackend be, const Weight& w,
         const std::vector<float>& x, int64_t ldx, const std::vector<float>& b,
         std::vector<uint8_t>& out) {
  std::vector<uint16_t> xb;
  TensorView xv;
  if (xdt == DType::kFloat32) {
    xv = view2(const_cast<float*>(x.data()), DType::kFloat32, c.M, c.K, ldx);
  } else {
    xb.resize(x.size());
    for (size_t i = 0; i < x.size(); ++i) xb[i] = cpu::float_to_bf16(x[i]);
    xv = view2(xb.data(), DType::kBFloat16, c.M, c.K, ldx);
  }
  const int64_t esize = xdt == DType::kFloat32 ? 4 : 2;
  out.assign(c.M * c.N * esize, 0xAB);
  const TensorView bv = view1(const_cast<float*>(b.data()), DType::kFloat32, c.N);
  linear_w4a8(xv, w.qv, w.sv, w.zp(), bias ? &bv : nullptr, fmt, c.group,
              view2(out.data(), xdt, c.M, c.N), be);
}

TEST(GemmW4A8, ReferenceMatchesFloat64) {
  for (const Case& c : kCases) {
    for (Format fmt : {Format::kInt4, Format::kUInt4}) {
      const Weight w = make_weight(fmt, c.N, c.K, c.group, 7 + c.K);
      const std::vector<float> x = make_x(c.M, c.K, c.K, 3), b = random_weights(c.N, 5);
      std::vector<uint8_t> got;
      run(c, fmt, true, DType::kFloat32, GemmBackend::kReference, w, x, c.K, b, got);
      // The same activation codes the kernel used, decoded.
      std::vector<int8_t> q(c.M * c.K);
      std::vector<float> s(c.M);
      quantize_per_token(view2(const_cast<float*>(x.data()), DType::kFloat32, c.M, c.K), nullptr,
                         view2(q.data(), DType::kInt8, c.M, c.K), view1(s.data(), DType::kFloat32, c.M),
                         GemmBackend::kReference);
      EXPECT_EQ(s[c.M > 2 ? 2 : 0] == 1.0f, c.M > 2);  // the all-zero token
      const float* y = reinterpret_cast<const float*>(got.data());
      for (int64_t m = 0; m < c.M; ++m)
        for (int64_t n = 0; n < c.N; ++n) {
          double want = 0, mag = 0;
          for (int64_t k = 0; k < c.K; ++k) {
            const double t = double(q[m * c.K + k]) * s[m] * w.deq[n * c.K + k];
            want += t;
            mag += std::fabs(t);
          }
          want += b[n];
          // fp32 rounding of the group sums, the scale products and the running sum.
          ASSERT_NEAR(y[m * c.N + n], want, 4e-6 * (mag + std::fabs(b[n])) + 1e-6)
              << "M=" << c.M << " N=" << c.N << " K=" << c.K << " g=" << c.group << " m=" << m
              << " n=" << n;
        }
    }
  }
}

// Every case, int4 / uint4, with and without bias, fp32 / bf16: the native kernel the active
// ISA runs gives the reference's bytes.
void expect_native_bit_exact(const char* label) {
  for (const Case& c : kCases) {
    for (Format fmt : {Format::kInt4, Format::kUInt4}) {
      const Weight w = make_weight(fmt, c.N, c.K, c.group, 11 + c.N);
      const int64_t ldx = c.K + 3;  // rows contiguous, not the whole tensor
      const std::vector<float> x = make_x(c.M, c.K, ldx, 13 + c.M), b = random_weights(c.N, 2);
      for (bool bias : {true, false})
        for (DType xdt : {DType::kFloat32, DType::kBFloat16}) {
          std::vector<uint8_t> ref, got;
          run(c, fmt, bias, xdt, GemmBackend::kReference, w, x, ldx, b, ref);
          run(c, fmt, bias, xdt, GemmBackend::kNative, w, x, ldx, b, got);
          ASSERT_EQ(0, std::memcmp(ref.data(), got.data(), ref.size()))
              << label << " M=" << c.M << " N=" << c.N << " K=" << c.K << " g=" << c.group << " "
              << format_info(fmt).name << " bias=" << bias << " " << dtype_name(xdt);
        }
    }
  }
}

TEST(GemmW4A8, NativeMatchesReferenceBitForBit) {
  if (!have_avx512()) GTEST_SKIP() << "no AVX-512";
  const bool vnni = cpu::w4a8_uses_vnni();
  for (bool use_vnni : {true, false}) {
    if (use_vnni && !vnni) continue;
    cpu::set_w4a8_vnni_enabled(use_vnni);
    EXPECT_STREQ(linear_w4a8_kernel(256, 32), use_vnni ? "avx512_vnni" : "avx512bw");
    expect_native_bit_exact(use_vnni ? "vnni" : "bw");
  }
  cpu::set_w4a8_vnni_enabled(true);
}

// The AVX2 kernels (8-row panels, 4-token tiles; the few-token GEMV), forced on an AVX-512
// machine too, with vpmaddubsw and (where the CPU has a form of it) vpdpbusd.
TEST(GemmW4A8, Avx2MatchesReferenceBitForBit) {
  if (cpu::best_isa() < cpu::Isa::kAVX2) GTEST_SKIP() << "no AVX2";
  const cpu::Isa saved = cpu::active_isa();
  cpu::set_isa(cpu::Isa::kAVX2);
  // "avx2_vnni" where the CPU has AVX-VNNI (Zen 5, Alder Lake on): the default there.
  EXPECT_STREQ(linear_w4a8_kernel(256, 32),
               cpu::avx2_vnni() == cpu::AvxVnni::kNone ? "avx2" : "avx2_vnni");
  EXPECT_STREQ(linear_w4a8_kernel(96, 6), "reference");
  for (bool vnni : avx2_vnni_settings()) {
    Avx2VnniScope dot(vnni);
    expect_native_bit_exact(vnni ? "avx2 vpdpbusd" : "avx2");
  }
  cpu::set_isa(saved);
}

// linear_w4a8_pack's copy as a buffer of its size, pre-filled with 0xA5 (the pack must write
// every byte it owns).
std::vector<uint8_t> pack_copy(const Weight& w, Format fmt, int64_t K, int64_t group) {
  const int64_t bytes = linear_w4a8_packed_bytes(w.qv.shape[0], K, group, fmt);
  std::vector<uint8_t> p(bytes, 0xA5);
  linear_w4a8_pack(w.qv, w.sv, w.zp(), fmt, K, group, view1(p.data(), DType::kUInt8, bytes));
  return p;
}

// The AVX2 kernel adds vpmaddubsw's pair sums in int16 for a few steps before widening them:
// at the extremes (every u = 15, every activation code -127 or 127, long groups) that int16
// sum comes closest to 2^15, and must still match the reference bit for bit; so must the packed
// copy's kernel, with vpmaddubsw and (where the CPU has a form) vpdpbusd.
TEST(GemmW4A8, Avx2PairSumsAtTheExtremes) {
  if (cpu::best_isa() < cpu::Isa::kAVX2) GTEST_SKIP() << "no AVX2";
  const cpu::Isa saved = cpu::active_isa();
  cpu::set_isa(cpu::Isa::kAVX2);
  const Case c{8, 24, 1024, 512};
  // weights: all +1 (int4 code 7, u = 15; uint4 code 15) in rows 0-15, all -1 in the rest
  std::vector<float> wv(c.N * c.K, 1.0f);
  for (int64_t i = 16 * c.K; i < c.N * c.K; ++i) wv[i] = -1.0f;
  // tokens: all -1, all +1, alternating signs, and scaled copies (codes stay +-127)
  std::vector<float> x(c.M * c.K);
  for (int64_t m = 0; m < c.M; ++m)
    for (int64_t k = 0; k < c.K; ++k)
      x[m * c.K + k] = (m % 3 == 0 ? -1.0f : m % 3 == 1 ? 1.0f : (k % 2 ? 1.0f : -1.0f)) * (1 + m);
  const std::vector<float> b(c.N, 0.0f);
  for (Format fmt : {Format::kInt4, Format::kUInt4})
    for (bool vnni : avx2_vnni_settings()) {
      Avx2VnniScope dot(vnni);
      const Weight w = make_weight(fmt, c.N, c.K, c.group, 0, &wv);
      std::vector<uint8_t> ref, got, got_packed;
      run(c, fmt, false, DType::kFloat32, GemmBackend::kReference, w, x, c.K, b, ref);
      run(c, fmt, false, DType::kFloat32, GemmBackend::kNative, w, x, c.K, b, got);
      ASSERT_EQ(0, std::memcmp(ref.data(), got.data(), ref.size())) << format_info(fmt).name << " vnni=" << vnni;
      const std::vector<uint8_t> packed = pack_copy(w, fmt, c.K, c.group);
      std::vector<float> pk_out(c.M * c.N, -1.0f);
      std::vector<int8_t> qx(c.M * c.K);
      std::vector<float> as(c.M);
      quantize_per_token(view2(x.data(), DType::kFloat32, c.M, c.K), nullptr, view2(qx.data(), DType::kInt8, c.M, c.K),
                         view1(as.data(), DType::kFloat32, c.M), GemmBackend::kReference);
      const cpu::W4A8Args a{qx.data(), as.data(), w.q.data(), (c.K + 1) / 2, w.scales.data(),
                            w.asym ? w.zps.data() : nullptr, b.data(), c.M, c.N, c.K, c.group, pk_out.data(), c.N, false};
      ASSERT_TRUE(cpu::linear_w4a8_packed_avx2(a, packed.data()));
      ASSERT_EQ(0, std::memcmp(ref.data(), pk_out.data(), ref.size())) << format_info(fmt).name << " packed vnni=" << vnni;
    }
  cpu::set_isa(saved);
}

// A kernel called directly (kernel(args) returns whether it took them) against
// cpu::linear_w4a8_reference bit for bit on M tokens of make_x(seed), with and without bias,
// fp32 and bf16 outputs; `takes`: whether the kernel should take this shape.
template <class Kernel>
void expect_direct_kernel_bits(const char* name, Format fmt, const Weight& w, int64_t M, int64_t N,
                               int64_t K, int64_t group, uint32_t seed, bool takes, Kernel kernel) {
  const std::vector<float> x = make_x(M, K, K, seed), b = random_weights(N, seed + 7);
  std::vector<int8_t> qx(M * K);
  std::vector<float> as(M);
  quantize_per_token(view2(const_cast<float*>(x.data()), DType::kFloat32, M, K), nullptr,
                     view2(qx.data(), DType::kInt8, M, K), view1(as.data(), DType::kFloat32, M),
                     GemmBackend::kReference);
  for (bool bias : {true, false})
    for (bool bf16 : {false, true}) {
      cpu::W4A8Args a{qx.data(), as.data(), w.q.data(), (K + 1) / 2, w.scales.data(),
                      w.asym ? w.zps.data() : nullptr, bias ? b.data() : nullptr,
                      M, N, K, group, nullptr, N, bf16};
      std::vector<uint8_t> want(M * N * 4, 0xAB), got(M * N * 4, 0xAB);
      a.out = want.data();
      cpu::linear_w4a8_reference(a);
      a.out = got.data();
      ASSERT_EQ(kernel(a), takes) << name << " K=" << K << " g=" << group;
      if (takes)
        ASSERT_EQ(want, got) << name << " M=" << M << " N=" << N << " K=" << K << " g=" << group << " "
                             << format_info(fmt).name << " bias=" << bias << " bf16=" << bf16;
    }
}

// The few-token kernels (packed rows read as stored), called directly on every ISA and
// multiply path here, against the reference bit for bit: groups of one chunk, several, or
// 32 / 64 codes inside one, K not a multiple of the chunk (odd K included), short last
// groups, N around the 8 / 16-row blocks, offsets from uint4 zero points, bias or none, fp32
// and bf16 outputs, up to 5 tokens.
TEST(GemmW4A8, FewTokenKernelsMatchReferenceBitForBit) {
  if (cpu::best_isa() < cpu::Isa::kAVX2) GTEST_SKIP() << "no AVX2";
  struct Gemv {
    const char* name;
    bool (*fn)(const cpu::W4A8Args&);
    cpu::Isa isa;
    int64_t chunk;
    bool vnni;  // AVX-512: vpdpbusd on zmm; AVX2: on ymm (cpu::avx2_vnni)
  };
  std::vector<Gemv> kernels = {{"avx2", cpu::linear_w4a8_gemv_avx2, cpu::Isa::kAVX2, 64, false}};
  if (cpu::avx2_vnni_available()) kernels.push_back({"avx2_vnni", cpu::linear_w4a8_gemv_avx2, cpu::Isa::kAVX2, 64, true});
  if (cpu::best_isa() >= cpu::Isa::kAVX512) {
    kernels.push_back({"avx512bw", cpu::linear_w4a8_gemv_avx512, cpu::Isa::kAVX512, 128, false});
    if (cpu::w4a8_uses_vnni())
      kernels.push_back({"avx512_vnni", cpu::linear_w4a8_gemv_avx512, cpu::Isa::kAVX512, 128, true});
  }
  const struct { int64_t N, K, group; } shapes[] = {
      {16, 128, 128}, {17, 384, 128}, {40, 320, 128}, {1, 1000, 256}, {15, 200, 200},
      {9, 321, 321},  {33, 63, 63},   {8, 256, 64},   {23, 448, 192}, {7, 4096, 4096},
      {12, 256, 32},  {17, 100, 32},  {16, 70, 32},   {9, 200, 64},   {24, 384, 64},
  };
  const cpu::Isa saved = cpu::active_isa();
  for (const Gemv& kern : kernels) {
    cpu::set_isa(kern.isa);
    cpu::set_w4a8_vnni_enabled(kern.vnni);
    std::optional<Avx2VnniScope> dot;
    if (kern.isa == cpu::Isa::kAVX2) dot.emplace(kern.vnni);
    for (const auto& sh : shapes)
      for (Format fmt : {Format::kInt4, Format::kUInt4})
        for (int64_t M : {1, 2, 5}) {
          const Weight w = make_weight(fmt, sh.N, sh.K, sh.group, 17 + sh.K);
          const bool fits = sh.group % kern.chunk == 0 || sh.group >= sh.K ||
                            ((sh.group == 32 || sh.group == 64) && kern.chunk % sh.group == 0);
          expect_direct_kernel_bits(kern.name, fmt, w, M, sh.N, sh.K, sh.group, 19 + M, fits, kern.fn);
        }
  }
  cpu::set_w4a8_vnni_enabled(true);
  cpu::set_isa(saved);
  // A group that neither tiles a chunk nor is whole chunks: neither takes it.
  const std::vector<int8_t> qx(64);
  const std::vector<float> as(1, 1.0f), sc(2 * 4, 1.0f);
  const std::vector<uint8_t> q(2 * 32);
  std::vector<float> out(2);
  const cpu::W4A8Args a{qx.data(), as.data(), q.data(), 32, sc.data(), nullptr, nullptr, 1, 2, 64, 16, out.data(), 2, false};
  EXPECT_FALSE(cpu::linear_w4a8_gemv_avx2(a));
  EXPECT_FALSE(cpu::linear_w4a8_gemv_avx512(a));
}


// The kernels on the packed copy, called directly on every ISA and multiply path here,
// against the reference bit for bit: groups of 8 codes up to one per row (odd K, short last
// groups), N around the 16-row panels and their 8-row AVX2 halves, 1-9 tokens (AVX-512 passes
// of 8, AVX2 of 3 or with vpdpbusd 4, and what is left), uint4 zero points, bias or none, fp32
// and bf16 outputs.
TEST(GemmW4A8, PackedCopyKernelsMatchReferenceBitForBit) {
  if (cpu::best_isa() < cpu::Isa::kAVX2) GTEST_SKIP() << "no AVX2";
  struct Kern {
    const char* name;
    bool (*fn)(const cpu::W4A8Args&, const uint8_t*);
    cpu::Isa isa;
    bool vnni;  // AVX-512: vpdpbusd on zmm; AVX2: on ymm (cpu::avx2_vnni)
  };
  std::vector<Kern> kernels = {{"avx2", cpu::linear_w4a8_packed_avx2, cpu::Isa::kAVX2, false}};
  if (cpu::avx2_vnni_available()) kernels.push_back({"avx2_vnni", cpu::linear_w4a8_packed_avx2, cpu::Isa::kAVX2, true});
  if (cpu::best_isa() >= cpu::Isa::kAVX512) {
    kernels.push_back({"avx512bw", cpu::linear_w4a8_packed_avx512, cpu::Isa::kAVX512, false});
    if (cpu::w4a8_uses_vnni())
      kernels.push_back({"avx512_vnni", cpu::linear_w4a8_packed_avx512, cpu::Isa::kAVX512, true});
  }
  const struct { int64_t N, K, group; } shapes[] = {
      {16, 128, 128}, {17, 384, 128}, {40, 320, 64}, {1, 1000, 8},  {15, 200, 200}, {9, 321, 321},
      {33, 63, 63},   {8, 256, 16},   {23, 448, 192}, {7, 4096, 4096}, {24, 100, 24}, {31, 1282, 32},
      {161, 4096, 256},  // more than 256 KiB of panels: two chunks of work (w4a8_interleaved.h)
  };
  const cpu::Isa saved = cpu::active_isa();
  for (const Kern& kern : kernels) {
    cpu::set_isa(kern.isa);
    cpu::set_w4a8_vnni_enabled(kern.vnni);
    std::optional<Avx2VnniScope> dot;
    if (kern.isa == cpu::Isa::kAVX2) dot.emplace(kern.vnni);
    for (const auto& sh : shapes)
      for (Format fmt : {Format::kInt4, Format::kUInt4}) {
        const Weight w = make_weight(fmt, sh.N, sh.K, sh.group, 23 + sh.K);
        const std::vector<uint8_t> packed = pack_copy(w, fmt, sh.K, sh.group);
        for (int64_t M : {1, 2, 3, 4, 5, 8, 9})
          expect_direct_kernel_bits(kern.name, fmt, w, M, sh.N, sh.K, sh.group, 29 + M, true,
                                    [&](const cpu::W4A8Args& a) { return kern.fn(a, packed.data()); });
      }
  }
  cpu::set_w4a8_vnni_enabled(true);
  cpu::set_isa(saved);
}

// Through linear_w4a8: the packed copy gives the reference's bits at every token count, on
// each ISA here.
TEST(GemmW4A8, PackedCopyThroughLinearW4A8) {
  const Case c{1, 37, 392, 56};
  const cpu::Isa saved = cpu::active_isa();
  for (cpu::Isa isa : {cpu::Isa::kAVX2, cpu::Isa::kAVX512}) {
    if (cpu::best_isa() < isa) continue;
    cpu::set_isa(isa);
    EXPECT_TRUE(linear_w4a8_packing_pays());
    for (Format fmt : {Format::kInt4, Format::kUInt4}) {
      const Weight w = make_weight(fmt, c.N, c.K, c.group, 31);
      std::vector<uint8_t> packed = pack_copy(w, fmt, c.K, c.group);
      const TensorView pv = view1(packed.data(), DType::kUInt8, packed.size());
      for (int64_t M : {1, 2, 4, 5, 11, 70}) {
        const std::vector<float> x = make_x(M, c.K, c.K, 37 + M), b = random_weights(c.N, 6);
        std::vector<float> want(M * c.N), got(M * c.N);
        const TensorView xv = view2(const_cast<float*>(x.data()), DType::kFloat32, M, c.K);
        const TensorView bv = view1(const_cast<float*>(b.data()), DType::kFloat32, c.N);
        linear_w4a8(xv, w.qv, w.sv, w.zp(), &bv, fmt, c.group, view2(want.data(), DType::kFloat32, M, c.N),
                    GemmBackend::kReference);
        for (GemmBackend be : {GemmBackend::kAuto, GemmBackend::kNative}) {
          linear_w4a8(xv, w.qv, w.sv, w.zp(), &bv, fmt, c.group, view2(got.data(), DType::kFloat32, M, c.N),
                      be, &pv);
          ASSERT_EQ(0, std::memcmp(want.data(), got.data(), want.size() * 4))
              << cpu::isa_name(isa) << " M=" << M << " " << format_info(fmt).name;
        }
      }
    }
  }
  cpu::set_isa(saved);
}

// A buffer that is not this weight's packed copy is refused, never read as one.
TEST(GemmW4A8, PackedCopyOfAnotherKindIsRefused) {
  const Case c{2, 20, 64, 32};
  const Weight w = make_weight(Format::kUInt4, c.N, c.K, c.group, 41);
  const Weight w4 = make_weight(Format::kInt4, c.N, c.K, c.group, 41);
  const std::vector<float> x = make_x(c.M, c.K, c.K, 43);
  std::vector<float> out(c.M * c.N);
  const TensorView xv = view2(const_cast<float*>(x.data()), DType::kFloat32, c.M, c.K);
  const TensorView ov = view2(out.data(), DType::kFloat32, c.M, c.N);
  auto call = [&](std::vector<uint8_t>& p) {
    const TensorView pv = view1(p.data(), DType::kUInt8, p.size());
    linear_w4a8(xv, w.qv, w.sv, w.zp(), nullptr, Format::kUInt4, c.group, ov, GemmBackend::kAuto, &pv);
  };
  std::vector<uint8_t> good = pack_copy(w, Format::kUInt4, c.K, c.group);
  EXPECT_NO_THROW(call(good));
  std::vector<uint8_t> shorter(good.begin(), good.end() - 64);
  EXPECT_THROW(call(shorter), ValueError);
  std::vector<uint8_t> zeroed = good;
  std::fill(zeroed.begin(), zeroed.begin() + 8, 0);  // the magic
  EXPECT_THROW(call(zeroed), ValueError);
  std::vector<uint8_t> other_k = good;
  const int64_t k = c.K + 1;  // the header's K (bytes 16-23)
  std::memcpy(other_k.data() + 16, &k, sizeof(k));
  EXPECT_THROW(call(other_k), ValueError);
  // int4's copy is one panel of the same size without zero points: its header says so
  std::vector<uint8_t> of_int4 = pack_copy(w4, Format::kInt4, c.K, c.group);
  of_int4.resize(good.size());
  EXPECT_THROW(call(of_int4), ValueError);
  // No copy for a group that is not a multiple of 8: none to make, none to pass.
  EXPECT_EQ(linear_w4a8_packed_bytes(c.N, 96, 6, Format::kInt4), 0);
  std::vector<uint8_t> any(4096);
  const Weight w6 = make_weight(Format::kInt4, c.N, 96, 6, 1);
  EXPECT_THROW(linear_w4a8_pack(w6.qv, w6.sv, nullptr, Format::kInt4, 96, 6,
                                view1(any.data(), DType::kUInt8, any.size())),
               ValueError);
  EXPECT_THROW(linear_w4a8_pack(w.qv, w.sv, w.zp(), Format::kUInt4, c.K, c.group,
                                view1(any.data(), DType::kUInt8, any.size())),
               ValueError);  // the wrong size
  EXPECT_THROW(linear_w4a8_pack(w.qv, w.sv, nullptr, Format::kUInt4, c.K, c.group,
                                view1(good.data(), DType::kUInt8, good.size())),
               ValueError);  // uint4 without zero points
}

TEST(GemmW4A8, AutoFallsBackWhereNoKernelFits) {
  const Case c{3, 20, 96, 6};  // a group of 6 is valid int4 but not a multiple of 8
  const Weight w = make_weight(Format::kInt4, c.N, c.K, c.group, 1);
  const std::vector<float> x = make_x(c.M, c.K, c.K, 1), b = random_weights(c.N, 1);
  std::vector<uint8_t> ref, got;
  run(c, Format::kInt4, true, DType::kFloat32, GemmBackend::kReference, w, x, c.K, b, ref);
  run(c, Format::kInt4, true, DType::kFloat32, GemmBackend::kAuto, w, x, c.K, b, got);
  EXPECT_EQ(ref, got);
  EXPECT_STREQ(linear_w4a8_kernel(96, 6), "reference");
  EXPECT_THROW(run(c, Format::kInt4, true, DType::kFloat32, GemmBackend::kNative, w, x, c.K, b, got),
               ValueError);
}

TEST(GemmW4A8, RejectsBadArguments) {
  const Case c{2, 8, 64, 32};
  Weight w = make_weight(Format::kUInt4, c.N, c.K, c.group, 3);
  std::vector<float> x = make_x(c.M, c.K, c.K, 2), b(c.N, 0.0f), out(c.M * c.N);
  const TensorView xv = view2(x.data(), DType::kFloat32, c.M, c.K);
  const TensorView ov = view2(out.data(), DType::kFloat32, c.M, c.N);
  auto call = [&](const TensorView& xx, Format fmt, int64_t group, const TensorView* zp,
                  GemmBackend be) { linear_w4a8(xx, w.qv, w.sv, zp, nullptr, fmt, group, ov, be); };
  x[c.K + 5] = NAN;  // token 1
  for (GemmBackend be : {GemmBackend::kReference, GemmBackend::kAuto})
    EXPECT_THROW(call(xv, Format::kUInt4, c.group, &w.zv, be), ValueError);
  x[c.K + 5] = 0.0f;
  EXPECT_NO_THROW(call(xv, Format::kUInt4, c.group, &w.zv, GemmBackend::kAuto));
  EXPECT_THROW(call(xv, Format::kUInt4, c.group, &w.zv, GemmBackend::kOneDNN), ValueError);
  EXPECT_THROW(call(xv, Format::kInt8, c.group, nullptr, GemmBackend::kAuto), ValueError);
  EXPECT_THROW(call(xv, Format::kUInt4, 24, &w.zv, GemmBackend::kAuto), ValueError);  // not a divisor
  EXPECT_THROW(call(xv, Format::kUInt4, -1, &w.zv, GemmBackend::kAuto), ValueError);
  EXPECT_THROW(call(xv, Format::kUInt4, c.group, nullptr, GemmBackend::kAuto), ValueError);
  std::vector<int8_t> xi(c.M * c.K);
  EXPECT_THROW(call(view2(xi.data(), DType::kInt8, c.M, c.K), Format::kUInt4, c.group, &w.zv,
                    GemmBackend::kAuto), TypeError);
  w.zps[3] = 16;  // not a uint4 zero point
  EXPECT_THROW(call(xv, Format::kUInt4, c.group, &w.zv, GemmBackend::kAuto), ValueError);
}

TEST(GemmW4A8, KernelNameReportsVnni) {
  if (!have_avx512()) GTEST_SKIP() << "no AVX-512";
  if (cpu::cpu_has_avx512_vnni()) {
    EXPECT_STREQ(linear_w4a8_kernel(4096, 128), "avx512_vnni");
  }
  EXPECT_STREQ(linear_w4a8_kernel(4096, 4096), linear_w4a8_kernel(4096, 128));
}

}  // namespace
}  // namespace tensorslim
