#!/usr/bin/env bash
# The GPU check in one call, for a lent GPU machine that has the CUDA toolkit but neither
# GoogleTest nor this project's Python build: builds the standalone CUDA binaries
# (build_standalone.sh), runs the CUDA GoogleTests (bit-exact against the CPU reference)
# and benchmarks/bench_cuda.py, and writes every log under $OUT.
#
#   OUT=dir GTEST_SRC=path/to/googletest tests/cuda/device_check.sh
# GTEST_SRC: GoogleTest's source tree (Debian's /usr/src/googletest/googletest, carried
# along), compiled here so no prebuilt library has to match this machine's compiler.
# CUDA_ARCH defaults to the visible GPU's compute capability, to keep the build short.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-build/cuda-check}
mkdir -p "$OUT"
status=0

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem \
  --format=csv 2>&1 | tee "$OUT/gpu.txt"
if [ -z "${CUDA_ARCH:-}" ]; then
  CUDA_ARCH=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d '.')
  export CUDA_ARCH=${CUDA_ARCH:-90}
fi

if [ -n "${GTEST_SRC:-}" ]; then
  gdir=build/gtest
  mkdir -p "$gdir"
  g++ -std=c++17 -O2 -I"$GTEST_SRC/include" -I"$GTEST_SRC" -c "$GTEST_SRC/src/gtest-all.cc" -o "$gdir/gtest-all.o" &&
    g++ -std=c++17 -O2 -I"$GTEST_SRC/include" -c "$GTEST_SRC/src/gtest_main.cc" -o "$gdir/gtest_main.o" &&
    ar rcs "$gdir/libgtest.a" "$gdir/gtest-all.o" && ar rcs "$gdir/libgtest_main.a" "$gdir/gtest_main.o" ||
    { echo "GoogleTest build failed"; exit 1; }
  export GTEST_INCLUDE="$GTEST_SRC/include" GTEST_LIB="$PWD/$gdir"
fi

bin=build/cuda-standalone
JOBS=${JOBS:-$(nproc)} tests/cuda/build_standalone.sh "$bin" > "$OUT/build.log" 2>&1 ||
  { tail -n 60 "$OUT/build.log"; echo "standalone build failed"; exit 1; }
tail -n 2 "$OUT/build.log"

"$bin/tensorslim_cuda_tests" --gtest_output="xml:$OUT/tests.xml" > "$OUT/tests.log" 2>&1 || status=1
grep -E '^\[  (FAILED|PASSED) |^\[==========\]|Failure|error' "$OUT/tests.log" | head -n 80

python3 benchmarks/bench_cuda.py --binary "$bin/tensorslim_cuda_bench" 2>&1 | tee "$OUT/bench.log" || status=1
exit $status
