// Errors of the C++ core. The bindings turn ValueError/TypeError into the
// Python exceptions of the same name, so a message here is what the user reads.
#pragma once

#include <stdexcept>
#include <string>

namespace tensorslim {

// A bad argument value: wrong shape, group size, NaN/Inf in the data.
class ValueError : public std::invalid_argument {
 public:
  explicit ValueError(const std::string& msg) : std::invalid_argument(msg) {}
};

// A bad argument kind: unsupported dtype or device.
class TypeError : public std::invalid_argument {
 public:
  explicit TypeError(const std::string& msg) : std::invalid_argument(msg) {}
};

// Something the environment could not do (a CUDA launch, a oneDNN primitive).
class RuntimeError : public std::runtime_error {
 public:
  explicit RuntimeError(const std::string& msg) : std::runtime_error(msg) {}
};

#define TS_CHECK_VALUE(cond, msg)                  \
  do {                                             \
    if (!(cond)) throw ::tensorslim::ValueError(msg); \
  } while (0)

#define TS_CHECK_TYPE(cond, msg)                  \
  do {                                            \
    if (!(cond)) throw ::tensorslim::TypeError(msg); \
  } while (0)

}  // namespace tensorslim
