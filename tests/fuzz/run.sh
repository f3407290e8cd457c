#!/usr/bin/env bash
# Builds the libFuzzer targets with clang (core instrumented: coverage + ASan + UBSan) in
# build-fuzz/ and runs each for RUNS inputs (default 1e6; make fuzz-smoke runs a short pass).
# Inputs that crash are written to build-fuzz/crashes/ and fail the run.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
RUNS=${RUNS:-1000000}
BUILD=build-fuzz
SAN="-fsanitize=fuzzer-no-link,address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer"
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++ -DTENSORSLIM_CUDA=OFF \
  -DTENSORSLIM_BUILD_FUZZERS=ON -DCMAKE_CXX_FLAGS="$SAN" \
  -DCMAKE_EXE_LINKER_FLAGS="-fsanitize=address,undefined" -DCMAKE_SHARED_LINKER_FLAGS="-fsanitize=address,undefined" \
  -DPython_EXECUTABLE="$PWD/$PY" -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" >/dev/null
cmake --build "$BUILD" -j "$(nproc)" --target fuzz_formats fuzz_linear_args fuzz_sparse_args
export ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=print_stacktrace=1 TENSORSLIM_NUM_THREADS=1
mkdir -p "$BUILD/crashes"
# fuzz_linear_args three times: as this CPU runs it, as an AVX2 CPU without VNNI does (our
# kernels and oneDNN capped: the INT8 packed copy is then our AVX2 panels), and as one with
# AVX-VNNI does (the AVX2 kernels on vpdpbusd, where this CPU has a form of it; else the same
# as the pass before). fuzz_sparse_args as this CPU runs it and with AVX2 caps.
for run in fuzz_formats: fuzz_linear_args: fuzz_linear_args:0 fuzz_linear_args:1 fuzz_sparse_args: fuzz_sparse_args:0; do
  target=${run%%:*} vnni=${run#*:}
  mkdir -p "$BUILD/corpus/$target"
  echo "== $target${vnni:+ (AVX2 caps, TENSORSLIM_AVX2_VNNI=$vnni)}: $RUNS inputs"
  env ${vnni:+TENSORSLIM_ISA=avx2 TENSORSLIM_AVX2_VNNI=$vnni ONEDNN_MAX_CPU_ISA=AVX2} \
    "$BUILD/$target" -runs="$RUNS" -max_len=4096 -print_final_stats=1 \
    -artifact_prefix="$BUILD/crashes/$target-" "$BUILD/corpus/$target" 2>&1 |
    grep -E "^(#[0-9]+.*DONE|stat::number_of_executed_units|stat::peak_rss_mb|==[0-9]+==ERROR|SUMMARY)|runtime error" || true
  if ls "$BUILD/crashes/$target-"* >/dev/null 2>&1; then
    echo "$target: crashing inputs in $BUILD/crashes/"; exit 1
  fi
done
