// Spreads the low 8 bits of a movemask into 8 bytes of 0 / 1 (byte i = bit i).
#pragma once

#include <cstdint>

namespace tensorslim {
namespace cpu {

inline uint64_t spread_bits8(uint32_t bits) {
  // Byte i of x * 0x0101.. is x; keeping bit i of byte i leaves 0 or 2^i, and adding 0x7f
  // sets the byte's top bit exactly when that was non-zero (no carry between bytes).
  const uint64_t y = (uint64_t{bits & 0xffu} * 0x0101010101010101ull) & 0x8040201008040201ull;
  return ((y + 0x7f7f7f7f7f7f7f7full) >> 7) & 0x0101010101010101ull;
}

}  // namespace cpu
}  // namespace tensorslim
