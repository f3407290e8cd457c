#!/usr/bin/env bash
# The kernel-calling pytest files on the AVX2 kernels with vpdpbusd (AVX-VNNI's VEX form, or
# AVX512-VNNI's EVEX form standing in), oneDNN capped at AVX2 + AVX-VNNI: a CPU with AVX-512
# otherwise never runs them from Python (ctest runs both settings of every AVX2 kernel). Skipped
# where the CPU has no form of it, and where the best ISA is AVX2 with AVX-VNNI: make test's own
# pytest ran these paths there. Called by `make test-python-avx2`; PY is the venv's python.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
state=$("$PY" -c 'import tensorslim as ts; print(ts._C.best_isa(), ts._C.avx2_vnni_available(), ts._C.cpu_has_avx_vnni())' | tail -n 1)
case "$state" in
  *" False "*) echo "avx2_vnni_pass: no vpdpbusd on this CPU; skipped"; exit 0 ;;
  "avx2 True True") echo "avx2_vnni_pass: best ISA AVX2 with AVX-VNNI; make test's pytest ran these paths"; exit 0 ;;
esac
source tests/kernel_pytest_files.sh
TENSORSLIM_ISA=avx2 TENSORSLIM_AVX2_VNNI=1 ONEDNN_MAX_CPU_ISA=AVX2_VNNI \
  "$PY" -c 'import tensorslim as ts; assert ts._C.kernel_isa().startswith("avx2+"), ts._C.kernel_isa()'
TENSORSLIM_ISA=avx2 TENSORSLIM_AVX2_VNNI=1 ONEDNN_MAX_CPU_ISA=AVX2_VNNI \
  "$PY" -m pytest -q -p no:cacheprovider -m "not slow" "${KERNEL_PYTEST_FILES[@]}"
