// INT4 groups decoded straight from packed bytes (int4_codes.h): each ISA's group decoder gives
// the reference's (code - zero point) * scale bit for bit, for every byte value, both signs,
// zero points 0 / 5 / 15, lengths around the vector steps (8, 32) and odd tails; and the scalar
// row unpacking gives every code.
#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <vector>

#include "int4_codes.h"
#include "test_helpers.h"

namespace tensorslim {
namespace {

int code_at(const std::vector<uint8_t>& q, int64_t k, bool is_signed) {
  const int nib = k % 2 ? q[k / 2] >> 4 : q[k / 2] & 0xF;
  return is_signed && nib >= 8 ? nib - 16 : nib;
}

TEST(Int4Codes, GroupDecodersMatchTheReferenceOnEveryIsa) {
  std::mt19937 gen(3);
  int checked = 0;
  for (cpu::Isa isa : testing::machine_isas()) {
    testing::IsaScope scope(isa);
    const cpu::Int4GroupDecoder decode = cpu::int4_group_decoder();
    if (!decode) continue;  // the scalar path unpacks rows (below)
    ++checked;
    for (int64_t n : {1, 7, 8, 9, 31, 32, 33, 64, 127, 512})
      for (bool is_signed : {false, true})
        for (int32_t zp : {0, 5, 15}) {
          if (is_signed && zp) continue;  // signed formats have no zero point
          std::vector<uint8_t> q((n + 1) / 2 + 1);  // one byte past the group: must not be read into out
          for (size_t i = 0; i < q.size(); ++i) q[i] = static_cast<uint8_t>(n == 512 ? i : gen());
          const float scale = 0.0371f;
          std::vector<float> out(n + 1, -1.0f);
          decode(q.data(), n, scale, zp, is_signed, out.data());
          for (int64_t k = 0; k < n; ++k) {
            const float want = static_cast<float>(code_at(q, k, is_signed) - zp) * scale;
            ASSERT_EQ(std::memcmp(&out[k], &want, 4), 0)
                << cpu::isa_name(isa) << " n=" << n << " k=" << k << " signed=" << is_signed << " zp=" << zp;
          }
          ASSERT_EQ(out[n], -1.0f) << "wrote past the group, " << cpu::isa_name(isa) << " n=" << n;
        }
  }
  if (cpu::best_isa() >= cpu::Isa::kAVX2) EXPECT_GT(checked, 0);
}

TEST(Int4Codes, ScalarRowsGiveEveryCode) {
  for (int64_t K : {1, 2, 63, 512, 1001})
    for (bool is_signed : {false, true}) {
      std::vector<uint8_t> q((K + 1) / 2);
      for (size_t i = 0; i < q.size(); ++i) q[i] = static_cast<uint8_t>(i * 37);  // every byte value
      std::vector<uint8_t> codes;
      const uint8_t* c = cpu::row_codes(q.data(), K, 4, is_signed, codes);
      for (int64_t k = 0; k < K; ++k)
        ASSERT_EQ(c[k], static_cast<uint8_t>(code_at(q, k, is_signed))) << "K=" << K << " k=" << k;
    }
}

}  // namespace
}  // namespace tensorslim
