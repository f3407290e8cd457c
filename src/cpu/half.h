// fp16 / bf16 <-> fp32 conversions in plain C++ (exact widening, round-to-nearest-even
// narrowing) so the scalar reference needs no ISA extension.
#pragma once

#include <cstdint>
#include <cstring>

namespace tensorslim {
namespace cpu {

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

inline uint16_t float_to_bf16(float f) {
  uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float f16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t man = h & 0x3ffu;
  if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (man << 13));
  if (exp == 0) {  // zero or subnormal: man * 2^-24
    float v = static_cast<float>(man) * bits_to_float(0x33800000u);
    return sign ? -v : v;
  }
  return bits_to_float(sign | ((exp + 112) << 23) | (man << 13));
}

inline uint16_t float_to_f16(float f) {
  uint32_t u = float_to_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  u &= 0x7fffffffu;
  if (u > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);
  if (u >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to >= 65520: Inf
  if (u < 0x38800000u) {  // result is subnormal in fp16: let fp32 addition round it
    float v = bits_to_float(u) + 0.5f;  // 0.5 = 2^-1 aligns the fp16 subnormal ulp 2^-24
    return static_cast<uint16_t>(sign | (float_to_bits(v) - 0x3f000000u));
  }
  u += 0xfffu + ((u >> 13) & 1u) - (112u << 23);
  return static_cast<uint16_t>(sign | (u >> 13));
}

}  // namespace cpu
}  // namespace tensorslim
