// Sparse storage: pack / unpack round trips, and every ISA's N:M and CSR linears against the
// float64 product of the unpacked weight (summation order differs between paths, so the bound
// is |y - y64| <= 1e-5 * sum |w||x| per output), on odd shapes, batches 0..64 and sparsities
// 0..100%. Bad arguments raise ValueError / TypeError. The sparse convolutions against a float64
// direct convolution of the unpacked weight, every ISA, on odd geometries.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "half.h"
#include "tensorslim/gemm.h"
#include "tensorslim/quantize.h"
#include "tensorslim/sparse.h"
#include "test_helpers.h"

namespace tensorslim {
namespace {

using testing::random_weights;
using testing::Avx2VnniScope;
using testing::avx2_vnni_settings;
using testing::IsaScope;
using testing::machine_isas;
using testing::view1;
using testing::view2;
using testing::view4;

int vsize(DType dt) { return dtype_size(dt); }

// A keep mask with at most n per group of m, dropping a `sparsity` fraction of those n.
std::vector<uint8_t> nm_keep(const std::vector<float>& w, int64_t N, int64_t K, int n, int m, double sparsity,
                             uint32_t seed) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  std::vector<uint8_t> keep(N * K, 0);
  for (int64_t r = 0; r < N; ++r) {
    for (int64_t g0 = 0; g0 < K; g0 += m) {
      std::vector<int64_t> cols;
      for (int64_t c = g0; c < std::min(K, g0 + m); ++c) cols.push_back(c);
      std::sort(cols.begin(), cols.end(), [&](int64_t a, int64_t b) {
        return std::fabs(w[r * K + a]) > std::fabs(w[r * K + b]);
      });
      for (size_t i = 0; i < cols.size() && static_cast<int>(i) < n; ++i) {
        if (u(gen) >= sparsity) keep[r * K + cols[i]] = 1;
      }
    }
  }
  return keep;
}

// CSR row pointers of a [N, K] keep mask.
std::vector<int64_t> row_ptr_of(const std::vector<uint8_t>& keep, int64_t N, int64_t K) {
  std::vector<int64_t> rp(N + 1, 0);
  for (int64_t r = 0; r < N; ++r) {
    rp[r + 1] = rp[r];
    for (int64_t c = 0; c < K; ++c) rp[r + 1] += keep[r * K + c];
  }
  return rp;
}

std::vector<uint8_t> random_keep(int64_t numel, double sparsity, uint32_t seed) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  std::vector<uint8_t> keep(numel);
  for (auto& k : keep) k = u(gen) >= sparsity ? 1 : 0;
  return keep;
}

// The float64 product of the dense (unpacked) weight and its magnitude sum |w||x| + |bias|.
struct Ref {
  std::vector<double> y, mag;
  Ref(const std::vector<float>& dense, const std::vector<float>& x, const std::vector<float>& bias, int64_t M,
      int64_t N, int64_t K)
      : y(M * N), mag(M * N) {
    for (int64_t i = 0; i < M; ++i) {
      for (int64_t r = 0; r < N; ++r) {
        double acc = bias[r], mag_acc = std::fabs(bias[r]);
        for (int64_t k = 0; k < K; ++k) {
          const double p = static_cast<double>(dense[r * K + k]) * x[i * K + k];
          acc += p;
          mag_acc += std::fabs(p);
        }
        y[i * N + r] = acc;
        mag[i * N + r] = mag_acc;
      }
    }
  }
};

void expect_close(const std::vector<float>& y, const Ref& ref, const std::string& what) {
  for (size_t i = 0; i < y.size(); ++i) {
    ASSERT_LE(std::fabs(y[i] - ref.y[i]), 1e-5 * ref.mag[i] + 1e-30)
        << what << " at flat index " << i << " got " << y[i] << " want " << ref.y[i];
  }
}

struct Packed {
  std::vector<unsigned char> values;
  std::vector<uint8_t> indices;
  std::vector<uint16_t> cols;
  std::vector<int64_t> row_ptr;
  std::vector<float> scales;
};

TensorView values_view(Packed& p, DType dt, int64_t rows, int64_t cols) {
  return cols < 0 ? view1(p.values.data(), dt, rows) : view2(p.values.data(), dt, rows, cols);
}

// y = x @ W^T + bias for W = w * keep packed as n:m with values of dtype dt (uint8: int4 codes,
// two per byte); dense: the unpacked W.
struct NmLayer {
  int64_t N, K, S, B, VC;
  int n, m;
  DType dt;
  Packed p;
  std::vector<float> dense;
  NmLayer(std::vector<float> w, std::vector<uint8_t> keep, int64_t N_, int64_t K_, int n_, int m_, DType dt_)
      : N(N_), K(K_), S(nm_slots(K_, n_, m_)), B(nm_index_bytes(K_, n_, m_)),
        VC(dt_ == DType::kUInt8 ? (S + 15) / 16 * 8 : S), n(n_), m(m_), dt(dt_), dense(N_ * K_) {
    p.values.resize(N * VC * vsize(dt));
    p.indices.resize(N * B);
    p.scales.resize(N);
    TensorView sv = view1(p.scales.data(), DType::kFloat32, N);
    nm_pack(view2(w.data(), DType::kFloat32, N, K), view2(keep.data(), DType::kUInt8, N, K), n, m,
            values_view(p, dt, N, VC), view2(p.indices.data(), DType::kUInt8, N, B), coded() ? &sv : nullptr);
    nm_unpack(values_view(p, dt, N, VC), view2(p.indices.data(), DType::kUInt8, N, B), coded() ? &sv : nullptr, n,
              m, view2(dense.data(), DType::kFloat32, N, K));
  }
  bool coded() const { return dt == DType::kInt8 || dt == DType::kUInt8; }
  std::vector<float> run(std::vector<float>& x, int64_t M, std::vector<float>& bias) {
    std::vector<float> y(M * N, NAN), ws(sparse_linear_workspace(M, K) + 1);
    TensorView sv = view1(p.scales.data(), DType::kFloat32, N), bv = view1(bias.data(), DType::kFloat32, N);
    TensorView wsv = view1(ws.data(), DType::kFloat32, ws.size());
    nm_linear(view2(x.data(), DType::kFloat32, M, K), values_view(p, dt, N, VC),
              view2(p.indices.data(), DType::kUInt8, N, B), coded() ? &sv : nullptr, &bv, n, m,
              view2(y.data(), DType::kFloat32, M, N), &wsv);
    return y;
  }
};

TEST(Sparse, NmLinearEveryIsaMatchesFloat64) {
  IsaScope guard;
  const std::pair<int, int> nms[] = {{2, 4}, {1, 4}, {3, 4}, {4, 8}, {2, 8}, {1, 8}, {3, 8}, {5, 8}, {6, 8}, {7, 8}};
  const int64_t shapes[][2] = {{1, 7}, {5, 33}, {17, 64}, {9, 101}, {3, 4}, {33, 257}};
  // uint8: int4 codes, two per byte
  const DType dts[] = {DType::kFloat32, DType::kBFloat16, DType::kFloat16, DType::kInt8, DType::kUInt8};
  uint32_t seed = 1;
  for (auto [n, m] : nms) {
    for (auto& s : shapes) {
      const int64_t N = s[0], K = s[1];
      for (double sp : {0.0, 0.5, 0.9, 1.0}) {
        std::vector<float> w = random_weights(N * K, ++seed);
        std::vector<uint8_t> keep = nm_keep(w, N, K, n, m, sp, ++seed);
        for (DType dt : dts) {
          NmLayer layer(w, keep, N, K, n, m, dt);
          for (int64_t M : {0, 1, 3, 5, 8, 17, 64}) {
            std::vector<float> x = random_weights(M * K, ++seed), bias = random_weights(N, ++seed);
            const Ref ref(layer.dense, x, bias, M, N, K);
            for (cpu::Isa isa : machine_isas()) {
              cpu::set_isa(isa);
              expect_close(layer.run(x, M, bias), ref,
                           std::string(cpu::isa_name(isa)) + " " + std::to_string(n) + ":" + std::to_string(m) +
                               " " + dtype_name(dt) + " N=" + std::to_string(N) + " K=" + std::to_string(K) +
                               " M=" + std::to_string(M) + " sparsity=" + std::to_string(sp));
              if (HasFatalFailure()) return;
            }
          }
        }
      }
    }
  }
}

// N:M INT8 and INT4 values with m = 2n and K a multiple of 128 run on integer units at up to 12
// batch rows on AVX-512 VNNI + VBMI CPUs (x as activation pieces, nm_pieces_avx512.cpp) and on
// the AVX2 kernels with vpdpbusd (nm_pieces_avx2.cpp): every ISA (AVX2 with and without
// vpdpbusd) with the pieces switched on and off, on the shapes those kernels take (and 1:4, 3:4,
// which they do not).
struct PiecesScope {
  explicit PiecesScope(bool on) : saved(cpu::activation_pieces_enabled()) { cpu::set_activation_pieces_enabled(on); }
  ~PiecesScope() { cpu::set_activation_pieces_enabled(saved); }
  bool saved;
};

TEST(Sparse, NmCodedPiecesEveryIsaMatchesFloat64) {
  IsaScope guard;
  const std::pair<int, int> nms[] = {{2, 4}, {4, 8}, {1, 4}, {3, 4}};
  const int64_t shapes[][2] = {{1, 512}, {17, 2048}, {5, 2560}, {9, 1024}};
  uint32_t seed = 500;
  for (auto [n, m] : nms) {
    for (auto& s : shapes) {
      const int64_t N = s[0], K = s[1];
      for (double sp : {0.0, 0.5, 1.0}) {
        const std::vector<float> w = random_weights(N * K, ++seed);
        for (DType dt : {DType::kInt8, DType::kUInt8}) {
          NmLayer layer(w, nm_keep(w, N, K, n, m, sp, ++seed), N, K, n, m, dt);
          for (int64_t M : {1, 2, 3, 4, 5, 8, 9, 12, 13}) {
            std::vector<float> x = random_weights(M * K, ++seed), bias = random_weights(N, ++seed);
            const Ref ref(layer.dense, x, bias, M, N, K);
            for (cpu::Isa isa : machine_isas()) {
              cpu::set_isa(isa);
              const std::vector<bool> vnni = isa == cpu::Isa::kAVX2 ? avx2_vnni_settings() : std::vector<bool>{false};
              for (bool dot : vnni) {
                std::optional<Avx2VnniScope> dot_scope;
                if (isa == cpu::Isa::kAVX2) dot_scope.emplace(dot);
                for (bool pieces : {true, false}) {
                  const PiecesScope ps(pieces);
                  expect_close(layer.run(x, M, bias), ref,
                               std::string(cpu::isa_name(isa)) + (dot ? " vpdpbusd" : "") +
                                   (pieces ? " pieces " : " floats ") + dtype_name(dt) + " " + std::to_string(n) +
                                   ":" + std::to_string(m) + " N=" + std::to_string(N) + " K=" + std::to_string(K) +
                                   " M=" + std::to_string(M) + " sparsity=" + std::to_string(sp));
                  if (HasFatalFailure()) return;
                }
              }
            }
          }
        }
      }
    }
  }
}

// Where the pieces run, x is kept to within ~6e-8 * max|x| of each row (activation_pieces.h):
// a value below that vanishes, as in the dense pieces kernels. That tells which kernel ran: the
// pieces on AVX-512 VNNI + VBMI and on AVX2 with vpdpbusd for 2:4 and 4:8 INT8 / INT4 at
// batch 1 from K = 512 and at 2..12 rows from K = 2048 (cpu::nm_pieces_pay), the float kernels
// at 13 rows, K = 2052 (not a multiple of 128), other patterns, AVX2 without vpdpbusd, or with
// the pieces off. A row holding Inf falls back to the float kernels for the whole batch (Inf or
// NaN in its outputs, as they give them).
void expect_pieces_where_documented(bool has_pieces) {
  for (auto [n, m] : {std::pair<int, int>{2, 4}, {4, 8}, {1, 4}}) {
    for (int64_t K : {512, 2048, 2052}) {
      const int64_t N = 3;
      // Row 1 keeps column 0 (weight 1) only; x is 1 at column 8 and 3e-8 at column 0.
      std::vector<float> w(N * K, 0.0f);
      std::vector<uint8_t> keep(N * K, 0);
      w[1 * K + 0] = 1.0f;
      keep[1 * K + 0] = 1;
      for (DType dt : {DType::kInt8, DType::kUInt8}) {
        NmLayer layer(w, keep, N, K, n, m, dt);
        for (int64_t M : {1, 2, 8, 12, 13}) {
          for (bool on : {true, false}) {
            const PiecesScope ps(on);
            std::vector<float> x(M * K, 0.0f), bias(N, 0.0f);
            for (int64_t i = 0; i < M; ++i) {
              x[i * K + 8] = 1.0f;
              x[i * K + 0] = 3e-8f;
            }
            const bool pieces_run =
                has_pieces && on && n * 2 == m && K % 128 == 0 && (M == 1 || (M <= 12 && K >= 2048));
            std::vector<float> y = layer.run(x, M, bias);
            for (int64_t i = 0; i < M; ++i)
              EXPECT_NEAR(y[i * N + 1], pieces_run ? 0.0 : 3e-8, pieces_run ? 0.0 : 1e-13)
                  << dtype_name(dt) << " " << n << ":" << m << " K=" << K << " M=" << M << " pieces " << on;
            x[0] = INFINITY;  // row 0: Inf * weight 1 at column 0; the whole batch takes the floats
            y = layer.run(x, M, bias);
            EXPECT_FALSE(std::isfinite(y[1])) << n << ":" << m << " K=" << K << " M=" << M;
            for (int64_t i = 1; i < M; ++i)
              EXPECT_NEAR(y[i * N + 1], 3e-8, 1e-13) << n << ":" << m << " K=" << K << " M=" << M;
          }
        }
      }
    }
  }
}

TEST(Sparse, NmCodedPiecesRunWhereDocumented) {
  {
    IsaScope guard(cpu::best_isa());
    expect_pieces_where_documented(cpu::best_isa() == cpu::Isa::kAVX512 && cpu::cpu_has_avx512_vnni() &&
                                   cpu::cpu_has_avx512_vbmi());
  }
  if (cpu::best_isa() < cpu::Isa::kAVX2) return;
  IsaScope guard(cpu::Isa::kAVX2);  // only with vpdpbusd
  for (bool dot : avx2_vnni_settings()) {
    Avx2VnniScope dot_scope(dot);
    SCOPED_TRACE(dot ? "AVX2 with vpdpbusd" : "AVX2 without vpdpbusd");
    expect_pieces_where_documented(dot);
  }
}

// The sparse kernels read scattered values (x at CSR columns at batches 1 and 2, convolution
// input offsets) with gathers or with scalar loads (cpu::sparse_gathers, by CPU vendor): the
// tests run both on every CPU.
struct GathersScope {
  explicit GathersScope(bool on) : saved(cpu::sparse_gathers()) { cpu::set_sparse_gathers(on); }
  ~GathersScope() { cpu::set_sparse_gathers(saved); }
  bool saved;
};
std::string isa_variant(cpu::Isa isa) {
  return std::string(cpu::isa_name(isa)) + (cpu::sparse_gathers() ? " gathers" : " scalar loads");
}

TEST(Sparse, CsrLinearEveryIsaMatchesFloat64) {
  IsaScope guard;
  const int64_t shapes[][2] = {{1, 7}, {5, 33}, {17, 64}, {9, 101}, {40, 300}};
  uint32_t seed = 100;
  for (auto& s : shapes) {
    const int64_t N = s[0], K = s[1];
    for (double sp : {0.0, 0.5, 0.9, 1.0}) {
      std::vector<float> w = random_weights(N * K, ++seed);
      std::vector<uint8_t> keep = random_keep(N * K, sp, ++seed);
      Packed p;
      p.row_ptr = row_ptr_of(keep, N, K);
      const int64_t nnz = p.row_ptr[N];
      for (DType dt : {DType::kFloat32, DType::kInt8}) {
        p.values.assign(nnz * vsize(dt) + 1, 0);
        p.cols.assign(nnz + 1, 0);
        p.scales.assign(N, 0.0f);
        TensorView sv = view1(p.scales.data(), DType::kFloat32, N);
        const TensorView* sc = dt == DType::kInt8 ? &sv : nullptr;
        TensorView vv = view1(p.values.data(), dt, nnz), cv = view1(p.cols.data(), DType::kUInt16, nnz),
                   rv = view1(p.row_ptr.data(), DType::kInt64, N + 1);
        csr_pack(view2(w.data(), DType::kFloat32, N, K), view2(keep.data(), DType::kUInt8, N, K), rv, vv, cv, sc);
        std::vector<float> dense(N * K);
        csr_unpack(vv, cv, rv, sc, view2(dense.data(), DType::kFloat32, N, K));
        if (dt == DType::kFloat32) {
          for (int64_t i = 0; i < N * K; ++i) ASSERT_EQ(dense[i], keep[i] ? w[i] : 0.0f) << i;
        }
        for (int64_t M : {0, 1, 2, 3, 5, 17, 64, 70}) {
          std::vector<float> x = random_weights(M * K, ++seed), bias = random_weights(N, ++seed);
          std::vector<float> ws(sparse_linear_workspace(M, K) + 1);
          TensorView wsv = view1(ws.data(), DType::kFloat32, ws.size());
          const Ref ref(dense, x, bias, M, N, K);
          for (cpu::Isa isa : machine_isas()) for (bool gathers : {false, true}) {
            cpu::set_isa(isa);
            const GathersScope gs(gathers);
            std::vector<float> y(M * N, NAN);
            TensorView bv = view1(bias.data(), DType::kFloat32, N);
            csr_linear(view2(x.data(), DType::kFloat32, M, K), vv, cv, rv, sc, &bv,
                       view2(y.data(), DType::kFloat32, M, N), &wsv);
            expect_close(y, ref,
                         isa_variant(isa) + " csr " + dtype_name(dt) + " N=" + std::to_string(N) +
                             " K=" + std::to_string(K) + " M=" + std::to_string(M) + " sparsity=" +
                             std::to_string(sp));
            if (HasFatalFailure()) return;
          }
        }
      }
    }
  }
}

// The small-batch CSR kernels (batch 1 scalar loads of x, batches 2..8 on transposed x) and their edges:
// every batch 1..9, empty rows (first, middle, last), K not a multiple of any vector width,
// row counts that leave the last row block partial, and buffers sized exactly nnz so a row
// ending at the buffer's end cannot be read past.
TEST(Sparse, CsrSmallBatchesEveryIsa) {
  IsaScope guard;
  const int64_t shapes[][2] = {{37, 45}, {19, 129}, {70, 23}, {3, 1}};
  uint32_t seed = 500;
  for (auto& s : shapes) {
    const int64_t N = s[0], K = s[1];
    std::vector<float> w = random_weights(N * K, ++seed);
    std::vector<uint8_t> keep = random_keep(N * K, 0.6, ++seed);
    for (int64_t r : {int64_t{0}, N / 2, N - 1}) std::fill(keep.begin() + r * K, keep.begin() + (r + 1) * K, 0);
    if (N > 2) std::fill(keep.begin() + K, keep.begin() + 2 * K, 1);  // one full row
    std::vector<int64_t> rp(N + 1, 0);
    for (int64_t r = 0; r < N; ++r) {
      rp[r + 1] = rp[r];
      for (int64_t c = 0; c < K; ++c) rp[r + 1] += keep[r * K + c];
    }
    const int64_t nnz = rp[N];
    for (DType dt : {DType::kFloat32, DType::kInt8}) {
      std::vector<unsigned char> values(nnz * vsize(dt));
      std::vector<uint16_t> cols(nnz);
      std::vector<float> scales(N);
      TensorView sv = view1(scales.data(), DType::kFloat32, N);
      const TensorView* sc = dt == DType::kInt8 ? &sv : nullptr;
      TensorView vv = view1(values.data(), dt, nnz), cv = view1(cols.data(), DType::kUInt16, nnz),
                 rv = view1(rp.data(), DType::kInt64, N + 1);
      csr_pack(view2(w.data(), DType::kFloat32, N, K), view2(keep.data(), DType::kUInt8, N, K), rv, vv, cv, sc);
      std::vector<float> dense(N * K);
      csr_unpack(vv, cv, rv, sc, view2(dense.data(), DType::kFloat32, N, K));
      for (int64_t M = 1; M <= 9; ++M) {
        std::vector<float> x = random_weights(M * K, ++seed), bias = random_weights(N, ++seed);
        std::vector<float> ws(sparse_linear_workspace(M, K));
        TensorView wsv = view1(ws.data(), DType::kFloat32, ws.size());
        const Ref ref(dense, x, bias, M, N, K);
        for (cpu::Isa isa : machine_isas()) for (bool gathers : {false, true}) {
          cpu::set_isa(isa);
          const GathersScope gs(gathers);
          std::vector<float> y(M * N, NAN);
          TensorView bv = view1(bias.data(), DType::kFloat32, N);
          csr_linear(view2(x.data(), DType::kFloat32, M, K), vv, cv, rv, sc, &bv,
                     view2(y.data(), DType::kFloat32, M, N), M > 1 ? &wsv : nullptr);
          expect_close(y, ref,
                       isa_variant(isa) + " csr " + dtype_name(dt) + " N=" + std::to_string(N) +
                           " K=" + std::to_string(K) + " M=" + std::to_string(M));
          if (HasFatalFailure()) return;
        }
      }
    }
  }
}

// CSR rows whose columns repeat or go down (pack stores increasing columns, but the kernels'
// rule is every stored entry added once): row 2 holds 1300 entries at columns 0..99, more in
// one column block than the transposed kernels stage at a time; the others run backwards.
TEST(Sparse, CsrUnorderedColumnsEveryIsa) {
  IsaScope guard;
  const int64_t N = 6, K = 300;
  std::vector<int64_t> rp(N + 1, 0);
  std::vector<uint16_t> cols;
  std::vector<float> vals, dense(N * K, 0.0f);
  std::mt19937 gen(7);
  std::uniform_real_distribution<float> u(0.5f, 1.5f);  // positive: no cancellation in the bound
  for (int64_t r = 0; r < N; ++r) {
    const int64_t count = r == 2 ? 1300 : 90 * r;
    for (int64_t e = 0; e < count; ++e) {
      const int64_t c = r == 2 ? e % 100 : K - 1 - (e * 37) % K;
      cols.push_back(static_cast<uint16_t>(c));
      vals.push_back(u(gen));
      dense[r * K + c] += vals.back();
    }
    rp[r + 1] = static_cast<int64_t>(cols.size());
  }
  const int64_t nnz = rp[N];
  uint32_t seed = 900;
  for (int64_t M : {1, 2, 3, 8, 17, 64, 70}) {
    std::vector<float> x = random_weights(M * K, ++seed), bias = random_weights(N, ++seed);
    std::vector<float> ws(sparse_linear_workspace(M, K) + 1);
    TensorView wsv = view1(ws.data(), DType::kFloat32, ws.size());
    const Ref ref(dense, x, bias, M, N, K);
    for (cpu::Isa isa : machine_isas()) for (bool gathers : {false, true}) {
      cpu::set_isa(isa);
      const GathersScope gs(gathers);
      std::vector<float> y(M * N, NAN);
      TensorView bv = view1(bias.data(), DType::kFloat32, N);
      csr_linear(view2(x.data(), DType::kFloat32, M, K), view1(vals.data(), DType::kFloat32, nnz),
                 view1(cols.data(), DType::kUInt16, nnz), view1(rp.data(), DType::kInt64, N + 1), nullptr, &bv,
                 view2(y.data(), DType::kFloat32, M, N), &wsv);
      expect_close(y, ref, isa_variant(isa) + " M=" + std::to_string(M));
      if (HasFatalFailure()) return;
    }
  }
}

// Batches 3..8 on long rows (K = 4500, past the stride-4 / 8 copies of x that fit in L1) over
// 150 rows, several row tasks: rows that are empty, cover part of the width, run backwards or
// repeat a column are summed whole (float32 and int8 values); a column >= K three quarters into
// a long row fails the call. (Written for a column-panel kernel that was measured and not kept:
// docs/benchmarks.md, twenty-second session.)
TEST(Sparse, CsrLongRowsEveryIsa) {
  IsaScope guard;
  const int64_t N = 150, K = 4500;
  std::mt19937 gen(11);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<int64_t> rp(N + 1, 0);
  std::vector<uint16_t> cols;
  std::vector<float> vals, dense(N * K, 0.0f);
  auto add = [&](int64_t r, int64_t c) {
    cols.push_back(static_cast<uint16_t>(c));
    vals.push_back(u(gen));
    dense[r * K + c] += vals.back();
  };
  for (int64_t r = 0; r < N; ++r) {
    if (r == 3 || r == 64 || r == N - 1) {
      // empty
    } else if (r == 5) {
      for (int64_t c = K - 1; c >= 0; c -= 7) add(r, c);  // backwards over the width
    } else if (r == 70) {
      for (int64_t c = 4100; c < K; c += 3) add(r, c);  // the end of the width only
    } else if (r == 71) {
      for (int64_t c = 0; c < 900; c += 2) add(r, c);  // its start only
    } else if (r == 72) {
      for (int64_t e = 0; e < 40; ++e) add(r, 2047 + e % 3);  // three columns, repeated
    } else {
      for (int64_t c = 0; c < K; ++c)
        if (gen() % 10 == 0) add(r, c);
    }
    rp[r + 1] = static_cast<int64_t>(cols.size());
  }
  const int64_t nnz = rp[N];
  std::vector<int8_t> codes(nnz);
  std::vector<float> scales(N, 1.0f / 64), dense8(N * K, 0.0f);
  for (int64_t r = 0; r < N; ++r)
    for (int64_t e = rp[r]; e < rp[r + 1]; ++e) {
      codes[e] = static_cast<int8_t>(std::lround(vals[e] * 64));
      dense8[r * K + cols[e]] += codes[e] / 64.0f;
    }
  uint32_t seed = 1300;
  for (int64_t M = 3; M <= 8; ++M) {
    std::vector<float> x = random_weights(M * K, ++seed), bias = random_weights(N, ++seed);
    std::vector<float> ws(sparse_linear_workspace(M, K));
    TensorView wsv = view1(ws.data(), DType::kFloat32, ws.size()), bv = view1(bias.data(), DType::kFloat32, N);
    TensorView cv = view1(cols.data(), DType::kUInt16, nnz), rv = view1(rp.data(), DType::kInt64, N + 1),
               sv = view1(scales.data(), DType::kFloat32, N);
    const Ref ref(dense, x, bias, M, N, K), ref8(dense8, x, bias, M, N, K);
    for (cpu::Isa isa : machine_isas()) {
      cpu::set_isa(isa);
      std::vector<float> y(M * N, NAN);
      csr_linear(view2(x.data(), DType::kFloat32, M, K), view1(vals.data(), DType::kFloat32, nnz), cv, rv, nullptr,
                 &bv, view2(y.data(), DType::kFloat32, M, N), &wsv);
      expect_close(y, ref, std::string(cpu::isa_name(isa)) + " fp32 M=" + std::to_string(M));
      std::fill(y.begin(), y.end(), NAN);
      csr_linear(view2(x.data(), DType::kFloat32, M, K), view1(codes.data(), DType::kInt8, nnz), cv, rv, &sv, &bv,
                 view2(y.data(), DType::kFloat32, M, N), &wsv);
      expect_close(y, ref8, std::string(cpu::isa_name(isa)) + " int8 M=" + std::to_string(M));
      if (HasFatalFailure()) return;
      const int64_t at = rp[100] + (rp[101] - rp[100]) * 3 / 4;  // row 100: in its fourth quarter
      const uint16_t keep = cols[at];
      cols[at] = static_cast<uint16_t>(K + 7);
      EXPECT_THROW(csr_linear(view2(x.data(), DType::kFloat32, M, K), view1(vals.data(), DType::kFloat32, nnz), cv,
                              rv, nullptr, &bv, view2(y.data(), DType::kFloat32, M, N), &wsv),
                   ValueError)
          << cpu::isa_name(isa) << " M=" << M;
      cols[at] = keep;
    }
  }
}

// A column >= K in a middle row fails the call at every batch size and ISA (never read).
TEST(Sparse, CsrBadColumnEveryBatch) {
  IsaScope guard;
  const int64_t N = 40, K = 20;
  std::vector<int64_t> rp(N + 1);
  for (int64_t r = 0; r <= N; ++r) rp[r] = 3 * r;
  std::vector<float> v(3 * N, 1.0f);
  std::vector<uint16_t> c(3 * N);
  for (int64_t e = 0; e < 3 * N; ++e) c[e] = static_cast<uint16_t>(e % 3);
  c[3 * 21 + 1] = 60000;
  for (int64_t M : {1, 2, 5, 8, 9}) {
    std::vector<float> x(M * K, 1.0f), y(M * N);
    std::vector<float> ws(sparse_linear_workspace(M, K) + 1);
    TensorView wsv = view1(ws.data(), DType::kFloat32, ws.size());
    for (cpu::Isa isa : machine_isas()) for (bool gathers : {false, true}) {
      cpu::set_isa(isa);
      const GathersScope gs(gathers);
      EXPECT_THROW(csr_linear(view2(x.data(), DType::kFloat32, M, K), view1(v.data(), DType::kFloat32, 3 * N),
                              view1(c.data(), DType::kUInt16, 3 * N), view1(rp.data(), DType::kInt64, N + 1),
                              nullptr, nullptr, view2(y.data(), DType::kFloat32, M, N), &wsv),
                   ValueError)
          << isa_variant(isa) << " M=" << M;
    }
  }
}

// The row-wise CSR kernels check each step's columns against K just before reading x at them:
// a column equal to K at any position of a 57-entry row (AVX-512 batch 1: a 32-entry step, a
// 16-entry step and a 9-entry tail; AVX2 batch 1: three 16-entry steps, an 8-entry step and a
// 1-entry tail; batches 2..8: three 16-entry steps and a 9-entry tail) fails the call; columns
// up to K - 1 = 65535 (K = 65536, the largest) are read.
TEST(Sparse, CsrColumnCheckEveryStep) {
  IsaScope guard;
  const int64_t N = 3, per_row = 57;
  std::vector<int64_t> rp(N + 1);
  for (int64_t r = 0; r <= N; ++r) rp[r] = per_row * r;
  std::vector<float> v(per_row * N, 1.0f);
  for (int64_t K : {int64_t{100}, int64_t{65536}}) {
    std::vector<uint16_t> c(per_row * N);
    for (int64_t e = 0; e < per_row * N; ++e) c[e] = static_cast<uint16_t>(K - 1 - e % per_row);
    for (int64_t M : {1, 2, 5, 8}) {
      std::vector<float> x(M * K), y(M * N), ws(sparse_linear_workspace(M, K) + 1);
      for (int64_t i = 0; i < M * K; ++i) x[i] = static_cast<float>(i % K % 97);  // every batch row alike
      TensorView wsv = view1(ws.data(), DType::kFloat32, ws.size());
      auto run = [&] {
        csr_linear(view2(x.data(), DType::kFloat32, M, K), view1(v.data(), DType::kFloat32, per_row * N),
                   view1(c.data(), DType::kUInt16, per_row * N), view1(rp.data(), DType::kInt64, N + 1), nullptr,
                   nullptr, view2(y.data(), DType::kFloat32, M, N), &wsv);
      };
      float expect = 0.0f;  // every row holds columns K - 1 .. K - 57: exact small integers
      for (int64_t i = 0; i < per_row; ++i) expect += x[K - 1 - i];
      for (cpu::Isa isa : machine_isas()) for (bool gathers : {false, true}) {
        cpu::set_isa(isa);
        const GathersScope gs(gathers);
        run();
        for (int64_t i = 0; i < M * N; ++i)
          EXPECT_EQ(y[i], expect) << isa_variant(isa) << " K=" << K << " M=" << M << " output " << i;
        if (K == 65536) continue;  // no 16-bit column is out of range
        for (int64_t pos : {0, 5, 15, 16, 31, 32, 40, 47, 48, 50, 55, 56}) {
          const uint16_t keep = c[per_row + pos];
          c[per_row + pos] = static_cast<uint16_t>(K);
          EXPECT_THROW(run(), ValueError) << isa_variant(isa) << " M=" << M << " column K at entry " << pos;
          c[per_row + pos] = keep;
        }
      }
    }
  }
}

TEST(Sparse, NmPackRoundTripAndLayout) {
  // Row 0 of 2:4 over K = 6: groups {0..3} keep 1 and 3; the tail group (r = 2) keeps only
  // column 5, so its free slot takes the smallest unused position 0 (column 4, value 0).
  std::vector<float> w = {1, 2, 3, 4, 5, 6};
  std::vector<uint8_t> keep = {0, 1, 0, 1, 0, 1};
  std::vector<float> values(4);
  std::vector<uint8_t> idx(nm_index_bytes(6, 2, 4));
  ASSERT_EQ(idx.size(), 1u);
  nm_pack(view2(w.data(), DType::kFloat32, 1, 6), view2(keep.data(), DType::kUInt8, 1, 6), 2, 4,
          view2(values.data(), DType::kFloat32, 1, 4), view2(idx.data(), DType::kUInt8, 1, 1), nullptr);
  EXPECT_EQ(values, (std::vector<float>{2, 4, 0, 6}));
  EXPECT_EQ(idx[0], 1 | (3 << 2) | (0 << 4) | (1 << 6));
  std::vector<float> back(6);
  nm_unpack(view2(values.data(), DType::kFloat32, 1, 4), view2(idx.data(), DType::kUInt8, 1, 1), nullptr, 2, 4,
            view2(back.data(), DType::kFloat32, 1, 6));
  EXPECT_EQ(back, (std::vector<float>{0, 2, 0, 4, 0, 6}));
}

// The packing rule's scale of integer values for row r: max |kept| / qmax (1 when nothing
// nonzero is kept).
float rule_scale(const std::vector<float>& w, const std::vector<uint8_t>& keep, int64_t r, int64_t K, float qmax) {
  float amax = 0.0f;
  for (int64_t c = 0; c < K; ++c) amax = keep[r * K + c] ? std::max(amax, std::fabs(w[r * K + c])) : amax;
  return amax > 0 ? amax / qmax : 1.0f;
}

TEST(Sparse, Int8ValuesFollowTheRule) {
  const int64_t N = 3, K = 16;
  std::vector<float> w = random_weights(N * K, 5);
  std::vector<uint8_t> keep = nm_keep(w, N, K, 2, 4, 0.0, 6);
  for (int64_t c = 0; c < K; ++c) keep[2 * K + c] = 0;  // an empty row: scale 1, codes 0
  std::vector<int8_t> codes(N * 8);
  std::vector<uint8_t> idx(N * 2);
  std::vector<float> scales(N);
  TensorView sv = view1(scales.data(), DType::kFloat32, N);
  nm_pack(view2(w.data(), DType::kFloat32, N, K), view2(keep.data(), DType::kUInt8, N, K), 2, 4,
          view2(codes.data(), DType::kInt8, N, 8), view2(idx.data(), DType::kUInt8, N, 2), &sv);
  for (int64_t r = 0; r < N; ++r) {
    const float scale = rule_scale(w, keep, r, K, 127.0f);
    EXPECT_EQ(scales[r], scale);
    int j = 0;
    for (int64_t c = 0; c < K; ++c) {
      if (!keep[r * K + c]) continue;
      EXPECT_EQ(codes[r * 8 + j++], static_cast<int8_t>(std::nearbyint(w[r * K + c] / scale)));
    }
  }
  EXPECT_EQ(scales[2], 1.0f);
  for (int j = 0; j < 8; ++j) EXPECT_EQ(codes[2 * 8 + j], 0);
}

TEST(Sparse, Int4ValuesFollowTheRule) {
  // 1:4 over K = 75: 19 slots per row, so each row is two 64-bit words, 13 nibbles of the
  // second one unused (0).
  const int64_t N = 3, K = 75, S = 19, VC = 16;
  std::vector<float> w = random_weights(N * K, 7);
  std::vector<uint8_t> keep = nm_keep(w, N, K, 1, 4, 0.0, 8);
  for (int64_t c = 0; c < K; ++c) keep[2 * K + c] = 0;  // an empty row: scale 1, codes 0
  std::vector<uint8_t> codes(N * VC, 0xff), idx(N * nm_index_bytes(K, 1, 4));
  const int64_t B = nm_index_bytes(K, 1, 4);
  std::vector<float> scales(N);
  TensorView sv = view1(scales.data(), DType::kFloat32, N);
  TensorView cv = view2(codes.data(), DType::kUInt8, N, VC), iv = view2(idx.data(), DType::kUInt8, N, B);
  nm_pack(view2(w.data(), DType::kFloat32, N, K), view2(keep.data(), DType::kUInt8, N, K), 1, 4, cv, iv, &sv);
  auto nibble = [&](int64_t r, int64_t t) { return (codes[r * VC + t / 2] >> (4 * (t % 2))) & 15; };
  auto code_at = [&](int64_t r, int64_t j) {  // word j / 16, nibble (k % 2) * 8 + k / 2
    const int64_t k = j % 16;
    const int u = nibble(r, j / 16 * 16 + k % 2 * 8 + k / 2);
    return u >= 8 ? u - 16 : u;
  };
  for (int64_t r = 0; r < N; ++r) {
    const float scale = rule_scale(w, keep, r, K, 7.0f);
    EXPECT_EQ(scales[r], scale);
    int64_t j = 0;
    for (int64_t c = 0; c < K; ++c) {
      if (!keep[r * K + c]) continue;
      const float want = std::min(7.0f, std::max(-7.0f, std::nearbyint(w[r * K + c] / scale)));
      EXPECT_EQ(code_at(r, j++), static_cast<int>(want)) << "row " << r << " column " << c;
    }
    EXPECT_EQ(j, r < 2 ? S : 0);
    // word 1 holds slots 16..18: even ones at nibbles 16, 17, the odd one at 24; the rest 0
    for (int64_t t = 16; t < 32; ++t) {
      if (t != 16 && t != 17 && t != 24) EXPECT_EQ(nibble(r, t), 0) << "row " << r << ": unused nibble " << t;
    }
  }
  EXPECT_EQ(scales[2], 1.0f);
  for (int64_t j = 0; j < S; ++j) EXPECT_EQ(code_at(2, j), 0);
  // values of the int8 shape are refused for int4 codes
  std::vector<uint8_t> wide(N * S);
  EXPECT_THROW(nm_pack(view2(w.data(), DType::kFloat32, N, K), view2(keep.data(), DType::kUInt8, N, K), 1, 4,
                       view2(wide.data(), DType::kUInt8, N, S), iv, &sv),
               ValueError);
  EXPECT_THROW(nm_pack(view2(w.data(), DType::kFloat32, N, K), view2(keep.data(), DType::kUInt8, N, K), 1, 4, cv, iv,
                       nullptr),
               ValueError);
}

TEST(Sparse, BadArgumentsRaise) {
  std::vector<float> w(2 * 8, 1.0f), values(16);
  std::vector<uint8_t> keep(16, 1), idx(16);
  auto wv = view2(w.data(), DType::kFloat32, 2, 8);
  auto kv = view2(keep.data(), DType::kUInt8, 2, 8);
  auto pack = [&](int n, int m) {
    nm_pack(wv, kv, n, m, view2(values.data(), DType::kFloat32, 2, nm_slots(8, n, m)),
            view2(idx.data(), DType::kUInt8, 2, nm_index_bytes(8, n, m)), nullptr);
  };
  EXPECT_THROW(pack(4, 4), ValueError);
  EXPECT_THROW(pack(0, 4), ValueError);
  EXPECT_THROW(pack(2, 5), ValueError);
  try {
    pack(2, 4);  // all kept: 4 > 2 in row 0, group 0
    FAIL() << "no error";
  } catch (const ValueError& e) {
    EXPECT_NE(std::string(e.what()).find("row 0, group 0"), std::string::npos) << e.what();
  }
  // int8 values without scales, float values with scales.
  std::vector<int8_t> codes(16);
  std::fill(keep.begin(), keep.end(), 0);
  EXPECT_THROW(nm_pack(wv, kv, 2, 4, view2(codes.data(), DType::kInt8, 2, 4), view2(idx.data(), DType::kUInt8, 2, 1),
                       nullptr),
               ValueError);
  // CSR: K over 65536, bad row_ptr, a column out of range in linear.
  std::vector<float> big(65537);
  std::vector<uint8_t> bigkeep(65537, 0);
  std::vector<int64_t> rp = {0, 0};
  std::vector<float> v1(1);
  std::vector<uint16_t> c1(1);
  EXPECT_THROW(csr_pack(view2(big.data(), DType::kFloat32, 1, 65537), view2(bigkeep.data(), DType::kUInt8, 1, 65537),
                        view1(rp.data(), DType::kInt64, 2), view1(v1.data(), DType::kFloat32, 0),
                        view1(c1.data(), DType::kUInt16, 0), nullptr),
               ValueError);
  std::vector<float> x(8, 1.0f), y(2);
  std::vector<int64_t> bad_rp = {0, 2, 1};
  std::vector<float> v2 = {1, 2};
  std::vector<uint16_t> c2 = {1, 9};
  auto lin = [&](std::vector<int64_t>& r) {
    csr_linear(view2(x.data(), DType::kFloat32, 1, 8), view1(v2.data(), DType::kFloat32, 2),
               view1(c2.data(), DType::kUInt16, 2), view1(r.data(), DType::kInt64, 3), nullptr, nullptr,
               view2(y.data(), DType::kFloat32, 1, 2), nullptr);
  };
  EXPECT_THROW(lin(bad_rp), ValueError);
  std::vector<int64_t> ok_rp = {0, 1, 2};
  IsaScope guard;
  for (cpu::Isa isa : machine_isas()) {
    cpu::set_isa(isa);
    EXPECT_THROW(lin(ok_rp), ValueError) << cpu::isa_name(isa);  // column 9 >= K = 8
  }
  // A batch that needs a workspace, without one.
  std::vector<float> x8(8 * 8, 1.0f), y8(8 * 2);
  c2[1] = 2;
  if (cpu::best_isa() != cpu::Isa::kScalar) {
    cpu::set_isa(cpu::best_isa());
    EXPECT_THROW(csr_linear(view2(x8.data(), DType::kFloat32, 8, 8), view1(v2.data(), DType::kFloat32, 2),
                            view1(c2.data(), DType::kUInt16, 2), view1(ok_rp.data(), DType::kInt64, 3), nullptr,
                            nullptr, view2(y8.data(), DType::kFloat32, 8, 2), nullptr),
                 ValueError);
  }
}

// Direct float64 convolution (one group, zero padding) of the dense [N, C*kh*kw] weight, and
// its magnitude sum per output, laid out as out [B, N, Ho, Wo].
Ref conv_ref(const std::vector<float>& dense, const std::vector<float>& x, const std::vector<float>& bias, int64_t B,
             int64_t C, int64_t H, int64_t W, int64_t N, const ConvGeometry& g, int64_t Ho, int64_t Wo) {
  Ref ref({}, {}, {}, 0, 0, 0);
  ref.y.assign(B * N * Ho * Wo, 0.0);
  ref.mag.assign(B * N * Ho * Wo, 0.0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t r = 0; r < N; ++r)
      for (int64_t yo = 0; yo < Ho; ++yo)
        for (int64_t xo = 0; xo < Wo; ++xo) {
          double acc = bias[r], mag = std::fabs(bias[r]);
          const int64_t Cg = C / g.groups, c0 = r / (N / g.groups) * Cg;  // the group's input channels
          for (int64_t c = 0; c < Cg; ++c)
            for (int64_t ky = 0; ky < g.kh; ++ky)
              for (int64_t kx = 0; kx < g.kw; ++kx) {
                const int64_t yi = yo * g.sh + ky * g.dh - g.ph, xi = xo * g.sw + kx * g.dw - g.pw;
                if (yi < 0 || yi >= H || xi < 0 || xi >= W) continue;
                const double p = static_cast<double>(dense[r * Cg * g.kh * g.kw + (c * g.kh + ky) * g.kw + kx]) *
                                 x[((b * C + c0 + c) * H + yi) * W + xi];
                acc += p;
                mag += std::fabs(p);
              }
          const int64_t o = ((b * N + r) * Ho + yo) * Wo + xo;
          ref.y[o] = acc;
          ref.mag[o] = mag;
        }
  return ref;
}

// Geometries: 1x1, 3x3 same, strided, dilated, non-square, kernels as large as the padded
// input, output widths around the 8 / 16 lanes and past a 64-position tile, strides with one
// to three row phases; CSR float32 /
// int8 and N:M 2:4 / 1:8 float32 / int8, against every ISA the machine runs.
TEST(Sparse, ConvEveryIsaMatchesFloat64) {
  IsaScope guard;
  struct Case {
    int64_t B, C, H, W, N;
    ConvGeometry g;
  };
  const Case cases[] = {
      {1, 3, 5, 5, 4, {1, 1, 1, 1, 0, 0, 1, 1}},  {2, 5, 9, 11, 7, {3, 3, 1, 1, 1, 1, 1, 1}},
      {1, 4, 13, 10, 33, {3, 3, 2, 2, 1, 1, 1, 1}}, {3, 2, 12, 17, 5, {3, 2, 1, 3, 2, 0, 2, 1}},
      {1, 6, 7, 7, 9, {5, 5, 1, 1, 2, 2, 1, 1}},  {2, 3, 4, 4, 3, {3, 3, 1, 1, 0, 0, 1, 1}},
      {1, 7, 18, 9, 40, {3, 3, 1, 1, 1, 1, 1, 1}}, {2, 3, 6, 6, 2, {7, 7, 1, 1, 3, 3, 1, 1}},
      // row phases: ky * dh % sh = 0, 2, 1 (three plane groups); all 0 (one group, q = ky)
      {1, 3, 16, 12, 6, {3, 3, 3, 2, 1, 1, 2, 1}}, {2, 2, 15, 9, 5, {3, 3, 2, 1, 2, 1, 2, 1}},
      {1, 3, 23, 23, 8, {7, 7, 2, 2, 3, 3, 1, 1}},  // a ResNet stem
      {2, 4, 10, 12, 6, {3, 3, 1, 1, 2, 2, 2, 2}},  // dilated "same": planes copied as shifted blocks
      // groups: 2 of 3 -> 35 channels (row blocks cut at each group's end), depthwise, strided
      {2, 6, 9, 9, 70, {3, 3, 1, 1, 1, 1, 1, 1, 2}}, {1, 8, 11, 7, 8, {3, 3, 1, 1, 1, 1, 1, 1, 8}},
      {2, 12, 10, 10, 8, {3, 3, 2, 2, 1, 1, 1, 1, 4}},
  };
  uint32_t seed = 900;
  for (const Case& cs : cases) {
    const ConvGeometry& g = cs.g;
    const int64_t K = cs.C / g.groups * g.kh * g.kw, N = cs.N;
    const int64_t Ho = (cs.H + 2 * g.ph - g.dh * (g.kh - 1) - 1) / g.sh + 1;
    const int64_t Wo = (cs.W + 2 * g.pw - g.dw * (g.kw - 1) - 1) / g.sw + 1;
    std::vector<float> w = random_weights(N * K, ++seed), x = random_weights(cs.B * cs.C * cs.H * cs.W, ++seed),
                       bias = random_weights(N, ++seed);
    std::vector<float> ws(sparse_conv2d_workspace(cs.B, cs.C, cs.H, cs.W, g));
    TensorView wsv = view1(ws.data(), DType::kFloat32, ws.size()), bv = view1(bias.data(), DType::kFloat32, N);
    TensorView xv = view4(x.data(), cs.B, cs.C, cs.H, cs.W);
    auto check = [&](const std::vector<float>& dense, const std::string& what, auto&& run) {
      const Ref ref = conv_ref(dense, x, bias, cs.B, cs.C, cs.H, cs.W, N, g, Ho, Wo);
      for (cpu::Isa isa : machine_isas()) for (bool gathers : {false, true}) {
        cpu::set_isa(isa);
        const GathersScope gs(gathers);
        std::vector<float> y(cs.B * N * Ho * Wo, NAN);
        run(view4(y.data(), cs.B, N, Ho, Wo));
        expect_close(y, ref, isa_variant(isa) + " " + what + " C=" + std::to_string(cs.C) +
                                 " H=" + std::to_string(cs.H) + " W=" + std::to_string(cs.W) + " k=" +
                                 std::to_string(g.kh) + "x" + std::to_string(g.kw));
        if (::testing::Test::HasFatalFailure()) return;
      }
    };
    for (DType dt : {DType::kFloat32, DType::kInt8, DType::kUInt8}) {  // uint8: int4 codes (n:m only)
      std::vector<float> scales(N);
      TensorView sv = view1(scales.data(), DType::kFloat32, N);
      const TensorView* sc = dt == DType::kFloat32 ? nullptr : &sv;
      for (auto nm : {std::pair<int, int>{2, 4}, std::pair<int, int>{1, 8}}) {
        const int n = nm.first, m = nm.second;
        const int64_t S = nm_slots(K, n, m), VC = dt == DType::kUInt8 ? (S + 15) / 16 * 8 : S;
        std::vector<uint8_t> nkeep = nm_keep(w, N, K, n, m, 0.0, ++seed);
        Packed q;
        q.values.assign(N * VC * vsize(dt), 0);
        q.indices.assign(N * nm_index_bytes(K, n, m), 0);
        TensorView qv = values_view(q, dt, N, VC),
                   iv = view2(q.indices.data(), DType::kUInt8, N, nm_index_bytes(K, n, m));
        nm_pack(view2(w.data(), DType::kFloat32, N, K), view2(nkeep.data(), DType::kUInt8, N, K), n, m, qv, iv, sc);
        std::vector<float> ndense(N * K);
        nm_unpack(qv, iv, sc, n, m, view2(ndense.data(), DType::kFloat32, N, K));
        check(ndense, std::to_string(n) + ":" + std::to_string(m) + " " + dtype_name(dt),
              [&](TensorView out) { nm_conv2d(xv, qv, iv, sc, &bv, n, m, g, out, wsv); });
        if (HasFatalFailure()) return;
      }
      if (dt == DType::kUInt8) continue;
      // CSR at 70% zeros
      std::vector<uint8_t> keep = random_keep(N * K, 0.7, ++seed);
      Packed p;
      p.row_ptr = row_ptr_of(keep, N, K);
      const int64_t nnz = p.row_ptr[N];
      p.values.assign(nnz * vsize(dt) + 1, 0);
      p.cols.assign(nnz + 1, 0);
      TensorView vv = view1(p.values.data(), dt, nnz), cv = view1(p.cols.data(), DType::kUInt16, nnz),
                 rv = view1(p.row_ptr.data(), DType::kInt64, N + 1);
      csr_pack(view2(w.data(), DType::kFloat32, N, K), view2(keep.data(), DType::kUInt8, N, K), rv, vv, cv, sc);
      std::vector<float> dense(N * K);
      csr_unpack(vv, cv, rv, sc, view2(dense.data(), DType::kFloat32, N, K));
      check(dense, std::string("csr ") + dtype_name(dt),
            [&](TensorView out) { csr_conv2d(xv, vv, cv, rv, sc, &bv, g, out, wsv); });
      if (HasFatalFailure()) return;
    }
  }
}

TEST(Sparse, ConvBadArgumentsRaise) {
  // a 2 -> 3 channel 3 x 3 CSR conv with one entry per row
  std::vector<float> v = {1, 2, 3};
  std::vector<uint16_t> c = {0, 5, 17};
  std::vector<int64_t> rp = {0, 1, 2, 3};
  TensorView vv = view1(v.data(), DType::kFloat32, 3), cv = view1(c.data(), DType::kUInt16, 3),
             rv = view1(rp.data(), DType::kInt64, 4);
  std::vector<float> x(2 * 5 * 5, 1.0f), y(3 * 5 * 5), ws(4096);
  const ConvGeometry same{3, 3, 1, 1, 1, 1, 1, 1};
  auto conv = [&](TensorView xv, TensorView out, const ConvGeometry& g, int64_t ws_size) {
    csr_conv2d(xv, vv, cv, rv, nullptr, nullptr, g, out, view1(ws.data(), DType::kFloat32, ws_size));
  };
  EXPECT_NO_THROW(conv(view4(x.data(), 1, 2, 5, 5), view4(y.data(), 1, 3, 5, 5), same, 4096));
  EXPECT_THROW(conv(view4(x.data(), 1, 1, 5, 5), view4(y.data(), 1, 3, 5, 5), same, 4096), ValueError);  // channels
  EXPECT_THROW(conv(view4(x.data(), 1, 2, 5, 5), view4(y.data(), 1, 3, 4, 5), same, 4096), ValueError);  // out shape
  EXPECT_THROW(conv(view4(x.data(), 1, 2, 5, 5), view4(y.data(), 1, 3, 5, 5), same, 100), ValueError);   // workspace
  const ConvGeometry too_big{3, 3, 1, 1, 0, 0, 3, 3};  // a 7 x 7 dilated kernel on 5 x 5
  EXPECT_THROW(conv(view4(x.data(), 1, 2, 5, 5), view4(y.data(), 1, 3, 1, 1), too_big, 4096), ValueError);
  const ConvGeometry zero_stride{3, 3, 0, 1, 1, 1, 1, 1};
  EXPECT_THROW(conv(view4(x.data(), 1, 2, 5, 5), view4(y.data(), 1, 3, 5, 5), zero_stride, 4096), ValueError);
  const ConvGeometry three_groups{3, 3, 1, 1, 1, 1, 1, 1, 3};  // 3 does not divide the 2 input channels
  EXPECT_THROW(conv(view4(x.data(), 1, 2, 5, 5), view4(y.data(), 1, 3, 5, 5), three_groups, 4096), ValueError);
  const ConvGeometry two_groups{3, 3, 1, 1, 1, 1, 1, 1, 2};  // divides the 2 input channels, not the 3 outputs
  EXPECT_THROW(conv(view4(x.data(), 1, 2, 5, 5), view4(y.data(), 1, 3, 5, 5), two_groups, 4096), ValueError);
  c[2] = 18;  // a column >= C * kh * kw = 18, on every ISA
  IsaScope guard;
  for (cpu::Isa isa : machine_isas()) {
    cpu::set_isa(isa);
    EXPECT_THROW(conv(view4(x.data(), 1, 2, 5, 5), view4(y.data(), 1, 3, 5, 5), same, 4096), ValueError)
        << cpu::isa_name(isa);
  }
}

}  // namespace
}  // namespace tensorslim
