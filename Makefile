# hyzo: the two front-door commands are `make demo` and `make test`.
# Every set-up step lives here: CI runs `make test` on a clean clone, with no GPU.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
VENV := .venv
PY := $(VENV)/bin/python
# The CUDA 13.0 compiler as pinned wheels (the H100 driver is CUDA 13.0: newer PTX would not load).
# cuobjdump/nvdisasm (scripts/sass-budget): no 13.0.x on PyPI; 13.2.51 is the oldest (a disassembler).
# nvidia-curand: curand_kernel.h for the GPU kit's cuRAND check (the pin torch 2.12 uses too).
CUDA_WHEELS := nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
	nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88 \
	nvidia-cuda-cuobjdump==13.2.51 nvidia-cuda-nvdisasm==13.2.51 \
	nvidia-curand==10.4.0.35
# libclang for bindgen (tests/abi.rs regenerates src/backend/cuda/abi_generated.rs from
# kernels/hyzo_params.h and compares): the checked-in file comes from this exact version.
CLANG_WHEELS := libclang==18.1.1
# Points build.rs at the wheels' nvcc (a no-op when they are absent).
CUDA_ENV = eval "$$(scripts/cuda-env)"
DEMO_ARGS ?=

.PHONY: demo test setup build lint test-rust check-kernels test-ffi test-python demo-quick \
	bench bench-compare gpu-pack gpu-rehearse clean

# The main job: the paper's unlearning-robustness experiment in miniature (CPU, minutes).
demo: setup
	scripts/test-python --setup-only
	$(PY) -m hyzo.demo $(DEMO_ARGS)

setup: $(VENV)/.cuda-stamp $(VENV)/.clang-stamp

$(VENV)/.cuda-stamp:
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check --no-deps $(CUDA_WHEELS)
	touch $@

# Its own stamp, so that a .venv made before it was added gets it too.
$(VENV)/.clang-stamp: $(VENV)/.cuda-stamp
	$(VENV)/bin/pip install -q --disable-pip-version-check --no-deps $(CLANG_WHEELS)
	touch $@

build: setup
	$(CUDA_ENV); cargo build --release

lint: setup
	cargo fmt --all -- --check
	$(CUDA_ENV); cargo clippy --release --all-targets -- -D warnings

# The NVRTC test (minutes: every kernel for two architectures) runs once, in check-kernels.
# HYZO_REQUIRE_LIBCLANG / _CXX: tests/abi.rs / device_mirror.rs fail, rather than skip, without
# libclang / a C++ compiler.
# Without a GPU the CUDA tests (gpu_parity, ffi_cuda, device_counters) run on the emulated
# device, which records each kernel it executes in target/emulator-coverage.txt;
# kernel_coverage then fails if any kernel the backend can launch never ran.
test-rust: setup
	rm -f target/emulator-coverage.txt
	$(CUDA_ENV); HYZO_EMULATOR_COVERAGE=$(CURDIR)/target/emulator-coverage.txt \
		HYZO_REQUIRE_LIBCLANG=1 HYZO_REQUIRE_CXX=1 cargo test --release -- \
		--skip embedded_source_compiles_to_ptx_with_nvrtc \
		--skip every_launched_kernel_was_executed
	# With a GPU the CUDA tests above ran on it and recorded nothing: they run once more on
	# the emulated device (so on both), for the coverage check below.
	$(CUDA_ENV); [ -s target/emulator-coverage.txt ] || HYZO_CUDA_EMULATOR=1 \
		HYZO_EMULATOR_COVERAGE=$(CURDIR)/target/emulator-coverage.txt cargo test --release \
		--test gpu_parity --test ffi_cuda --test device_counters
	$(CUDA_ENV); HYZO_EMULATOR_COVERAGE=$(CURDIR)/target/emulator-coverage.txt \
		cargo test --release --test kernel_coverage -- --nocapture
	# A saved state over 4 GiB (skips, saying so, without 7 GiB of memory and 10 GiB of disk).
	$(CUDA_ENV); cargo test --release --test big_state -- --ignored --nocapture

# Every kernel for every architecture (warnings and spills are errors), and the NVRTC path;
# the parity tests once more on the emulated device under AddressSanitizer (memory errors).
check-kernels: setup
	scripts/check-kernels
	$(CUDA_ENV); scripts/sass-budget
	scripts/test-emulator-asan

# The C ABI: header, property tests, C and C++ examples (CMake, pkg-config, valgrind).
test-ffi: build
	scripts/test-ffi

# The Python package: pytest, and the 2-process distributed example.
test-python: build
	scripts/test-python

# The manylinux wheel, libhyzo.so and its kernels inside: dist/hyzo-*.whl (pip install without
# cargo). scripts/test-python builds it and installs it in a fresh venv.
.PHONY: wheel
wheel: setup
	scripts/build-wheel

demo-quick: test-python
	$(PY) -m hyzo.demo --quick --out out/demo-quick

test: lint test-rust check-kernels test-ffi test-python demo-quick gpu-rehearse
	@echo "make test: all checks passed"

# Benchmarks (not tests): criterion suites, and the side-by-side comparison with PyTorch.
bench: setup
	$(CUDA_ENV); cargo bench --bench cpu

bench-compare: setup
	scripts/test-python --setup-only
	$(PY) benches/compare/compare.py --device cpu --json out/compare-cpu.json

# The device check kit (.gpu-kit/), for a machine with a GPU: see scripts/gpu-check.
gpu-pack: setup
	scripts/gpu-pack

# The kit rehearsed here, without a GPU, as the lent machine runs it (no GPU: exit 2; a hung
# step killed within the deadline; a cut run keeps its files): see scripts/gpu-rehearse.
gpu-rehearse: test-python
	scripts/gpu-rehearse

clean:
	cargo clean
	rm -rf $(VENV) out .gpu-kit
