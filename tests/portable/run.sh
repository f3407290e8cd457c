#!/usr/bin/env bash
# The portable build (make test-portable): what a CPU other than x86-64 runs, checked here.
#  1. build-portable/: this machine's compiler with the x86 kernels and oneDNN left out
#     (TENSORSLIM_X86_KERNELS=OFF, TENSORSLIM_ONEDNN=OFF): every kernel's scalar path and
#     the fallbacks of every oneDNN-backed one. ctest there, then the pytest files that call
#     the kernels, importing that build's _C.
#  2. cross_check.sh: the core and C++ tests built for aarch64 and run under qemu-user.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
case $PY in /*) ;; *) PY="$PWD/$PY" ;; esac
BUILD=build-portable

cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DTENSORSLIM_BUILD_TESTS=ON \
  -DTENSORSLIM_CUDA=OFF -DTENSORSLIM_ONEDNN=OFF -DTENSORSLIM_X86_KERNELS=OFF \
  -DPython_EXECUTABLE="$PY" -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" >/dev/null
cmake --build "$BUILD" -j "$(nproc)"
.venv/bin/ctest --test-dir "$BUILD" -j "$(nproc)" --output-on-failure

# A package directory whose _C is the portable one.
source tests/package_dir.sh
package_dir "$BUILD"
PYTHONPATH="$PWD/$PKG" "$PY" -c 'import tensorslim as ts
assert ts._C.best_isa() == "scalar" and not ts._C.built_with_onednn(), "not the portable build"'
PYTHONPATH="$PWD/$PKG" "$PY" -m pytest -q -p no:cacheprovider -m "not slow" \
  tests/python/test_ops.py tests/python/test_aliased_modules.py tests/python/test_weight_only.py \
  tests/python/test_w8a8.py tests/python/test_lowbit_linear.py tests/python/test_formats_lowbit.py \
  tests/python/test_binary.py tests/python/test_w4a8.py tests/python/test_sparse_ops.py \
  tests/python/test_int8_conv.py tests/python/test_autograd_frozen.py tests/python/test_gptq.py \
  tests/python/test_awq.py tests/python/test_prune_unstructured.py tests/python/test_distill_kd.py \
  tests/python/test_quantized_embedding.py tests/python/test_io.py tests/python/test_lowrank.py

bash tests/portable/cross_check.sh
