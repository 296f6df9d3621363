#!/usr/bin/env bash
# The device check: infer-batch on a lent GPU machine (one H100 or H200, 16 cores, CUDA's nvcc
# and CMake, no Rust, no network), prepared here. What it runs there writes under $OUT.
#
#   scripts/gpu-check.sh stage      here, after `make cuda-build`: fills .gpu/ (git-ignored) with
#                                   the binary, its libraries and CPU backend modules, ggml's
#                                   source for the CUDA backend, and each model in chunks:
#                                   .gpu/smollm2-K (2 chunks) and .gpu/gemma3-K (5 chunks)
#   scripts/gpu-check.sh load M K   on the device, with .gpu/M-K carried: keeps chunk K of model
#                                   M on the device (one call per chunk: a call carries at most
#                                   64 MiB). Gemma 3 is optional: without its chunks, run skips it
#   scripts/gpu-check.sh run        on the device, with .gpu/bin carried, after the loads:
#                                   nvidia-smi; the CUDA backend built there for sm_90 from the
#                                   same ggml source (the device's nvcc; the module is too large
#                                   to carry); the correctness checks on the GPU (q8_0 keys and
#                                   values and flash attention included); deterministic f16,
#                                   q8_0 and flash attention against --no-deterministic
#                                   throughput at --parallel 32 and 64; a short bench at
#                                   --parallel 1, 8, 32 and 64 on each model; NVML readings
#                                   throughout
#   GPU_CHECK_DRY_RUN=1 scripts/gpu-check.sh run
#                                   here: all a machine without a GPU allows: the checks on the
#                                   CPU (the staged binary, else target/release's) and, with
#                                   nvcc on the PATH (. .cuda/env), the CUDA module's configure,
#                                   ggml-base and one CUDA object; no nvidia-smi
#
# A device call, in this repository's root: run(command="scripts/gpu-check.sh run",
# carry=[".gpu/bin"]) once the loads are done (see docs/gpu.md).
set -euo pipefail
cd "$(dirname "$0")/.."

gpu=.gpu
bin=$gpu/bin
out=${OUT:-/tmp/gpu-check-out}
# The device returns at most 8 files from $OUT: the rest (logs, summaries, plots) goes here and
# comes back as one $OUT/detail.tar.gz.
det=/tmp/gpu-check-detail
# Where chunks of the model wait on the device between calls (not under the tree: a later call
# replaces what the tree carries).
keep=${GPU_CHECK_KEEP:-/tmp/infer-batch-gpu}
smollm2=SmolLM2-135M-Instruct.Q4_1.gguf
gemma3=gemma-3-270m-q4_k_m.gguf
chunk_bytes=$((56 << 20))
dry=${GPU_CHECK_DRY_RUN:-}

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" | tee -a "$out/gpu-check.log" >&2; }

stage() {
    local built=target/cuda/release
    [ -x "$built/infer-batch" ] || { echo "error: no CUDA build in $built: run make cuda-build" >&2; exit 1; }
    rm -rf "$gpu"
    mkdir -p "$bin/lib" "$bin/ggml"
    cp "$built/infer-batch" "$bin/"
    strip "$bin/infer-batch"
    # llama.cpp's shared libraries and the CPU backend modules, from the build the binary links
    # (the last entry of its run path; the CUDA module is built on the device). The AMX variant
    # is left out: it is never loaded.
    local out_dir
    out_dir=$(dirname "$(readelf -d "$built/infer-batch" | sed -n 's/.*runpath: \[.*:\(.*\)\]/\1/p')")
    [ -d "$out_dir/backends" ] || { echo "error: no backend modules under target/cuda" >&2; exit 1; }
    cp -L "$out_dir"/lib/lib*.so.0 "$bin/lib/" # the sonames the binary needs, as plain files
    find "$out_dir/backends" -name 'libggml-cpu-*.so' \( -name '*x64*' -o -name '*haswell*' \
        -o -name '*skylakex*' -o -name '*icelake*' -o -name '*zen4*' \) -exec cp {} "$bin/lib/" \;
    strip "$bin"/lib/*.so* 2>/dev/null || true
    # ggml's source: what the CUDA backend's build reads, the other backends left out.
    # The tree the build compiled: the llama-cpp-sys-2 that Cargo.lock pins.
    version=$(grep -A1 '^name = "llama-cpp-sys-2"' Cargo.lock | sed -n 's/^version = "\(.*\)"/\1/p')
    src=$(find ~/.cargo/registry/src -maxdepth 4 -type d -path "*/llama-cpp-sys-2-$version/llama.cpp/ggml" | head -n 1)
    [ -d "$src" ] || { echo "error: no llama-cpp-sys-2 $version source in ~/.cargo/registry" >&2; exit 1; }
    (cd "$src" && tar cf - CMakeLists.txt cmake include src/*.c src/*.cpp src/*.h src/*.in src/CMakeLists.txt src/ggml-cpu/*.h src/ggml-cuda) |
        tar xf - -C "$bin/ggml"
    : >"$bin/ggml/ggml.pc.in" # the crate's copy is trimmed of it; a standalone configure wants it
    cp benches/gen_workload.py "$bin/"
    for name in smollm2 gemma3; do
        file=${!name}
        split -b "$chunk_bytes" -d -a 1 "models/$file" "$gpu/$name-"
        for c in "$gpu/$name"-?; do
            mkdir "$c.d" && mv "$c" "$c.d/part" && mv "$c.d" "$c"
        done
    done
    (cd models && sha256sum "$smollm2" "$gemma3") >"$bin/models.sha256"
    du -sh "$bin" "$gpu"/smollm2-* "$gpu"/gemma3-*
    echo "staged; a load carries one .gpu/M-K, the run carries .gpu/bin"
}

load() {
    mkdir -p "$keep"
    cp "$gpu/$1-$2/part" "$keep/$1.part-$2"
    ls -la "$keep"
}

# The folder of the models, each put together from the chunks the loads kept and checked
# against its checksum; a model with no chunks is left out. In a dry run: models/.
models() {
    if [ -n "$dry" ]; then
        echo "$PWD/models"
        return
    fi
    mkdir -p "$keep/models"
    for name in smollm2 gemma3; do
        file=${!name}
        compgen -G "$keep/$name.part-*" >/dev/null || continue
        cat "$keep/$name".part-* >"$keep/models/$file"
        (cd "$keep/models" && grep " $file\$" "$OLDPWD/$bin/models.sha256" | sha256sum --quiet -c -) >&2 ||
            { log "$file does not match its checksum: run its loads again"; exit 1; }
    done
    echo "$keep/models"
}

# The CUDA backend module, from the carried ggml source with the device's nvcc. A dry run
# builds ggml's base library and one CUDA object only (all of them take an hour on 2 cores).
build_cuda() {
    local build=/tmp/ggml-cuda-build generator=()
    command -v ninja >/dev/null && generator=(-G Ninja)
    rm -rf "$build"
    cmake -S "$bin/ggml" -B "$build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release \
        -DBUILD_SHARED_LIBS=ON -DGGML_BACKEND_DL=ON -DGGML_CUDA=ON -DGGML_CUDA_NO_VMM=ON \
        -DGGML_NATIVE=OFF -DGGML_CPU=OFF -DGGML_BUILD_TESTS=OFF -DGGML_BUILD_EXAMPLES=OFF \
        -DCMAKE_CUDA_ARCHITECTURES=90 >"$det/cuda-configure.log" 2>&1 ||
        { log "configuring the CUDA backend failed: see cuda-configure.log in detail.tar.gz"; return 1; }
    if [ -n "$dry" ]; then
        # ggml-base, and one CUDA object: the carried source compiles for sm_90.
        cmake --build "$build" --target ggml-base -j "$(nproc)" >"$det/cuda-build.log" 2>&1
        if [ ${#generator[@]} -gt 0 ]; then
            ninja -C "$build" src/ggml-cuda/CMakeFiles/ggml-cuda.dir/acc.cu.o
        else
            make -C "$build/src/ggml-cuda" acc.cu.o
        fi >>"$det/cuda-build.log" 2>&1
        log "ggml-base and one CUDA object (acc.cu) built"
        return
    fi
    cmake --build "$build" --target ggml-cuda -j "$(nproc)" >"$det/cuda-build.log" 2>&1 ||
        { log "building the CUDA backend failed: see cuda-build.log in detail.tar.gz"; return 1; }
    cp "$(find "$build" -name 'libggml-cuda.so' | head -n 1)" "$bin/lib/"
}

essence() { # OUT.jsonl: each request's content, finish_reason and token counts, a line each, sorted
    python3 - "$1" <<'PY'
import json, sys
rows = []
for line in open(sys.argv[1]):
    v = json.loads(line)
    if v["error"] is None:
        b = v["response"]["body"]
        rows.append(json.dumps([v["custom_id"], [c["message"]["content"] for c in b["choices"]],
                                [c["finish_reason"] for c in b["choices"]],
                                # cached_tokens differ by design (naive reuses nothing)
                                [b["usage"]["prompt_tokens"], b["usage"]["completion_tokens"]]]))
    else:
        rows.append(json.dumps(["line:%s" % v["error"]["line"], v["error"]["code"]]))
print("\n".join(sorted(rows)))
PY
}

check() { # NAME A B: the two outputs must hold the same requests with the same results
    if [ "$(essence "$2")" = "$(essence "$3")" ]; then
        log "PASS $1"
        echo "PASS $1" >>"$out/checks.txt"
    else
        log "FAIL $1"
        echo "FAIL $1" >>"$out/checks.txt"
        failed=1
    fi
}

run() {
    rm -rf "$det"
    mkdir -p "$out" "$det"
    : >"$out/checks.txt"
    : >"$out/gpu-check.log"
    # (set -e holds in the trap too: nothing in it may fail)
    trap 'kill "${nvml:-}" 2>/dev/null || true; tar czf "$out/detail.tar.gz" -C "$det" . || true' EXIT
    failed=0
    export LD_LIBRARY_PATH=$PWD/$bin/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    local layers=999
    if [ -z "$dry" ]; then
        nvidia-smi >"$out/nvidia-smi.txt" 2>&1
        nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv >>"$out/nvidia-smi.txt"
        # cuBLAS and the CUDA runtime from the device's own Python CUDA packages.
        for d in $(python3 -c 'import nvidia, os; print(" ".join(os.path.join(p, "cu13", "lib") for p in nvidia.__path__))' 2>/dev/null) /usr/local/cuda/lib64; do
            [ -d "$d" ] && LD_LIBRARY_PATH=$LD_LIBRARY_PATH:$d
        done
        log "building the CUDA backend for sm_90 ($(nvcc --version | tail -n 1))"
        build_cuda
        nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu --format=csv -l 1 >"$out/nvml.csv" 2>&1 &
        nvml=$!
    else
        layers=0
        log "dry run: no nvidia-smi, the checks on the CPU"
        if [ -d "$bin/ggml" ] && command -v nvcc >/dev/null; then
            log "configuring the CUDA backend ($(nvcc --version | tail -n 1))"
            build_cuda
        fi
    fi
    local ib=$bin/infer-batch gen=$bin/gen_workload.py dir m
    if [ -n "$dry" ] && [ ! -x "$ib" ]; then # not staged: the CPU build
        ib=target/release/infer-batch
        gen=benches/gen_workload.py
    fi
    dir=$(models)
    m=$dir/$smollm2
    [ -f "$m" ] || { log "no SmolLM2 chunks loaded: run its loads first"; exit 1; }
    "$ib" --version | tee -a "$out/gpu-check.log"
    local work=/tmp/gpu-check-work
    rm -rf "$work" && mkdir -p "$work"
    python3 "$gen" --preset ci -n 24 -s 600 -u 100 -m 32 -o "$work/in.jsonl" >/dev/null
    python3 "$gen" --preset ci -n 64 -s 1000 -u 100 -m 64 -o "$work/bench.jsonl" >/dev/null
    # Long enough on a GPU that the kill lands mid-run.
    local kill_n=240
    [ -n "$dry" ] && kill_n=24
    python3 "$gen" --preset ci -n "$kill_n" -s 600 -u 100 -m 64 -o "$work/kill.jsonl" >/dev/null
    common=(--model "$m" --gpu-layers "$layers" --temperature 0 --prefix-cache-dir "$work/cache")
    r() { "$ib" "${common[@]}" "$@" 2>>"$det/runs.log" || [ $? -eq 1 ]; }

    log "shared prefix against naive"
    # The decode-group probe's verdict (any shape, or fixed-shape and its size) goes to runs.log.
    INFER_BATCH_LOG=info,infer_batch=debug \
        r --parallel 8 --no-prefix-cache --no-disk-cache -o "$work/naive.jsonl" "$work/in.jsonl"
    r --parallel 8 --no-disk-cache -o "$work/shared.jsonl" "$work/in.jsonl"
    check "shared prefix equals naive (--parallel 8)" "$work/naive.jsonl" "$work/shared.jsonl"
    log "exactness across --parallel"
    r --parallel 1 --no-disk-cache -o "$work/p1.jsonl" "$work/in.jsonl"
    check "--parallel 1 equals --parallel 8" "$work/p1.jsonl" "$work/shared.jsonl"
    r --parallel 32 --no-disk-cache -o "$work/p32.jsonl" "$work/in.jsonl"
    check "--parallel 32 equals --parallel 8" "$work/p32.jsonl" "$work/shared.jsonl"
    log "a prefix state saved from a GPU run, restored into a GPU run"
    r --parallel 8 -o "$work/saved.jsonl" "$work/in.jsonl"
    r --parallel 8 -o "$work/restored.jsonl" "$work/in.jsonl"
    if python3 - "$work/restored.summary.json" <<'PY' >>"$out/gpu-check.log"; then
import json, sys
s = json.load(open(sys.argv[1]))
assert s["tokens"]["prefix_restored"] > 0 and s["tokens"]["prefix_prefilled"] == 0, s["tokens"]
print("restored", s["tokens"]["prefix_restored"], "prefix tokens")
PY
        echo "PASS a GPU run restored the state a GPU run saved" >>"$out/checks.txt"
    else
        echo "FAIL a GPU run restored the state a GPU run saved" >>"$out/checks.txt"
        failed=1
    fi
    check "restored from disk equals computed" "$work/saved.jsonl" "$work/restored.jsonl"
    log "killed and resumed"
    r --parallel 8 -o "$work/whole.jsonl" "$work/kill.jsonl"
    "$ib" "${common[@]}" --parallel 8 -o "$work/killed.jsonl" "$work/kill.jsonl" 2>>"$det/runs.log" &
    pid=$!
    local at=$((kill_n / 4)) lines=0
    for _ in $(seq 3000); do
        lines=$({ wc -l <"$work/killed.jsonl"; } 2>/dev/null || echo 0)
        [ "$lines" -ge "$at" ] && break
        sleep 0.02
    done
    if kill -KILL "$pid" 2>/dev/null; then
        wait "$pid" 2>/dev/null || true
        log "killed at $(wc -l <"$work/killed.jsonl") of $kill_n lines"
        r --parallel 8 -o "$work/killed.jsonl" "$work/kill.jsonl"
        check "killed mid-run and resumed equals uninterrupted" "$work/whole.jsonl" "$work/killed.jsonl"
    else
        log "FAIL the run ended before the kill ($lines lines seen)"
        echo "FAIL killed mid-run: the run ended before the kill" >>"$out/checks.txt"
        failed=1
    fi
    grep -h "decode groups\|no GPU" "$det/runs.log" | head -n 3 >>"$out/gpu-check.log" || true

    # Quantized KV and flash attention keep a request's output whatever its batch-mates.
    local q8=(--cache-type-k q8_0 --cache-type-v q8_0)
    log "exactness at q8_0 and with flash attention"
    r --parallel 1 --no-disk-cache "${q8[@]}" -o "$work/q8-p1.jsonl" "$work/in.jsonl"
    r --parallel 8 --no-disk-cache "${q8[@]}" -o "$work/q8-p8.jsonl" "$work/in.jsonl"
    check "q8_0: --parallel 1 equals --parallel 8" "$work/q8-p1.jsonl" "$work/q8-p8.jsonl"
    r --parallel 1 --no-disk-cache --flash-attn on -o "$work/fa-p1.jsonl" "$work/in.jsonl"
    r --parallel 8 --no-disk-cache --flash-attn on -o "$work/fa-p8.jsonl" "$work/in.jsonl"
    check "flash attention: --parallel 1 equals --parallel 8" "$work/fa-p1.jsonl" "$work/fa-p8.jsonl"

    # What exactness costs: deterministic runs (fixed-shape calls as the probe decided, or any
    # shape) against --no-deterministic (one unified cache, mixed batches), same requests; and
    # what q8_0 keys and values and flash attention buy in deterministic mode.
    local tp_parallel="32 64" tp_in=$work/bench.jsonl
    [ -n "$dry" ] && tp_parallel=4 tp_in=$work/in.jsonl
    log "throughput: deterministic (f16, q8_0, flash attention) against --no-deterministic at --parallel $tp_parallel"
    for p in $tp_parallel; do
        r --parallel "$p" --no-disk-cache -o "$work/tp-det-p$p.jsonl" "$tp_in"
        r --parallel "$p" --no-disk-cache "${q8[@]}" -o "$work/tp-q8-p$p.jsonl" "$tp_in"
        r --parallel "$p" --no-disk-cache --flash-attn on -o "$work/tp-fa-p$p.jsonl" "$tp_in"
        r --parallel "$p" --no-disk-cache --no-deterministic -o "$work/tp-mixed-p$p.jsonl" "$tp_in"
    done
    python3 - "$work" $tp_parallel <<'PY' | tee -a "$out/bench.txt" | tee -a "$out/gpu-check.log" >&2
import json, sys
work, parallel = sys.argv[1], sys.argv[2:]
modes = {"det": "deterministic", "q8": "det. q8_0", "fa": "det. flash", "mixed": "mixed"}
print("%-9s %-14s %14s %14s %12s %10s  %s" % ("parallel", "mode", "prefill tok/s", "decode tok/s",
      "requests/s", "KV B/tok", "decode groups"))
for p in parallel:
    rates = {}
    for mode, name in modes.items():
        s = json.load(open("%s/tp-%s-p%s.summary.json" % (work, mode, p)))
        rates[mode] = s["rates"]["decode_tokens_per_second"]
        print("%-9s %-14s %14.1f %14.1f %12.2f %10s  %s" % (p, name, s["rates"]["prefill_tokens_per_second"],
              rates[mode], s["rates"]["requests_per_second"],
              s["memory"].get("kv_cache", {}).get("bytes_per_token", "?"), s["decode_groups"]["decision"]))
    for mode in ("det", "q8", "fa"):
        print("%-9s %s decodes at %.0f%% of mixed" % (p, modes[mode], 100 * rates[mode] / max(rates["mixed"], 1e-9)))
PY

    # A dry run's CPU would take an hour over the full bench: it runs a token of it.
    local sample=64 parallel=1,8,32,64
    [ -n "$dry" ] && sample=4 parallel=1,4
    log "bench: naive, in memory and from disk, $sample requests at --parallel $parallel"
    "$ib" bench "${common[@]}" --sample "$sample" --parallel "$parallel" --json "$det/bench-smollm2.json" \
        "$work/bench.jsonl" 2>>"$det/runs.log" | tee "$out/bench.txt"
    # Gemma 3 (sliding-window attention, no chat template in its GGUF), same batch.
    [ -f "$dir/$gemma3" ] || { log "no Gemma 3 chunks loaded: its bench is skipped"; gemma_skip=1; }
    [ -n "${gemma_skip:-}" ] || "$ib" bench --model "$dir/$gemma3" --chat-template gemma --gpu-layers "$layers" \
        --temperature 0 --prefix-cache-dir "$work/cache" --sample "$sample" --parallel "$parallel" \
        --json "$det/bench-gemma3.json" "$work/bench.jsonl" 2>>"$det/runs.log" | tee -a "$out/bench.txt"
    cp "$work"/*.summary.json "$det/" 2>/dev/null || true
    cp "$det"/bench-*.json "$out/"
    if [ -n "${nvml:-}" ]; then
        kill "$nvml" 2>/dev/null || true
    fi
    echo
    cat "$out/checks.txt"
    [ "$failed" -eq 0 ]
}

case "${1:-}" in
    stage) stage ;;
    load) load "${2:?which model: smollm2 or gemma3}" "${3:?which chunk}" ;;
    run) run ;;
    *) sed -n '2,26p' "$0" >&2; exit 2 ;;
esac
