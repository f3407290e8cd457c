// Whether oneDNN may be called in this process, without oneDNN's headers: the files that
// only choose between oneDNN and our kernels include this. Builds without oneDNN (ARM, the
// standalone CUDA build) link onednn_absent.cpp, where it is never usable.
#pragma once

#include <cstdint>

namespace tensorslim {
namespace cpu {

// False in a process forked after oneDNN started (the runtime threads its stream waits on
// were not copied by fork(), so a oneDNN call there would never return), and where oneDNN
// cannot create its CPU engine (its SYCL runtime finds no device). Every oneDNN-backed
// path checks this first and lets our own kernels run instead.
bool onednn_usable();

// Whether oneDNN's weight-decompression matmul runs AMX tiles here (bf16 activations; Sapphire
// Rapids and later), asked once. False where !onednn_usable().
bool onednn_weight_only_uses_amx();

// out[M, N] = x[M, K] * w[N, K]^T with oneDNN's sgemm (row-major, leading dimensions given).
// Only called where onednn_usable().
void sgemm_nt_onednn(int64_t M, int64_t N, int64_t K, const float* x, int64_t ldx, const float* w,
                     int64_t ldw, float* out, int64_t ldo);

}  // namespace cpu
}  // namespace tensorslim
