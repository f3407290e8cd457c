// Which oneDNN int8 kernels are exact (onednn_int8_exact.h): a test on oneDNN's
// implementation name, compiled with or without oneDNN.
#include "onednn_int8_exact.h"

namespace tensorslim {
namespace cpu {

bool onednn_int8_is_exact(const std::string& impl) {
  for (const char* isa : {"vnni", "amx", "avx10", "avx512_core_bf16", "avx512_core_fp16"})
    if (impl.find(isa) != std::string::npos) return true;
  return false;
}

}  // namespace cpu
}  // namespace tensorslim
