#!/usr/bin/env bash
# One-shot GPU check: build the extension, run the GPU tests, the kernel benchmarks and
# the latency gate, and put every result and log into one folder.
#
#   scripts/gpu_check.sh [OUT_DIR]        # OUT_DIR defaults to $OUT (the device tool's)
#
# Steps, each under its own `timeout`, all inside one budget (GPU_CHECK_BUDGET_S,
# default 540 s, so a 10-minute device call has room for the machine's start):
#
#   0. no CUDA device visible -> say so and exit 2 before anything else (no folder made)
#   1. wheels: if ./.whl holds wheels (pure-Python packages the GPU image lacks; see
#      docs/runtime.md), install them into /tmp/site and put that on PYTHONPATH
#   2. imports: every package the package and the tests import; a missing one is named
#      with the command that fetches its wheel, and the script exits 3
#   3. build: pip install --no-build-isolation --no-deps -e . with MEGACONTEXT_CUDA=ON
#   4. tests: pytest -m gpu tests/ (allocator CUDA op and its CUDA-graph capture, every
#      Triton kernel compiled for the device, the re-rotating splice)
#   5. kernel benchmarks: bench/bench_{kv_splice,gist_pool,lens_stage1,lens_stage2,
#      lensnet,focus_allocator}.py --benchmark-enable, one JSON each (+ Markdown where
#      the bench has a summary); torch.compile cases are left out by default
#      (GPU_CHECK_BENCH_FILTER, a pytest -k expression, overrides "not compile")
#   6. latency gate: MEGACONTEXT_BENCH_MODEL=llama-8b-random bench/bench_latency.py at
#      GPU_CHECK_LATENCY_BUDGETS (default 8192, the design card's gate)
#
# Results: OUT_DIR/summary.md (each step's status and time) and OUT_DIR/gpu_check.tar.gz
# (every log, JSON and Markdown file; two files, because the device tool brings back at
# most 8 from $OUT). While it runs they are under OUT_DIR/files/, which stays when
# GPU_CHECK_KEEP=1 or when the run is cut off. The exit status is 0 only when every
# step passed (1 otherwise). Environment: PYTHON (default python3).
set -uo pipefail

PY=${PYTHON:-python3}
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-540}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# -- 0. a GPU, before anything else --------------------------------------------------
if ! probe=$("$PY" -c 'import torch, sys
ok = torch.cuda.is_available()
print(torch.cuda.get_device_name(0) if ok else "torch.cuda.is_available() is False")
sys.exit(0 if ok else 1)' 2>&1); then
    echo "gpu_check: no CUDA device visible (${probe##*$'\n'}); nothing was run." >&2
    exit 2
fi

DEST=${1:-${OUT:-}}
if [ -z "$DEST" ]; then
    echo "gpu_check: name the output folder (argument, or \$OUT); nothing was run." >&2
    exit 2
fi
mkdir -p "$DEST/files" || exit 2
TOP=$(cd "$DEST" && pwd)
DEST="$TOP/files"
cd "$ROOT" || exit 2
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
SUMMARY="$DEST/summary.md"
FAILED=0
{
    echo "# gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo
    echo "device: ${probe##*$'\n'}"
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo
    echo "| step | status | seconds | log |"
    echo "|---|---|---|---|"
} >"$SUMMARY"
nvidia-smi >"$DEST/nvidia-smi.txt" 2>&1 || true

left() { echo $((BUDGET - ($(date +%s) - START))); }

# step NAME CAP LOG CMD...: run CMD under timeout min(CAP, budget left), log to LOG
step() {
    local name=$1 cap=$2 log=$3
    shift 3
    local remain t0 rc status
    remain=$(left)
    if [ "$remain" -lt 15 ]; then
        echo "| $name | not run: budget spent | 0 | |" >>"$SUMMARY"
        FAILED=1
        return 1
    fi
    [ "$cap" -gt "$remain" ] && cap=$remain
    echo "== $name (timeout ${cap}s)"
    t0=$(date +%s)
    timeout -k 10 "$cap" "$@" >"$DEST/$log" 2>&1
    rc=$?
    case $rc in
        0) status=passed ;;
        124 | 137) status="timed out after ${cap}s" ;;
        *) status="failed (exit $rc)" ;;
    esac
    [ $rc -ne 0 ] && FAILED=1
    echo "| $name | $status | $(($(date +%s) - t0)) | $log |" >>"$SUMMARY"
    echo "   $status"
    return $rc
}

# finish STATUS: close the summary, pack the files, exit
finish() {
    echo >>"$SUMMARY"
    echo "total: $(($(date +%s) - START)) s of a ${BUDGET} s budget" >>"$SUMMARY"
    cp "$SUMMARY" "$TOP/summary.md"
    tar -czf "$TOP/gpu_check.tar.gz" -C "$TOP" files &&
        [ "${GPU_CHECK_KEEP:-0}" != 1 ] && rm -rf "$DEST"
    cat "$TOP/summary.md"
    exit "$1"
}

# -- 1. carried wheels -----------------------------------------------------------------
if compgen -G ".whl/*.whl" >/dev/null; then
    step wheels 90 wheels.log "$PY" -m pip install -q --no-index --no-deps --no-compile \
        --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

# -- 2. imports --------------------------------------------------------------------------
# module:distribution (what `pip download` takes). Each is imported for real, so a
# missing dependency of a carried package (pydantic-core for pydantic, ...) shows too.
IMPORTS="torch:torch triton:triton transformers:transformers accelerate:accelerate
safetensors:safetensors numpy:numpy pydantic:pydantic yaml:pyyaml typer:typer rich:rich
nvtx:nvtx pyarrow:pyarrow matplotlib:matplotlib peft:peft gguf:gguf pytest:pytest
pytest_benchmark:pytest-benchmark pytest_timeout:pytest-timeout hypothesis:hypothesis
scikit_build_core:scikit-build-core pybind11:pybind11 cmake:cmake ninja:ninja
fastapi:fastapi uvicorn:uvicorn openai:openai httpx:httpx"
missing=$(timeout -k 5 120 "$PY" - "$IMPORTS" <<'EOF' 2>&1
import importlib, sys
seen = set()
for pair in sys.argv[1].split():
    mod, dist = pair.split(":")
    try:
        importlib.import_module(mod)
    except ModuleNotFoundError as exc:
        # the module that is absent: the package itself or one it needs
        name = dist if exc.name == mod else (exc.name or mod).split(".")[0].replace("_", "-")
        if name not in seen:
            seen.add(name)
            print(name)
    except Exception as exc:  # present but broken: name it, with the reason
        print(f"{dist}({type(exc).__name__})")
EOF
)
if [ -n "$missing" ]; then
    {
        echo "gpu_check: these packages are missing here: $(echo $missing)."
        echo "Carry their wheels (and their own missing dependencies) in ./.whl: on a machine"
        echo "with pip and network, in the repository root:"
        for d in $missing; do
            echo "  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12" \
                "--implementation cp --platform manylinux_2_28_x86_64 --platform" \
                "manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl $d"
        done
    } | tee "$DEST/imports.txt" >&2
    echo "| imports | missing: $(echo $missing) | 0 | imports.txt |" >>"$SUMMARY"
    finish 3
fi
echo "| imports | passed | 0 | |" >>"$SUMMARY"

# -- 3. build ----------------------------------------------------------------------------
CMAKE_ARGS="-DMEGACONTEXT_CUDA=ON ${CMAKE_ARGS:-}" \
    step build 180 build.log "$PY" -m pip install --no-build-isolation --no-deps -e .

# -- 4. GPU tests ------------------------------------------------------------------------
step gpu-tests 200 gpu-tests.log "$PY" -m pytest -m gpu tests/ -p no:cacheprovider -q \
    -rA --junitxml="$DEST/gpu-tests.xml"

# -- 5. kernel benchmarks ----------------------------------------------------------------
FILTER=${GPU_CHECK_BENCH_FILTER:-not compile}
for b in kv_splice gist_pool lens_stage1 lens_stage2 lensnet focus_allocator; do
    cap=60
    [ "$b" = kv_splice ] && cap=90
    if step "bench_$b" "$cap" "bench_$b.log" "$PY" -m pytest "bench/bench_$b.py" \
        -p no:cacheprovider -q --benchmark-enable -k "$FILTER" \
        --benchmark-json="$DEST/bench_$b.json"; then
        if grep -q "__main__" "bench/bench_$b.py"; then
            "$PY" "bench/bench_$b.py" "$DEST/bench_$b.json" >"$DEST/bench_$b.md" 2>&1 || true
        fi
    fi
done

# -- 6. latency gate ---------------------------------------------------------------------
# bench_latency's llama-8b-random builds a byte-level tokenizer in code: no model files
MEGACONTEXT_BENCH_MODEL=llama-8b-random \
    MEGACONTEXT_BENCH_BUDGETS=${GPU_CHECK_LATENCY_BUDGETS:-8192} \
    step latency 240 latency.log "$PY" -m pytest bench/bench_latency.py \
    -p no:cacheprovider -q --benchmark-enable --benchmark-json="$DEST/latency.json" &&
    "$PY" bench/bench_latency.py "$DEST/latency.json" >"$DEST/latency.md" 2>&1

finish $FAILED
