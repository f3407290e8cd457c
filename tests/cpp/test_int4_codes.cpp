// INT4 rows unpacked to one code per byte (int4_codes.h): the AVX2 steps give the 256-entry
// table's codes for every byte value, both signs, on lengths around the 32-byte step.
#include <gtest/gtest.h>

#include <random>
#include <vector>

#include "int4_codes.h"
#include "test_helpers.h"

namespace tensorslim {
namespace {

TEST(Int4Codes, VectorStepsEqualTheTable) {
  if (cpu::best_isa() < cpu::Isa::kAVX2) GTEST_SKIP() << "no AVX2";
  std::mt19937 gen(3);
  for (int64_t K : {1, 2, 63, 64, 65, 127, 512, 1001})
    for (bool is_signed : {false, true}) {
      std::vector<uint8_t> q((K + 1) / 2);
      for (size_t i = 0; i < q.size(); ++i) q[i] = static_cast<uint8_t>(K > 500 ? i : gen());  // every byte value
      std::vector<uint8_t> vec_codes, table_codes;
      const uint8_t* v;
      {
        testing::IsaScope scope(cpu::Isa::kAVX2);
        v = cpu::row_codes(q.data(), K, 4, is_signed, vec_codes);
      }
      testing::IsaScope scope(cpu::Isa::kScalar);
      const uint8_t* t = cpu::row_codes(q.data(), K, 4, is_signed, table_codes);
      for (int64_t k = 0; k < K; ++k) {
        const int nib = k % 2 ? q[k / 2] >> 4 : q[k / 2] & 0xF;
        const int want = is_signed && nib >= 8 ? nib - 16 : nib;
        ASSERT_EQ(t[k], static_cast<uint8_t>(want)) << "table K=" << K << " k=" << k;
        ASSERT_EQ(v[k], t[k]) << "avx2 K=" << K << " k=" << k << " signed=" << is_signed;
      }
    }
}

}  // namespace
}  // namespace tensorslim
