// Activation codes are rne(v / s) with v / s rounded as the scalar references divide. A vector
// divide costs ~10 multiplies, so the vector quantizers compute the same quotient from y = 1/s:
// q = v * y is within one ulp of v / s, r = v - q * s is exact in one FMA, and q + r * y rounds
// to v / s exactly (Markstein, IBM J. Res. Dev. 34(1), 1990) as long as r does not underflow.
// Where it can (|v / s| < 2^-40) both quotients round to the same code. Checked bit for bit
// against division on 3.2e8 pairs incl. near-ties (tests/cpp/test_gemm_int8.cpp checks codes).
#pragma once

namespace tensorslim {
namespace cpu {

// Scales whose reciprocal is a normal float far from overflow: there the identity holds.
inline bool reciprocal_division_exact(float scale) { return scale >= 0x1p-64f && scale <= 0x1p64f; }

// |q| at and above which the correction is skipped: the code clamps anyway, and q * s could be
// Inf there (v near FLT_MAX), which would make the correction NaN.
constexpr float kReciprocalDivisionLimit = 0x1p30f;

}  // namespace cpu
}  // namespace tensorslim
