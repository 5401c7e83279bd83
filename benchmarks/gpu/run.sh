#!/usr/bin/env bash
# The prepared GPU run of cltrace (issue 17): build, CUDA tests, end-to-end graphs against the
# CPU references, timings, compute-sanitizer. One call, well under 10 minutes; every result and
# log lands in one folder: $OUT when set (the device tool brings it back), else
# benchmarks/gpu/out. That folder gets at most four files (the device tool returns 8):
#   run.log  summary.md  summary.json  logs.tar.gz  (per-step logs, junit XML, JSON results)
#
#   bash benchmarks/gpu/run.sh                 # on the GPU machine
#   bash benchmarks/gpu/run.sh --cpu-dry-run   # the same steps on the CPU at tiny sizes
#
# Each step runs under `timeout` with its own budget, capped by what is left of RUN_BUDGET_S
# (default 480 s); a failed or timed-out step is recorded and the next one runs. Order: the
# build and tests first, then the end-to-end checks and timings (the product), then the
# sanitizers (slowest per test).
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
DRY=0
[[ "${1:-}" == "--cpu-dry-run" ]] && DRY=1
OUTDIR=${OUT:-$ROOT/benchmarks/gpu/out}
mkdir -p "$OUTDIR"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/cltrace-gpu.XXXXXX")
PY=${PYTHON:-python3}
RUN_BUDGET_S=${RUN_BUDGET_S:-480}
RESERVE_S=25  # kept for the summary and the archive
T0=$(date +%s)
export PYTHONUNBUFFERED=1
exec > >(tee "$OUTDIR/run.log") 2>&1

echo "cltrace GPU run: $(date -u +%FT%TZ) dry_run=$DRY root=$ROOT out=$OUTDIR work=$WORK"
echo "git: $(git rev-parse HEAD 2>/dev/null || echo '?') $(git status --porcelain 2>/dev/null | wc -l) changed files"

# step NAME BUDGET_S CMD... : run CMD with its output in $WORK/NAME.log, under a timeout of
# min(BUDGET_S, time left); append {"step", "rc", "seconds", "budget"} to $WORK/steps.jsonl.
step() {
  local name=$1 budget=$2
  shift 2
  local left=$(( RUN_BUDGET_S - RESERVE_S - ($(date +%s) - T0) ))
  (( budget > left )) && budget=$left
  if (( budget < 5 )); then
    echo "--- $name: SKIPPED (run budget spent)"
    echo "{\"step\": \"$name\", \"rc\": null, \"seconds\": 0, \"budget\": 0, \"skipped\": true}" >> "$WORK/steps.jsonl"
    return 0
  fi
  echo "--- $name (timeout ${budget}s): $*"
  local start=$(date +%s)
  timeout --kill-after=10 "$budget" "$@" > "$WORK/$name.log" 2>&1
  local rc=$?
  local secs=$(( $(date +%s) - start ))
  echo "    rc=$rc in ${secs}s$( ((rc == 124 || rc == 137)) && echo ' (TIMED OUT)')"
  tail -n 4 "$WORK/$name.log" | sed 's/^/    | /'
  echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $secs, \"budget\": $budget}" >> "$WORK/steps.jsonl"
  return 0
}

have_py() { "$PY" -c "import $1" >/dev/null 2>&1; }

# --- (a) environment and build -------------------------------------------------------------
step env 30 bash -c "nvidia-smi || echo 'nvidia-smi: not available'; \
  nvcc --version || echo 'nvcc: not found'; cmake --version | head -1; uname -a; \
  $PY -c 'import sys, torch; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"available\", torch.cuda.is_available()); print(torch.cuda.get_device_name() if torch.cuda.is_available() else \"no GPU\")'; \
  $PY -m pip list 2>/dev/null | grep -iE '^(torch|transformers|numpy|safetensors|scikit-build-core|cmake|ninja|pytest|pytest-xdist|pytest-timeout) ' ; \
  command -v compute-sanitizer || echo 'compute-sanitizer: not found'"

if (( DRY )); then
  # the CPU extension built beforehand (python/cltrace/_C*.so); nothing is installed
  export PYTHONPATH=$ROOT/python${PYTHONPATH:+:$PYTHONPATH}
  echo "--- build: skipped in the dry run (using the prebuilt CPU extension in python/cltrace)"
else
  # nvcc where CMake and torch.utils.cpp_extension look for it
  if ! command -v nvcc >/dev/null && [[ -x /usr/local/cuda/bin/nvcc ]]; then
    export PATH=/usr/local/cuda/bin:$PATH
  fi
  if command -v nvcc >/dev/null; then
    export CUDACXX=${CUDACXX:-$(command -v nvcc)}
    export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc)")")}
    echo "nvcc: $CUDACXX (CUDA_HOME=$CUDA_HOME)"
  else
    echo "nvcc: NOT FOUND: the build will have no CUDA kernels"
  fi
  # Hopper only (halves nvcc time); all cores
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} CMAKE_BUILD_PARALLEL_LEVEL=$(nproc)
  has_cuda() {  # an importable cltrace with CUDA kernels (else say why)
    "$PY" -c "import cltrace, sys; b = cltrace.build_info(); print('    cltrace', cltrace.__file__, 'cuda', b.cuda); sys.exit(0 if b.cuda else 1)" 2>&1 | tail -n 2
  }
  step build 240 "$PY" -m pip install --no-build-isolation --no-deps -v -e .
  if ! has_cuda; then
    # fallback 1: CMake straight into python/cltrace (CMakeLists.txt's development mode)
    echo "    no CUDA build of cltrace importable after pip: trying CMake directly"
    export PYTHONPATH=$ROOT/python${PYTHONPATH:+:$PYTHONPATH}
    step build_cmake 200 bash -c "cmake -S . -B /tmp/cltrace-build -G Ninja -DPython_EXECUTABLE=\$(command -v $PY) && cmake --build /tmp/cltrace-build -j\$(nproc)"
  fi
  if ! has_cuda; then
    # fallback 2: torch.utils.cpp_extension (ninja, no CMake) into python/cltrace
    echo "    still no CUDA build: trying torch.utils.cpp_extension"
    step build_jit 240 "$PY" benchmarks/gpu/build_jit.py
  fi
fi
step build_info 30 "$PY" -c "
import json, dataclasses, cltrace
b = cltrace.build_info()
d = b._asdict() if hasattr(b, '_asdict') else dataclasses.asdict(b)
print(json.dumps(d, indent=1, default=str))
open('$WORK/build_info.json', 'w').write(json.dumps(d, default=str))"

# --- (b) tests -------------------------------------------------------------------------------
PYTEST=("$PY" -m pytest -q -rfE -p no:cacheprovider)
have_py pytest_timeout && PYTEST+=(--timeout 120)
OPS=(tests/test_contract.py tests/test_decode.py tests/test_encode.py
     tests/test_attention.py  # attention: --qk's report in fp32/bf16 on the device
     tests/test_image_graph.py)  # images: the multimodal model, graph and steering on the device
if (( DRY )); then
  # the op suites' [cpu] cases; the tests marked cuda are collected and skip
  step tests 240 "${PYTEST[@]}" "${OPS[@]}" tests/test_build.py -k "cuda or cpu" \
    --junitxml="$WORK/junit-tests.xml"
else
  XDIST=()
  have_py xdist && XDIST=(-n 4)
  # the [cuda] cases of the device-parametrised op suites and every test marked cuda in them
  # and in test_build.py (CUDA against the CPU op, mixed devices, allocation peaks,
  # build_info().cuda_available): -k cuda selects both, as -k matches marker names too
  step tests 150 "${PYTEST[@]}" "${XDIST[@]}" "${OPS[@]}" tests/test_build.py -k cuda \
    --junitxml="$WORK/junit-tests.xml"
  step tests_marker 60 "${PYTEST[@]}" -m cuda tests --co --continue-on-collection-errors
fi

# --- (c) end to end ------------------------------------------------------------------------
if (( DRY )); then
  mkdir -p "$WORK/ref"
  step e2e_reference 120 "$PY" benchmarks/gpu/e2e.py reference --shape tiny-clt --n-pos 12 --nodes 64 \
    --out "$WORK/ref/tiny-clt.pt"
  step e2e_refs_load 60 "$PY" -c "
import torch, glob
for p in sorted(glob.glob('benchmarks/gpu/reference/*.pt')):
    r = torch.load(p, weights_only=True)
    print(p, r['shape'], r['n_pos'], r['nodes'], tuple(r['graph']['edges'].shape), r['torch'], round(r['total_s'], 1), 's')"
  step e2e 200 "$PY" benchmarks/gpu/e2e.py check --device cpu --shapes tiny,tiny-clt \
    --ref-dir "$WORK/ref" --budget-s 150 --json "$WORK/e2e.json"
else
  step e2e 150 "$PY" benchmarks/gpu/e2e.py check --device cuda --shapes tiny,tiny-clt,1b,4b \
    --budget-s 130 --json "$WORK/e2e.json"
fi

# --- (d) timings ---------------------------------------------------------------------------
if (( DRY )); then
  step timing 200 "$PY" benchmarks/gpu/timing.py --device cpu --small --warmup 1 --reps 3 \
    --graph-shape tiny --graphs 12x32,16x64 --budget-s 150 --json "$WORK/timing.json"
else
  step timing 170 "$PY" benchmarks/gpu/timing.py --device cuda --budget-s 150 --json "$WORK/timing.json"
fi

# --- (b') compute-sanitizer over a small subset of the op tests ----------------------------
SAN_K="cuda and (attribution_layout or strided_clt or contract_matches_reference or jumprelu_matches_reference or threshold_straight_through or decode_backward_matches or topk_matches)"
if (( DRY )); then
  echo "--- sanitizers: not run in the dry run (no GPU)" | tee "$WORK/sanitizer.log"
elif ! command -v compute-sanitizer >/dev/null; then
  echo "--- sanitizers: compute-sanitizer NOT FOUND on this machine: memcheck and racecheck not run" | tee "$WORK/sanitizer.log"
else
  # no caching allocator under memcheck, so an overrun is not hidden inside a pooled block
  step memcheck 100 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck \
    --error-exitcode 99 --log-file "$WORK/memcheck.txt" "${PYTEST[@]}" "${OPS[@]}" -k "$SAN_K"
  step racecheck 90 compute-sanitizer --tool racecheck --racecheck-report all \
    --error-exitcode 99 --log-file "$WORK/racecheck.txt" "${PYTEST[@]}" "${OPS[@]}" -k "$SAN_K"
fi

# --- summary -------------------------------------------------------------------------------
echo "--- summary"
timeout 20 "$PY" benchmarks/gpu/summarize.py --work "$WORK" --out "$OUTDIR" --dry-run "$DRY" \
  || echo "summarize failed (rc=$?): raw results are in logs.tar.gz"
tar -czf "$OUTDIR/logs.tar.gz" -C "$WORK" . 2>/dev/null || echo "tar failed"
echo "total $(( $(date +%s) - T0 ))s; results in $OUTDIR: $(ls "$OUTDIR" | tr '\n' ' ')"
[[ -f "$OUTDIR/summary.md" ]] && cat "$OUTDIR/summary.md"
exit 0
