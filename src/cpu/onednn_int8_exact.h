// Which oneDNN int8 kernels are exact; no oneDNN headers, so bindings and tests can ask too.
#pragma once

#include <string>

namespace tensorslim {
namespace cpu {

// Whether a oneDNN u8/s8 kernel sums 8-bit products exactly: its ISA is VNNI or above in
// oneDNN's ladder (avx2_vnni, avx512_core_vnni / _bf16 / _fp16, avx10_1_512 - AVX10 includes
// VNNI - and AMX). Below that its kernels add pairs of products in saturating int16.
bool onednn_int8_is_exact(const std::string& impl);

}  // namespace cpu
}  // namespace tensorslim
