#!/usr/bin/env bash
# The core and its C++ tests cross-compiled for aarch64 (64-bit ARM Linux: scalar kernels, no
# oneDNN, whose wheels are x86-64 only) and run under qemu-user: what an ARM machine builds
# and runs, checked on an x86-64 one. (make test-portable; CI runs it.)
set -euo pipefail
cd "$(dirname "$0")/../.."
BUILD=build-aarch64
CXX=aarch64-linux-gnu-g++-12 CC=aarch64-linux-gnu-gcc-12
if ! command -v "$CXX" >/dev/null || ! command -v qemu-aarch64 >/dev/null; then
  apt-get update -q && apt-get install -y -q --no-install-recommends g++-12-aarch64-linux-gnu qemu-user
fi
CROSS=(-G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_SYSTEM_NAME=Linux -DCMAKE_SYSTEM_PROCESSOR=aarch64
       -DCMAKE_CXX_COMPILER="$CXX" -DCMAKE_C_COMPILER="$CC"
       -DCMAKE_CROSSCOMPILING_EMULATOR="qemu-aarch64;-L;/usr/aarch64-linux-gnu")
# GoogleTest for aarch64 from the sources Debian's libgtest-dev ships.
cmake -S /usr/src/googletest -B "$BUILD/gtest" "${CROSS[@]}" -DBUILD_GMOCK=OFF \
  -DCMAKE_INSTALL_PREFIX="$PWD/$BUILD/gtest-install" >/dev/null
cmake --build "$BUILD/gtest" --target install >/dev/null
cmake -S . -B "$BUILD" "${CROSS[@]}" -DTENSORSLIM_PYTHON_MODULE=OFF -DTENSORSLIM_BUILD_TESTS=ON \
  -DTENSORSLIM_ONEDNN=OFF -DTENSORSLIM_CUDA=OFF -DGTest_DIR="$PWD/$BUILD/gtest-install/lib/cmake/GTest" \
  -DEigen3_DIR=/usr/share/eigen3/cmake >/dev/null
cmake --build "$BUILD" -j "$(nproc)"
readelf -h "$BUILD/tensorslim_tests" | grep -q AArch64  # built for the target, not this machine
ctest --test-dir "$BUILD" -j "$(nproc)" --output-on-failure
