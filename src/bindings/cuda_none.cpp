// Built when no CUDA compiler was found: the module reports that it has no GPU kernels.
#include "views.h"

namespace tensorslim {
namespace bindings {

void register_cuda(pybind11::module_& m) { m.attr("has_cuda") = false; }

}  // namespace bindings
}  // namespace tensorslim
