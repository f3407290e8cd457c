#!/usr/bin/env bash
# Builds tensorslim_cuda_tests and tensorslim_cuda_bench with nothing but the CUDA
# toolkit, a C++ compiler and GoogleTest: no Python, torch, CMake or oneDNN (the core is
# compiled from the src/cpu files that need neither oneDNN nor Eigen; src/cpu/onednn_absent.cpp
# stands in). For GPU machines where `make build` cannot run. cuBLAS is used when its
# header and library are found (the benchmark's baseline and the kernels' M > 8 path).
#
#   tests/cuda/build_standalone.sh [OUT_DIR]          (default build/cuda-standalone)
# Environment: NVCC (default: /usr/local/cuda/bin/nvcc, else nvcc on PATH), CUDA_ARCH
# (default "80 90"), GTEST_INCLUDE / GTEST_LIB (directories; default: the system's),
# CUBLAS_INCLUDE / CUBLAS_LIB (directories; default: searched), JOBS.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-build/cuda-standalone}
if [ -z "${NVCC:-}" ]; then
  if [ -x /usr/local/cuda/bin/nvcc ]; then NVCC=/usr/local/cuda/bin/nvcc; else NVCC=$(command -v nvcc); fi
fi
CUDA_HOME=${CUDA_HOME:-$(cd "$(dirname "$(readlink -f "$NVCC")")/.." && pwd)}
ARCH=${CUDA_ARCH:-80 90}  # SASS for each, plus PTX of the last for newer GPUs
GENCODE=""
for a in $ARCH; do GENCODE+=" -gencode arch=compute_$a,code=sm_$a"; done
GENCODE+=" -gencode arch=compute_${a},code=compute_${a}"
JOBS=${JOBS:-$(nproc)}
mkdir -p "$OUT/obj"

# cuBLAS: the toolkit's, or the nvidia-cublas wheel's (pip installs it beside torch).
find_dir() {  # first directory among $2.. holding file $1
  local f=$1; shift
  for d in "$@"; do [ -e "$d/$f" ] && { echo "$d"; return 0; }; done
  return 0
}
wheel_dirs=$(python3 - 2>/dev/null <<'PY' || true
import importlib.util
for name in ("nvidia.cu13", "nvidia.cublas"):
    try:
        spec = importlib.util.find_spec(name)
    except ImportError:
        continue
    for path in (spec.submodule_search_locations or []) if spec else []:
        print(path)
PY
)
CUBLAS_INCLUDE=${CUBLAS_INCLUDE:-$(find_dir cublas_v2.h "$CUDA_HOME/include" \
  $(for w in $wheel_dirs; do echo "$w/include"; done) /usr/include)}
CUBLAS_LIB=${CUBLAS_LIB:-$(find_dir libcublas.so "$CUDA_HOME/lib64" \
  $(for w in $wheel_dirs; do echo "$w/lib"; done) /usr/lib/x86_64-linux-gnu)}
if [ -z "$CUBLAS_LIB" ] && [ -n "$CUBLAS_INCLUDE" ]; then  # wheels ship libcublas.so.N only
  CUBLAS_LIB=$(find_dir libcublas.so.13 "$CUDA_HOME/lib64" \
    $(for w in $wheel_dirs; do echo "$w/lib"; done) || true)
fi
CUBLAS_FLAGS=() CUBLAS_LINK=()
if [ -n "$CUBLAS_INCLUDE" ] && [ -n "$CUBLAS_LIB" ]; then
  CUBLAS_FLAGS=(-DTENSORSLIM_HAVE_CUBLAS -I"$CUBLAS_INCLUDE")
  lib=$(ls "$CUBLAS_LIB"/libcublas.so "$CUBLAS_LIB"/libcublas.so.* 2>/dev/null | head -n 1)
  CUBLAS_LINK=("$lib" -Wl,-rpath,"$CUBLAS_LIB")
  echo "cuBLAS: $CUBLAS_INCLUDE, $lib"
else
  echo "cuBLAS: not found (baseline columns print n/a)"
fi

DEFS=(-DTENSORSLIM_HAVE_AVX2 -DTENSORSLIM_HAVE_AVX512 -DTENSORSLIM_WITH_CUDA)
CXXFLAGS=(-std=c++17 -O2 -fPIC -ffp-contract=off -Iinclude -Isrc/cpu -I"$CUDA_HOME/include" "${DEFS[@]}")
GTEST_FLAGS=() GTEST_LINK=(-lgtest -lgtest_main)
[ -n "${GTEST_INCLUDE:-}" ] && GTEST_FLAGS=(-I"$GTEST_INCLUDE")
[ -n "${GTEST_LIB:-}" ] && GTEST_LINK=("$GTEST_LIB/libgtest_main.a" "$GTEST_LIB/libgtest.a")

compile() {  # source -> object, flags by kind
  local src=$1 obj="$OUT/obj/$(echo "$1" | tr / _).o"
  case "$src" in
    *.cu) "$NVCC" -std=c++17 -O3 --fmad=false $GENCODE -Iinclude "${DEFS[@]}" \
            "${CUBLAS_FLAGS[@]}" -c "$src" -o "$obj" ;;
    *_avx512.cpp) g++ "${CXXFLAGS[@]}" -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma -c "$src" -o "$obj" ;;
    *_avx2.cpp) g++ "${CXXFLAGS[@]}" -mavx2 -mfma -c "$src" -o "$obj" ;;
    tests/*) g++ "${CXXFLAGS[@]}" -Itests/cpp "${GTEST_FLAGS[@]}" "${CUBLAS_FLAGS[@]}" -c "$src" -o "$obj" ;;
    benchmarks/*) g++ "${CXXFLAGS[@]}" "${CUBLAS_FLAGS[@]}" -c "$src" -o "$obj" ;;
    *) g++ "${CXXFLAGS[@]}" -c "$src" -o "$obj" ;;
  esac
  echo "$obj"
}
export -f compile
export OUT NVCC GENCODE
# The core without the files that need oneDNN or Eigen (none of them serves the GPU path),
# directly or through one of our headers that does.
needs='#include <(oneapi/dnnl|Eigen)'
while :; do
  heavy=$(grep -l -E "$needs" src/cpu/*.h | xargs -r -n1 basename | paste -sd'|' -)
  next='#include <(oneapi/dnnl|Eigen)'${heavy:+"|#include \"($heavy)\""}
  [ "$next" = "$needs" ] && break
  needs=$next
done
# (x86_kernels_absent.cpp stands in for the x86 kernels, which this build compiles.)
core_sources=$(grep -L -E "$needs" src/cpu/*.cpp | grep -v x86_kernels_absent.cpp)
sources=$(echo "$core_sources"; ls kernels/*.cu;
          echo tests/cuda/test_cuda_kernels.cpp benchmarks/cuda_bench.cpp)
# Arrays do not cross into xargs' shells: pass them as strings and re-split there.
export DEFS_S="${DEFS[*]}" CXXFLAGS_S="${CXXFLAGS[*]}" CUBLAS_FLAGS_S="${CUBLAS_FLAGS[*]}" \
       GTEST_FLAGS_S="${GTEST_FLAGS[*]}"
printf '%s\n' $sources | xargs -P "$JOBS" -I{} bash -c \
  'set -e; DEFS=($DEFS_S); CXXFLAGS=($CXXFLAGS_S); CUBLAS_FLAGS=($CUBLAS_FLAGS_S); GTEST_FLAGS=($GTEST_FLAGS_S); compile {} >/dev/null'

o() { echo "$OUT/obj/$(echo "$1" | tr / _).o"; }
core=$(for s in $core_sources kernels/*.cu; do o "$s"; done)
rm -f "$OUT/libts_standalone.a" && ar rcs "$OUT/libts_standalone.a" $core
CUDA_LINK=("$CUDA_HOME/lib64/libcudart_static.a" -lpthread -ldl -lrt)
g++ -o "$OUT/tensorslim_cuda_tests" "$(o tests/cuda/test_cuda_kernels.cpp)" \
  "$OUT/libts_standalone.a" "${GTEST_LINK[@]}" "${CUBLAS_LINK[@]}" "${CUDA_LINK[@]}" -pthread
g++ -o "$OUT/tensorslim_cuda_bench" "$(o benchmarks/cuda_bench.cpp)" \
  "$OUT/libts_standalone.a" "${CUBLAS_LINK[@]}" "${CUDA_LINK[@]}" -pthread
echo "built $OUT/tensorslim_cuda_tests $OUT/tensorslim_cuda_bench"
