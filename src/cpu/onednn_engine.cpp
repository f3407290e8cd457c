#include "onednn_engine.h"

namespace tensorslim {
namespace cpu {

OneDnn& onednn() {
  static OneDnn e;  // created on first use: importing tensorslim starts no oneDNN runtime
  return e;
}

}  // namespace cpu
}  // namespace tensorslim
