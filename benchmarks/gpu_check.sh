#!/usr/bin/env bash
# Everything a GPU machine has to run, in one call that must fit in ten minutes:
#   env        python, torch, the GPU, nvcc, compute-sanitizer, pip
#   build      the extension with its CUDA kernels for this GPU's architecture
#   tests      pytest -m cuda tests/test_cuda.py
#   memcheck   compute-sanitizer memcheck on the library's kernels (small cases)
#   racecheck  compute-sanitizer racecheck, likewise (side by side with memcheck)
#   bench      benchmarks/gpu_bench.py (the issue's targets first)
#
# usage: bash benchmarks/gpu_check.sh [--tests-only] [--budget SECONDS]
#   --tests-only   env, build and tests only: a short second call after a fix
#   --budget S     total seconds (default 420, or 240 with --tests-only)
#
# Every stage has a time limit: its own cap, and never past the total budget.
# The bench takes whatever time the earlier stages left (and stops starting new
# cases before its limit).  A failed build stops the run; a stage whose
# precondition failed is recorded as skipped.  Results go to $OUT when it is
# set (a remote runner copies that folder back), else benchmarks/results/gpu:
#   gpu_check.json   summary, rewritten after every stage
#   gpu_bench.json   benchmark rows, rewritten after every case
#   <stage>.log      one log per stage that ran
# Exit status: 0 all stages passed; 1 a stage failed or hit its limit;
# 2 bad usage; 3 no usable GPU (GPU stages skipped); 4 nothing failed but a
# check could not run (no compute-sanitizer, or it does not support the device).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
repo="$(pwd)"

mode=full
budget=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tests-only) mode=tests-only; shift ;;
    --budget)
      [[ $# -ge 2 ]] || { echo "gpu_check: --budget needs a number of seconds" >&2; exit 2; }
      budget="$2"; shift 2 ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
if [[ -z "$budget" ]]; then
  budget="${GPU_CHECK_BUDGET_S:-$([[ $mode == full ]] && echo 420 || echo 240)}"
fi
if ! [[ "$budget" =~ ^[0-9]+$ ]] || ((budget < 60)); then
  echo "gpu_check: --budget must be a whole number of seconds >= 60, got '$budget'" >&2
  exit 2
fi

# Stage caps (seconds): with the bench's floor they sum to 400, below the
# default budget, so no stage can starve a later one; the bench also gets
# whatever the earlier stages leave.  memcheck and racecheck run side by side
# under one cap (small cases; the GPU has room for both).
cap_env=20
cap_build=170
cap_tests=110
cap_sanitizer=50
bench_floor=50
if [[ $mode == tests-only ]]; then cap_tests=$budget; fi

out="${OUT:-$repo/benchmarks/results/gpu}"
mkdir -p "$out" || exit 2
out="$(cd "$out" && pwd)"
summary="$out/gpu_check.json"
py="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# The in-place build is found from here whichever way it was built.
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
deadline=$((SECONDS + budget))

# ------------------------------------------------------------------ bookkeeping
stage_names=()
declare -A stage_status stage_seconds stage_limit stage_detail stage_log
declare -A env_info
overall=running
exit_code=0

json_string() {
  local s="${1:0:2000}"
  s="${s//\\/\\\\}"; s="${s//\"/\\\"}"; s="${s//$'\n'/\\n}"; s="${s//$'\t'/ }"
  printf '"%s"' "$(LC_ALL=C tr -d '\000-\037\177' <<<"$s")"
}

write_summary() {
  local first=1 key name
  {
    printf '{\n "tool": "gpu_check",\n "mode": %s,\n "status": %s,\n' \
      "$(json_string "$mode")" "$(json_string "$overall")"
    printf ' "exit_code": %d,\n "budget_s": %d,\n "elapsed_s": %d,\n' \
      "$exit_code" "$budget" "$((SECONDS))"
    printf ' "env": {'
    for key in "${!env_info[@]}"; do
      ((first)) || printf ','
      first=0
      printf '\n  %s: %s' "$(json_string "$key")" "$(json_string "${env_info[$key]}")"
    done
    printf '\n },\n "stages": ['
    first=1
    for name in "${stage_names[@]}"; do
      ((first)) || printf ','
      first=0
      printf '\n  {"name": %s, "status": %s, "seconds": %d, "limit_s": %d, "log": %s, "detail": %s}' \
        "$(json_string "$name")" "$(json_string "${stage_status[$name]}")" \
        "${stage_seconds[$name]:-0}" "${stage_limit[$name]:-0}" \
        "$(json_string "${stage_log[$name]:-}")" "$(json_string "${stage_detail[$name]:-}")"
    done
    printf '\n ]\n}\n'
  } >"$summary.part" && mv -f "$summary.part" "$summary"
}

# record NAME STATUS SECONDS LIMIT LOG DETAIL
record() {
  [[ -n "${stage_status[$1]+x}" ]] || stage_names+=("$1")
  stage_status[$1]="$2"; stage_seconds[$1]="$3"; stage_limit[$1]="$4"
  stage_log[$1]="$5"; stage_detail[$1]="$6"
  echo "gpu_check: [$1] $2 (${3} s of ${4} s)${6:+: $6}"
  write_summary
}

skip() { record "$1" skipped 0 0 "" "$2"; }

# limit CAP: seconds a stage may run: its cap, never past the deadline (keeping
# a few seconds to write the summary).
limit() {
  local left=$((deadline - SECONDS - 5))
  ((left < $1)) && echo "$left" || echo "$1"
}

# run_limited LIMIT LOG CMD...: runs CMD with its output in LOG; kills its whole
# process group at the limit.  Returns CMD's status (124 or 137 on timeout).
run_limited() {
  local seconds="$1" log="$2"
  shift 2
  timeout -k 5 "$seconds" "$@" >"$log" 2>&1
}

# Keeps a log's head and tail when a tool printed more than the copy-back allows.
cap_log() {
  local log="$1" max=$((8 << 20))
  [[ -f "$log" ]] || return 0
  if (($(stat -c %s "$log") > max)); then
    { head -c $((4 << 20)) "$log"; printf '\n... [cut] ...\n'; tail -c $((2 << 20)) "$log"; } \
      >"$log.cut" && mv -f "$log.cut" "$log"
  fi
}

finish() {
  rm -f "$out"/*.part
  overall="$1"
  exit_code="$2"
  write_summary
  echo "gpu_check: $overall (exit $exit_code) after ${SECONDS} s; summary in $summary"
  for name in "${stage_names[@]}"; do
    printf '  %-10s %-11s %4s s  %s\n' "$name" "${stage_status[$name]}" \
      "${stage_seconds[$name]}" "${stage_detail[$name]}"
  done
  exit "$exit_code"
}

all_gpu_stages=(build tests memcheck racecheck bench)
skip_rest() {
  local reason="$1" name
  for name in "${all_gpu_stages[@]}"; do
    [[ -n "${stage_status[$name]+x}" ]] || skip "$name" "$reason"
  done
}

# ------------------------------------------------------------------ 1. env
echo "gpu_check: mode $mode, budget ${budget} s, results in $out"
start=$SECONDS
probe="$(timeout -k 5 "$(limit $cap_env)" "$py" - 2>&1 <<'EOF'
import importlib.machinery
import platform
print("python=" + platform.python_version())
print("ext_suffix=" + importlib.machinery.EXTENSION_SUFFIXES[0])
try:
    import torch
except Exception as error:
    print("torch=missing: " + str(error).splitlines()[0])
    raise SystemExit(0)
print("torch=" + torch.__version__)
print("torch_cuda=" + str(torch.version.cuda))
ok = torch.cuda.is_available()
print("cuda_available=" + str(ok))
if ok:
    major, minor = torch.cuda.get_device_capability(0)
    print("gpu=" + torch.cuda.get_device_name(0))
    print(f"capability={major}.{minor}")
EOF
)"
while IFS='=' read -r key value; do
  [[ -n "$key" && "$key" != *" "* ]] && env_info[$key]="$value"
done <<<"$probe"
env_info[nvcc]="$(nvcc --version 2>/dev/null | tail -n 1 || true)"
[[ -n "${env_info[nvcc]}" ]] || env_info[nvcc]="not found"
sanitizer="$(command -v compute-sanitizer || true)"
for candidate in "${CUDA_HOME:-/nonexistent}/bin/compute-sanitizer" \
    /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
  [[ -z "$sanitizer" && -x "$candidate" ]] && sanitizer="$candidate"
done
env_info[compute_sanitizer]="${sanitizer:-not found}"
if "$py" -m pip --version >/dev/null 2>&1; then env_info[pip]=yes; else env_info[pip]=no; fi
env_detail="python ${env_info[python]:-?}, torch ${env_info[torch]:-?} (CUDA ${env_info[torch_cuda]:-?}), GPU ${env_info[gpu]:-none}, nvcc: ${env_info[nvcc]}"
if [[ "${env_info[cuda_available]:-}" != True ]]; then
  why="torch.cuda.is_available() is False"
  [[ "${env_info[torch]:-}" == missing* ]] && why="torch is not importable (${env_info[torch]})"
  [[ -z "${env_info[torch]:-}" ]] && why="could not run $py: ${probe:0:300}"
  [[ "${env_info[torch_cuda]:-}" == None ]] && why="torch ${env_info[torch]} is a CPU-only build (torch.version.cuda is None)"
  echo "gpu_check: NO GPU: $why."
  echo "gpu_check: the GPU stages (build, tests, sanitizer, bench) are skipped; nothing was measured."
  record env no_gpu $((SECONDS - start)) "$cap_env" "" "$why; $env_detail"
  skip_rest "no usable GPU"
  finish no_gpu 3
fi
record env passed $((SECONDS - start)) "$cap_env" "" "$env_detail"

# ------------------------------------------------------------------ 2. build
# The check loads the extension module itself, not the nnsim_fast package, so
# that a problem in the Python layer shows up in the tests, not as a failed build.
so_file="nnsim_fast/_C${env_info[ext_suffix]:-.so}"
extension_ok() {
  "$py" - "$so_file" >>"$1" 2>&1 <<'EOF'
import glob
import importlib.util
import sys

import torch

paths = [p for p in [sys.argv[1]] + glob.glob("build/lib*/" + sys.argv[1]) if glob.glob(p)]
if not paths:
    sys.exit(f"no {sys.argv[1]} was built")
spec = importlib.util.spec_from_file_location("nnsim_fast._C", paths[0])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
if not getattr(module, "built_with_cuda", False):
    sys.exit(f"{paths[0]} was built without the CUDA kernels")
if not torch._C._dispatch_has_kernel_for_dispatch_key("nnsim_fast::countsketch", "CUDA"):
    sys.exit(f"{paths[0]} registers no CUDA kernels")
print(f"{paths[0]}: CUDA kernels registered")
EOF
}
if [[ -f "$so_file" && -z "$(find csrc setup.py -newer "$so_file" -print -quit 2>/dev/null)" ]] &&
   extension_ok /dev/null; then
  record build passed 0 0 "" "up to date ($so_file is newer than every source)"
else
  arch="${env_info[capability]:-9.0}"
  log="$out/build.log"
  lim="$(limit $cap_build)"
  echo "gpu_check: [build] TORCH_CUDA_ARCH_LIST=$arch, at most $lim s (log: build.log)"
  export TORCH_CUDA_ARCH_LIST="$arch" NNSIM_FAST_CUDA=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}"
  rc=1
  how=""
  : >"$log"
  if [[ "${env_info[pip]}" == yes ]]; then
    how="pip install --no-build-isolation -e ."
    run_limited "$lim" "$log" "$py" -m pip install --no-build-isolation --no-deps --no-index \
      --no-input -e .
    rc=$?
  fi
  # Without pip, or when pip failed before compiling anything (an old
  # setuptools without editable installs, say): build in place directly.
  if [[ "${env_info[pip]}" != yes ]] || { ((rc != 0 && rc != 124 && rc != 137)) &&
      ! grep -q -E 'ninja: build stopped|: error|error: command' "$log"; }; then
    if [[ -n "$how" ]]; then how="$how failed; "; fi
    how+="setup.py build_ext --inplace"
    [[ "${env_info[pip]}" == yes ]] || how+=" (python3 -m pip is missing)"
    left="$(limit $((lim - (SECONDS - start))))"
    if ((left >= 10)); then
      { echo "== $how"; timeout -k 5 "$left" "$py" setup.py build_ext --inplace; } >>"$log" 2>&1
      rc=$?
    fi
  fi
  cap_log "$log"
  if ((rc == 0)) && extension_ok "$log"; then
    record build passed $((SECONDS - start)) "$lim" build.log "$how"
  else
    status=failed
    ((rc == 124 || rc == 137)) && status=timeout
    tail -n 40 "$log"
    record build "$status" $((SECONDS - start)) "$lim" build.log \
      "$how: exit $rc; $(grep -m 1 -E 'error|Error' "$log" | cut -c1-300)"
    skip_rest "the build did not succeed"
    finish failed 1
  fi
fi

# ------------------------------------------------------------------ 3. tests
start=$SECONDS
log="$out/tests.log"
lim="$(limit $cap_tests)"
echo "gpu_check: [tests] at most $lim s (log: tests.log)"
extra=()
"$py" -c "import pytest_timeout" 2>/dev/null && extra=(--timeout 60)
# -v: every test's verdict is in the log as it happens, even if the stage is cut.
run_limited "$lim" "$log" "$py" -m pytest tests/test_cuda.py -m cuda -v -rfE -p no:cacheprovider \
  -o addopts="" --durations=8 "${extra[@]}"
rc=$?
result="$(grep -E '[0-9]+ (passed|failed|skipped|errors?|deselected)' "$log" | tail -n 1 |
  sed 's/=//g;s/^ *//;s/ *$//')"
failures="$(grep -E '^(FAILED|ERROR) ' "$log" | head -n 8 | cut -c1-200 | tr '\n' ';')"
# A run cut by its limit has no short summary: take the verdicts printed so far.
[[ -z "$failures" ]] && failures="$(grep -E ' (FAILED|ERROR)( |$)' "$log" | head -n 8 |
  cut -c1-200 | tr '\n' ';')"
status=passed
if ((rc == 124 || rc == 137)); then
  status=timeout
elif ((rc != 0)) || [[ "$result" != *passed* ]]; then
  status=failed      # all tests skipped (no CUDA kernels) fails too
fi
[[ $status != passed ]] && tail -n 30 "$log"
record tests "$status" $((SECONDS - start)) "$lim" tests.log \
  "${result:-no pytest summary} (exit $rc)${failures:+; $failures}"

if [[ $mode == tests-only ]]; then
  [[ $status == passed ]] && finish passed 0
  finish failed 1
fi

# ------------------------------------------------------------------ 4. sanitizer
# Only the library's kernels are checked (their mangled names all hold the
# namespace "nnsim"); torch's own kernels run unchecked, and API errors that
# torch provokes and handles itself are not reported.  Options this
# compute-sanitizer does not list are left out (and named in the detail).
sanitizer_opts=()
sanitizer_missing=""
if [[ -n "$sanitizer" ]]; then
  sanitizer_help="$(timeout 20 "$sanitizer" --help 2>&1)"
  for option in "--kernel-name kns=nnsim" "--report-api-errors no" "--print-limit 50"; do
    if grep -q -- "${option%% *}" <<<"$sanitizer_help"; then
      read -r -a words <<<"$option"
      sanitizer_opts+=("${words[@]}")
    else
      sanitizer_missing+=" ${option%% *}"
    fi
  done
fi

# sanitizer_verdict TOOL RC SECONDS LIMIT: records the stage from its log.
sanitizer_verdict() {
  local tool="$1" rc="$2" log="$out/sanitizer_$1.log" line status=passed
  cap_log "$log"
  line="$(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|HAZARD SUMMARY' "$log" | tail -n 1 | cut -c1-200)"
  if grep -q -E 'Device not supported|not supported on this (device|platform)' "$log"; then
    status=unavailable    # e.g. a sandboxed runtime: no verdict either way
    line="$(grep -m 1 -E 'not supported' "$log" | cut -c1-200)"
  elif ((rc == 124 || rc == 137)); then
    status=timeout
  elif ((rc != 0)) || ! grep -q 'sanitize cases ran' "$log"; then
    status=failed
  fi
  [[ $status == failed ]] && tail -n 30 "$log"
  record "$tool" "$status" "$3" "$4" "sanitizer_$tool.log" \
    "${line:-no summary line} (exit $rc)${sanitizer_missing:+; options unknown here:$sanitizer_missing}"
}

lim="$(limit $cap_sanitizer)"
if [[ -z "$sanitizer" ]]; then
  skip memcheck "compute-sanitizer not found"
  skip racecheck "compute-sanitizer not found"
elif ((lim < 15)); then
  skip memcheck "no time left in the budget"
  skip racecheck "no time left in the budget"
else
  start=$SECONDS
  echo "gpu_check: [memcheck] and [racecheck] side by side, at most $lim s" \
    "(logs: sanitizer_memcheck.log, sanitizer_racecheck.log)"
  for tool in memcheck racecheck; do
    # Without the caching allocator memcheck sees every tensor's true bounds.
    ( PYTORCH_NO_CUDA_MEMORY_CACHING=1 run_limited "$lim" "$out/sanitizer_$tool.log" \
        "$sanitizer" --tool "$tool" --error-exitcode 99 "${sanitizer_opts[@]}" \
        "$py" benchmarks/gpu_bench.py --sanitize
      echo $? >"$out/sanitizer_$tool.rc" ) &
  done
  wait
  for tool in memcheck racecheck; do
    rc="$(cat "$out/sanitizer_$tool.rc" 2>/dev/null || echo 255)"
    rm -f "$out/sanitizer_$tool.rc"
    sanitizer_verdict "$tool" "$rc" $((SECONDS - start)) "$lim"
  done
fi

# ------------------------------------------------------------------ 5. bench
start=$SECONDS
lim=$((deadline - SECONDS - 5))
if ((lim < bench_floor)); then
  skip bench "only $lim s left in the budget (needs $bench_floor)"
else
  log="$out/bench.log"
  echo "gpu_check: [bench] at most $lim s (log: bench.log, rows: gpu_bench.json)"
  # gpu_bench stops starting cases 20 s before the limit; the limit is the backstop.
  run_limited "$lim" "$log" "$py" benchmarks/gpu_bench.py --out "$out/gpu_bench.json" \
    --budget-s $((lim - 20))
  rc=$?
  cap_log "$log"
  status=passed
  ((rc == 124 || rc == 137)) && status=timeout
  [[ $rc != 0 && $status == passed ]] && status=failed
  [[ $status != passed ]] && tail -n 30 "$log"
  targets="$(grep -E '^  [a-z_]+ +[-0-9.na/]+ +goal' "$log" | sed 's/  */ /g' | tr '\n' ';')"
  record bench "$status" $((SECONDS - start)) "$lim" bench.log "exit $rc${targets:+; $targets}"
fi

failed=0
gaps=0
for name in "${stage_names[@]}"; do
  case "${stage_status[$name]}" in
    failed|timeout) failed=1 ;;
    unavailable|skipped) gaps=1 ;;
  esac
done
((failed)) && finish failed 1
((gaps)) && finish "passed, with checks that could not run" 4
finish passed 0
