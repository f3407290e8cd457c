#!/usr/bin/env bash
# Sanitizer run (make test-asan): the core, the C++ tests and the Python module built with
# AddressSanitizer + UndefinedBehaviorSanitizer in build-asan/, then
#  1. ctest there (both ISA passes, as in make test), and
#  2. the pytest files that call the kernels, importing the instrumented _C (ASan's runtime
#     preloaded, since python itself is not instrumented).
# Any sanitizer report fails the run (halt_on_error, no UBSan recovery).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
BUILD=build-asan
SAN="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined"

cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DTENSORSLIM_BUILD_TESTS=ON -DTENSORSLIM_CUDA=OFF \
  -DCMAKE_CXX_FLAGS="$SAN" -DCMAKE_SHARED_LINKER_FLAGS="$SAN" -DCMAKE_EXE_LINKER_FLAGS="$SAN" \
  -DPython_EXECUTABLE="$PWD/$PY" -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" >/dev/null
cmake --build "$BUILD" -j "$(nproc)"

# oneDNN, torch and python are not instrumented: leak checks would report their caches.
export ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:abort_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
.venv/bin/ctest --test-dir "$BUILD" -j "$(nproc)" --output-on-failure

# A package directory whose _C is the instrumented one.
source tests/package_dir.sh
source tests/kernel_pytest_files.sh
package_dir "$BUILD"
# ASan's dlopen interceptor makes dlopen's caller look like libasan, so the SYCL runtime's
# dlopen("libOpenCL.so.1") no longer sees the RPATH that finds it: name the directory here.
LD_LIBRARY_PATH="$PWD/.venv/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)" \
PYTHONPATH="$PWD/$PKG" "$PY" -m pytest -q -p no:cacheprovider -m "not slow" \
  "${KERNEL_PYTEST_FILES[@]}" tests/python/test_sanitized_import.py
