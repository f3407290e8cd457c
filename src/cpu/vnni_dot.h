// vpdpbusd (AVX-512 VNNI) for the kernels' inner loops.
//
// GCC (12) compiles _mm512_dpbusd_epi32 on an accumulator held in an array as a copy of the
// accumulator into a scratch register, the product there and a copy back: two zmm moves per
// vpdpbusd and spills around them (the INT8 panel loop at 8 tokens x 2 panels: 16 products,
// 32 moves and 2 stack stores per step). Written as inline asm the accumulator stays where it
// is. Clang compiles the intrinsic without the copies, so it keeps it.
#pragma once

#include <immintrin.h>

#include "tensorslim/quantize.h"

namespace tensorslim {
namespace cpu {

// acc + per dword lane the sum of the four products of u's unsigned and s's signed bytes.
__attribute__((target("avx512vnni"), always_inline)) inline __m512i dpbusd(__m512i acc, __m512i u, __m512i s) {
#if defined(__GNUC__) && !defined(__clang__)
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u), "vm"(s));
  return acc;
#else
  return _mm512_dpbusd_epi32(acc, u, s);
#endif
}

// The 256-bit forms for the AVX2 kernels (cpu::avx2_vnni), as the policy type of a kernel
// template so one body serves both; inline asm needs no target attribute, so a file compiled
// with -mavx2 holds them. The assembler writes plain vpdpbusd as EVEX (AVX512-VNNI with VL:
// runs on AVX-512 CPUs, not on AVX-VNNI ones); "{vex}" asks for the AVX-VNNI encoding, which
// only registers 0-15 have (the "x" constraint). Same operation, same bits.
struct VnniEvex256 {
  static __m256i dpbusd(__m256i acc, __m256i u, __m256i s) {
    asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u), "vm"(s));
    return acc;
  }
};
struct VnniVex256 {
  static __m256i dpbusd(__m256i acc, __m256i u, __m256i s) {
    asm("%{vex%} vpdpbusd %2, %1, %0" : "+x"(acc) : "x"(u), "xm"(s));
    return acc;
  }
};
// No vpdpbusd: the kernel's own vpmaddubsw + vpmaddwd products.
struct NoVnni {};

// f(VnniVex256{}), f(VnniEvex256{}) or f(NoVnni{}) by the form the AVX2 kernels use
// (cpu::avx2_vnni): each AVX2 kernel's dispatch, its body a template on that type.
template <class F>
void with_vnni256(AvxVnni form, F&& f) {
  switch (form) {
    case AvxVnni::kVex: return f(VnniVex256{});
    case AvxVnni::kEvex: return f(VnniEvex256{});
    default: return f(NoVnni{});
  }
}

}  // namespace cpu
}  // namespace tensorslim
