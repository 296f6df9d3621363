# The two quick-start commands. Each one installs what a fresh machine lacks first:
# the build packages (scripts/deps.sh) and the models (models/fetch.sh).

MODEL := models/SmolLM2-135M-Instruct.Q4_1.gguf

.PHONY: example test test-slurm test-vulkan cuda-build vulkan-build dist dist-test dist-oci dist-cuda setup deps lint bench

# The main job, end to end: the bundled example batch on the default model.
example: deps
	@./models/fetch.sh smollm2
	cargo run --release -- --model $(MODEL) examples/rubric.jsonl -o target/rubric.results.jsonl --restart
	@echo "results: target/rubric.results.jsonl"

# The whole test suite (unit tests and the real-model integration tests, on both models).
test: setup
	cargo test --release

# The shard scripts on a real one-node Slurm cluster (needs root; installs slurm-wlm and munge).
test-slurm: deps
	./scripts/slurm-test.sh

# The CUDA build (no GPU needed): a CUDA 13 toolkit from NVIDIA's wheels (scripts/cuda-toolkit.sh),
# machine code for sm_80, sm_89, sm_90 and sm_120, the binary and its backend modules in
# target/cuda/release/. Not part of `make test`: it took 74 minutes on 2 cores.
cuda-build: deps
	./scripts/cuda-toolkit.sh
	. ./.cuda/env && cargo build --release --features cuda --target-dir target/cuda

# The Vulkan build (AMD, Intel and NVIDIA GPUs; no GPU needed to build), which `make dist` packs:
# the Vulkan packages and newer Vulkan-Hpp headers in .vulkan/ (scripts/vulkan-sdk.sh), zig's
# compilers in .zig/ (scripts/zig.sh), then the binary and its backend modules, built against
# glibc 2.28 with libc++ linked in (no OpenMP: zig has none), in
# target/vulkan/x86_64-unknown-linux-gnu/release/.
VULKAN := . ./.vulkan/env && . ./.zig/env &&
VULKAN_FLAGS := --release --no-default-features --features vulkan --target $$ZIG_TARGET \
	--target-dir target/vulkan

vulkan-build: deps
	./scripts/vulkan-sdk.sh
	./scripts/zig.sh >/dev/null
	$(VULKAN) cargo zigbuild $(VULKAN_FLAGS)

# The GPU path on Mesa's lavapipe, a Vulkan device that runs on the CPU (tests/it/vulkan.rs):
# ggml uses a CPU-type device only when GGML_VK_VISIBLE_DEVICES names it. The CPU build is made
# too: a test checks that it never takes a state the device wrote.
test-vulkan: vulkan-build
	@./models/fetch.sh smollm2
	cargo build --release
	$(VULKAN) cargo-zigbuild test $(VULKAN_FLAGS) --test it vulkan:: -- --test-threads 1

# The archives for machines with no network, in dist/ (scripts/dist.sh): the Vulkan build with
# llama.cpp's libraries and every backend module, which runs wherever it is unpacked, and the
# sources with every crate vendored for an offline build. Reuses the Vulkan build's objects.
dist: vulkan-build
	./scripts/dist.sh

# Every artifact proved as root with no network (scripts/dist-test.sh): the archive in a
# minimal Debian root with no compiler and no Vulkan loader (the example batch, results equal
# to the build tree's), then with lavapipe added; the wheel in a fresh venv; the OCI image
# under podman --network none (scripts/dist-oci.sh).
dist-test: dist
	@./models/fetch.sh smollm2
	./scripts/dist-test.sh
	./scripts/dist-oci.sh

# The CUDA add-on (scripts/dist-cuda.sh): the CUDA module and NVIDIA's runtime libraries, to
# unpack over the archive, and as a wheel beside the base wheel; proved as far as a machine with
# no GPU can (scripts/dist-cuda-test.sh; root). Not in CI: it needs the CUDA build.
dist-cuda: dist cuda-build
	./scripts/dist-cuda.sh
	./scripts/dist-cuda-test.sh

# An OCI image archive of that release on a minimal Debian root, assembled with umoci (no
# registry), then run with podman --network none (scripts/dist-oci.sh; root). Part of dist-test.
dist-oci: dist
	./scripts/dist-oci.sh

setup: deps
	@./scripts/deps.sh browser
	@./models/fetch.sh
	@./scripts/openai-sdk.sh

deps:
	@./scripts/deps.sh

lint:
	cargo fmt --all -- --check
	cargo clippy --release --all-targets -- -D warnings
	RUSTDOCFLAGS="-D warnings" cargo doc --release --no-deps

# Regenerates benches/RESULTS.md and benches/plots/ from nothing, peers included (about two hours
# on 2 cores; needs the network once, to fetch and build the peers).
bench: setup
	python3 benches/bench.py
