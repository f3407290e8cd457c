// The oneDNN entry points in a build without oneDNN (ARM: no onednn wheel on PyPI; the
// standalone CUDA build; TENSORSLIM_ONEDNN=OFF): oneDNN is never usable, so every caller
// takes its own kernels or the reference (each checks onednn_usable() or these answers
// first, as in a forked child of a oneDNN build).
#include <string>

#include "onednn_usable.h"
#include "tensorslim/conv_int8.h"
#include "tensorslim/gemm.h"
#include "tensorslim/gemm_int8.h"
#include "tensorslim/status.h"

namespace tensorslim {
namespace cpu {

bool onednn_usable() { return false; }

void sgemm_nt_onednn(int64_t, int64_t, int64_t, const float*, int64_t, const float*, int64_t, float*,
                     int64_t) {
  throw RuntimeError("linear_lowbit: this build has no oneDNN");
}

bool linear_weight_only_onednn(const TensorView&, const TensorView&, const TensorView&,
                               const TensorView*, const TensorView*, Format, int64_t,
                               const TensorView&) {
  return false;
}

bool linear_int8_onednn(const TensorView&, const TensorView&, int32_t, const TensorView&,
                        const TensorView&, const TensorView*, const TensorView&, const TensorView*) {
  return false;
}

std::string linear_int8_onednn_impl(const TensorView&, const TensorView&, int32_t, const TensorView&,
                                    const TensorView&, const TensorView*, const TensorView&,
                                    const TensorView*) {
  return std::string();
}

int64_t linear_int8_packed_bytes_onednn(int64_t, int64_t) { return 0; }

bool linear_int8_packing_pays_onednn() { return false; }

bool onednn_int8_uses_amx() { return false; }

bool onednn_weight_only_uses_amx() { return false; }

void linear_int8_pack_onednn(const TensorView&, const TensorView&) {
  throw ValueError("linear_int8_pack: this build has no oneDNN");
}

}  // namespace cpu

// The INT8 convolution is oneDNN's alone: without it Python runs the exact reference
// (ops/conv_int8.py), as it does where these say "no kernel".
std::string conv_int8_impl(const TensorView&, const TensorView&, const TensorView&,
                           const ConvInt8Geometry&) {
  return std::string();
}

int64_t conv_int8_packed_bytes(const TensorView&, const TensorView&, const TensorView&,
                               const ConvInt8Geometry&) {
  return 0;
}

void conv_int8_pack(const TensorView&, const TensorView&, const TensorView&, const ConvInt8Geometry&,
                    const TensorView&) {
  throw ValueError("conv_int8_pack: this build has no oneDNN");
}

bool conv_int8_run(const TensorView&, const TensorView&, const TensorView&, const TensorView&,
                   const TensorView*, float, int32_t, const TensorView&, const ConvInt8Geometry&,
                   const TensorView*) {
  return false;
}

}  // namespace tensorslim
