#!/usr/bin/env bash
# Everything a GPU machine has to run, in one command (under 8 minutes on an H100):
#   1. check that torch with CUDA is importable (install torch from the pip cache if absent)
#   2. build the extension with its CUDA kernels (sm_90)
#   3. pytest -m cuda tests/test_cuda.py
#   4. compute-sanitizer memcheck and racecheck on small cases
#   5. the GPU benchmark (benchmarks/gpu_bench.py)
# Each stage runs even when an earlier one failed, and each stage's outcome is
# recorded in the JSON results: $OUT/gpu_results.json when OUT is set, else
# benchmarks/results/gpu_results.json; logs sit beside it.  Stage time limits
# shrink so that the whole run stays within GPU_CHECK_BUDGET_S (default 540 s).
set -uo pipefail
cd "$(dirname "$0")/.."

out_dir="${OUT:-benchmarks/results}"
mkdir -p "$out_dir"
results="$out_dir/gpu_results.json"
stages="$out_dir/gpu_stages.tsv"
: >"$stages"
py="${PYTHON:-python3}"
budget="${GPU_CHECK_BUDGET_S:-540}"
export PYTHONUNBUFFERED=1

# record NAME STATUS SECONDS DETAIL
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "${4//$'\t'/ }" >>"$stages"; }

# limit DEFAULT RESERVE: seconds a stage may take, keeping RESERVE for later stages.
limit() {
  local left=$((budget - SECONDS - $2))
  local cap=$1
  ((left < cap)) && cap=$left
  ((cap < 20)) && cap=20
  echo "$cap"
}

# Copies the stage log into the results JSON (creating it if the benchmark never ran).
merge_stages() {
  "$py" - "$stages" "$results" <<'EOF' || true
import json, os, sys
stages = {}
for line in open(sys.argv[1]):
    name, status, seconds, detail = (line.rstrip("\n").split("\t") + [""] * 4)[:4]
    stages[name] = {"status": status, "seconds": float(seconds or 0), "detail": detail}
data = {"errors": ["benchmark did not run"]}
if os.path.exists(sys.argv[2]):
    try:
        data = json.load(open(sys.argv[2]))
    except ValueError:
        data = {"errors": ["benchmark output was not valid JSON"]}
data["stages"] = stages
json.dump(data, open(sys.argv[2], "w"), indent=1)
EOF
}

# 1. torch with CUDA --------------------------------------------------------------
start=$SECONDS
if ! "$py" -c "import torch" 2>/dev/null; then
  echo "gpu_check: torch is not installed; trying pip, which can only use its local cache here"
  "$py" -m pip install --no-input --retries 0 --timeout 5 torch 2>&1 | tail -n 5
fi
if ! cuda_info="$("$py" -c "import torch; assert torch.cuda.is_available(), 'torch.cuda.is_available() is False'; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))" 2>&1)"; then
  reason="${cuda_info##*$'\n'}"
  echo "gpu_check: STOP: torch with CUDA is not usable on this machine: $reason"
  echo "gpu_check: there is no network here; bring a CUDA build of torch (e.g. as a wheel) first"
  record torch failed $((SECONDS - start)) "$reason"
  merge_stages
  exit 2
fi
echo "gpu_check: torch $cuda_info"
record torch ok $((SECONDS - start)) "$cuda_info"

# 2. build --------------------------------------------------------------------------
start=$SECONDS
echo "gpu_check: building the CUDA extension"
if timeout "$(limit 240 360)" env TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 NNSIM_FAST_CUDA=1 \
    "$py" -m pip install --no-build-isolation --no-deps --no-input -e . >"$out_dir/build.log" 2>&1 &&
   "$py" -c "import torch, nnsim_fast._C as c; assert c.built_with_cuda, 'built without CUDA'" \
     >>"$out_dir/build.log" 2>&1; then
  record build ok $((SECONDS - start)) ""
else
  tail -n 40 "$out_dir/build.log"
  record build failed $((SECONDS - start)) "see build.log"
fi

# 3. CUDA tests ------------------------------------------------------------------------
start=$SECONDS
echo "gpu_check: pytest -m cuda tests/test_cuda.py"
timeout "$(limit 180 260)" "$py" -m pytest -m cuda tests/test_cuda.py -q -p no:cacheprovider \
  -o addopts="" >"$out_dir/cuda_tests.log" 2>&1
rc=$?
summary="$(grep -E '[0-9]+ (passed|failed|error|skipped)' "$out_dir/cuda_tests.log" | tail -n 1)"
echo "gpu_check: tests: ${summary:-no summary} (exit $rc)"
((rc != 0)) && grep -E '^(FAILED|ERROR)' "$out_dir/cuda_tests.log" | head -n 30
# All tests skipped (no CUDA build) is a failure here, not a success.
status=failed
((rc == 0)) && [[ "$summary" == *passed* ]] && status=ok
record tests "$status" $((SECONDS - start)) "${summary:-no summary} (exit $rc)"

# 4. compute-sanitizer ---------------------------------------------------------------------
sanitizer="$(command -v compute-sanitizer || true)"
for candidate in /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
  [[ -z "$sanitizer" && -x "$candidate" ]] && sanitizer="$candidate"
done
reserve=(220 160)
for i in 0 1; do
  tool=$([[ $i -eq 0 ]] && echo memcheck || echo racecheck)
  start=$SECONDS
  if [[ -z "$sanitizer" ]]; then
    record "sanitizer_$tool" skipped 0 "compute-sanitizer not found"
    continue
  fi
  echo "gpu_check: compute-sanitizer --tool $tool"
  # Without the caching allocator memcheck sees every tensor's true bounds.
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "$(limit 100 "${reserve[$i]}")" \
    "$sanitizer" --tool "$tool" --error-exitcode 99 \
    "$py" benchmarks/gpu_bench.py --sanitize 2>&1 | tail -c 4000000 >"$out_dir/sanitizer_$tool.log"
  rc=${PIPESTATUS[0]}
  detail="$(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$out_dir/sanitizer_$tool.log" | tail -n 1)"
  echo "gpu_check: $tool: ${detail:-no summary} (exit $rc)"
  record "sanitizer_$tool" "$( ((rc == 0)) && echo ok || echo failed)" $((SECONDS - start)) \
    "${detail:-no summary} (exit $rc)"
done

# 5. benchmark ------------------------------------------------------------------------------
start=$SECONDS
bench_limit="$(limit 260 0)"
echo "gpu_check: benchmark (at most $bench_limit s)"
timeout "$bench_limit" "$py" benchmarks/gpu_bench.py --out "$results" --stages "$stages" \
  --budget-s $((bench_limit * 5 / 10)) 2>&1 | tee "$out_dir/bench.log"
rc=${PIPESTATUS[0]}
record bench "$( ((rc == 0)) && echo ok || echo failed)" $((SECONDS - start)) "exit $rc"
merge_stages
echo "gpu_check: stages (results in $results):"
column -t -s $'\t' "$stages" 2>/dev/null || cat "$stages"
