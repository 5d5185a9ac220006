#!/usr/bin/env bash
# Compile check of the CUDA sources; needs nvcc but no GPU.
#
# Every csrc/cuda/*.cu is built for sm_80 and sm_90 with the macros that
# torch's CUDA extension build defines, all warnings as errors, and ptxas
# resource reports.  Fails on any compiler warning or error, and on any
# register spill in our kernels ("N bytes spill stores/loads" with N > 0).
# The torch binding (csrc/cuda/*.cpp) is compiled for syntax and types
# against the installed torch headers.  The compilers run in parallel.
# Exits 0 with a message when nvcc is not installed.
set -euo pipefail
cd "$(dirname "$0")/.."

nvcc_bin="${NVCC:-}"
if [[ -z "$nvcc_bin" ]]; then
  if command -v nvcc >/dev/null 2>&1; then
    nvcc_bin="$(command -v nvcc)"
  elif [[ -n "${CUDA_HOME:-}" && -x "${CUDA_HOME}/bin/nvcc" ]]; then
    nvcc_bin="${CUDA_HOME}/bin/nvcc"
  elif [[ -x /usr/local/cuda/bin/nvcc ]]; then
    nvcc_bin=/usr/local/cuda/bin/nvcc
  fi
fi
if [[ -z "$nvcc_bin" ]]; then
  echo "check_cuda: nvcc not found; CUDA compile check skipped"
  exit 0
fi

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT

nvcc_flags=(
  -std=c++17 -O3 -I csrc
  -gencode arch=compute_80,code=sm_80
  -gencode arch=compute_90,code=sm_90
  -Xptxas -v
  -Werror all-warnings
  -Xcompiler -Wall,-Wextra,-Werror,-fPIC
  # What torch.utils.cpp_extension passes to nvcc: the kernels must build
  # without implicit half/bfloat16 conversions and operators.
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
  -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
  --expt-relaxed-constexpr
)

shopt -s nullglob
cu_sources=(csrc/cuda/*.cu)
cpp_sources=(csrc/cuda/*.cpp)
if [[ ${#cu_sources[@]} -eq 0 ]]; then
  echo "check_cuda: no csrc/cuda/*.cu files"
  exit 1
fi
echo "check_cuda: $("$nvcc_bin" --version | tail -n 1)"

# The binding needs torch's headers.  A CPU build of torch ships the c10/cuda
# headers too, except one that CUDA builds generate (cuda_cmake_macros.h); a
# stand-in for it is enough for a syntax check.
py="${PYTHON:-python3}"
torch_include="$("$py" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "include"))' 2>/dev/null || true)"
torch_version="$("$py" -c 'import torch; print(torch.__version__)' 2>/dev/null || true)"
cuda_include=""
for candidate in "${CUDA_HOME:-/nonexistent}/include" \
    "$(dirname "$(dirname "$(readlink -f "$nvcc_bin")")")/include" /usr/local/cuda/include; do
  if [[ -z "$cuda_include" && -f "$candidate/cuda_runtime_api.h" ]]; then cuda_include="$candidate"; fi
done
check_cpp=0
if [[ -n "$torch_include" && -f "$torch_include/c10/cuda/CUDAGuard.h" && -n "$cuda_include" ]]; then
  check_cpp=1
  mkdir -p "$scratch/shim/c10/cuda/impl"
  if [[ ! -f "$torch_include/c10/cuda/impl/cuda_cmake_macros.h" ]]; then
    printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' >"$scratch/shim/c10/cuda/impl/cuda_cmake_macros.h"
  fi
fi

# Launch every compile, then read the logs.
start=$SECONDS
for src in "${cu_sources[@]}"; do
  name="$(basename "$src")"
  ( set +e; "$nvcc_bin" "${nvcc_flags[@]}" -c "$src" -o "$scratch/$name.o" >"$scratch/$name.log" 2>&1
    echo $? >"$scratch/$name.rc" ) &
done
if [[ $check_cpp -eq 1 ]]; then
  for src in "${cpp_sources[@]}"; do
    name="$(basename "$src")"
    ( set +e; "${CXX:-g++}" -std=c++17 -fsyntax-only -Wall -Wextra -Werror -DNNSIM_WITH_CUDA=1 \
        -I csrc -isystem "$torch_include" -isystem "$torch_include/torch/csrc/api/include" \
        -isystem "$cuda_include" -isystem "$scratch/shim" "$src" >"$scratch/$name.log" 2>&1
      echo $? >"$scratch/$name.rc" ) &
  done
fi
wait
elapsed=$((SECONDS - start))

status=0
for src in "${cu_sources[@]}"; do
  name="$(basename "$src")"
  log="$scratch/$name.log"
  if [[ "$(cat "$scratch/$name.rc")" != 0 ]]; then
    echo "FAIL $src: compilation failed"
    cat "$log"
    status=1
    continue
  fi
  failed=0
  # Anything on the log besides ptxas resource reports is a diagnostic.
  if grep -v -E '^ptxas info|^ +[0-9]+ bytes stack frame' "$log" | grep -q .; then
    echo "FAIL $src: compiler diagnostics"
    grep -v -E '^ptxas info|^ +[0-9]+ bytes stack frame' "$log"
    failed=1
  fi
  # ptxas reports "Compiling entry function 'NAME' for 'sm_XX'", then the
  # function's stack/spill line, then "Used N registers".
  report="$(awk '
    /Compiling entry function/ {
      match($0, /function \047[^\047]+\047/); fn = substr($0, RSTART + 10, RLENGTH - 11)
      match($0, /for \047sm_[0-9]+\047/); arch = substr($0, RSTART + 5, RLENGTH - 6)
      spill = 0; frame = 0; next
    }
    /bytes spill stores/ {
      frame = $1; spill = $5 + $9
      next
    }
    /Used [0-9]+ registers/ && fn != "" {
      match($0, /Used [0-9]+ registers/); regs = substr($0, RSTART + 5, RLENGTH - 15)
      printf "%s %s regs=%s stack=%s %s\n", (spill > 0 ? "SPILL" : "ok"), arch, regs, frame, fn
      fn = ""
    }' "$log")"
  if grep -q '^SPILL' <<<"$report"; then
    echo "FAIL $src: register spills"
    grep '^SPILL' <<<"$report" | sed 's/^/  /'
    failed=1
  fi
  if [[ $failed -ne 0 ]]; then
    status=1
    continue
  fi
  kernels="$(grep -c . <<<"$report" || true)"
  max_regs="$(sed -n 's/.* regs=\([0-9]*\) .*/\1/p' <<<"$report" | sort -n | tail -n 1)"
  echo "ok   $src: $kernels kernel builds (sm_80 + sm_90), no spills, max ${max_regs:-0} registers"
done

if [[ $check_cpp -eq 1 ]]; then
  for src in "${cpp_sources[@]}"; do
    name="$(basename "$src")"
    if [[ "$(cat "$scratch/$name.rc")" == 0 ]]; then
      echo "ok   $src: compiles (syntax and types) against torch $torch_version headers"
    else
      echo "FAIL $src: does not compile against the torch $torch_version headers"
      cat "$scratch/$name.log"
      status=1
    fi
  done
else
  echo "check_cuda: torch or CUDA headers not found; csrc/cuda/*.cpp not checked"
fi

if [[ $status -ne 0 ]]; then
  echo "check_cuda: FAILED (${elapsed} s)"
else
  echo "check_cuda: all CUDA sources compile without warnings or spills (${elapsed} s)"
fi
exit $status
