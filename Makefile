# hyzo: the two front-door commands are `make demo` and `make test`.
# Every set-up step lives here: CI runs `make test` on a clean clone, with no GPU.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
VENV := .venv
PY := $(VENV)/bin/python
# The CUDA 13.0 compiler as pinned wheels (the H100 driver is CUDA 13.0: newer PTX would not load).
CUDA_WHEELS := nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
	nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88
# Environment that points build.rs at the wheels' nvcc (empty when they are absent).
CUDA_ENV = eval "$$(scripts/cuda-env)"

.PHONY: demo test setup venv build lint test-rust check-kernels test-ffi test-python bench clean

demo: setup
	$(CUDA_ENV); cargo run --release --example quickstart

setup: $(VENV)/.cuda-stamp

$(VENV)/.cuda-stamp:
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check --no-deps $(CUDA_WHEELS)
	touch $@

build: setup
	$(CUDA_ENV); cargo build --release

lint: setup
	cargo fmt --all -- --check
	$(CUDA_ENV); cargo clippy --release --all-targets -- -D warnings

test-rust: setup
	$(CUDA_ENV); cargo test --release

check-kernels: setup
	scripts/check-kernels

test-ffi: build
	scripts/test-ffi

test-python: build
	scripts/test-python

test: lint test-rust check-kernels test-ffi test-python
	@echo "make test: all checks passed"

bench: setup
	$(CUDA_ENV); cargo bench --bench cpu

clean:
	cargo clean
	rm -rf $(VENV)
