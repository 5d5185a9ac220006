#!/usr/bin/env bash
# Compile check of the CUDA kernels; needs nvcc but no GPU.
#
# Every csrc/cuda/*.cu is built for sm_80 and sm_90 with the macros that
# torch's CUDA extension build defines, all warnings as errors, and ptxas
# resource reports.  Fails on any compiler warning or error, and on any
# register spill in our kernels ("N bytes spill stores/loads" with N > 0).
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

flags=(
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

status=0
shopt -s nullglob
sources=(csrc/cuda/*.cu)
if [[ ${#sources[@]} -eq 0 ]]; then
  echo "check_cuda: no csrc/cuda/*.cu files"
  exit 1
fi

echo "check_cuda: $("$nvcc_bin" --version | tail -n 1)"
for src in "${sources[@]}"; do
  name="$(basename "$src" .cu)"
  log="$scratch/$name.log"
  start=$SECONDS
  failed=0
  if ! "$nvcc_bin" "${flags[@]}" -c "$src" -o "$scratch/$name.o" >"$log" 2>&1; then
    echo "FAIL $src: compilation failed"
    cat "$log"
    status=1
    continue
  fi
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
      printf "%s %s regs=%s stack=%s spill=%s\n", (spill > 0 ? "SPILL" : "ok"), arch, regs, frame, fn
      fn = ""
    }' "$log")"
  kernels="$(grep -c . <<<"$report" || true)"
  if grep -q '^SPILL' <<<"$report"; then
    echo "FAIL $src: register spills"
    grep '^SPILL' <<<"$report" | sed 's/^/  /'
    failed=1
  fi
  if [[ $failed -ne 0 ]]; then
    status=1
    continue
  fi
  max_regs="$(sed -n 's/.* regs=\([0-9]*\) .*/\1/p' <<<"$report" | sort -n | tail -n 1)"
  echo "ok   $src: $kernels kernel builds, max ${max_regs:-0} registers, $((SECONDS - start)) s"
done

if [[ $status -ne 0 ]]; then
  echo "check_cuda: FAILED"
else
  echo "check_cuda: all CUDA sources compile for sm_80 and sm_90 without warnings or spills"
fi
exit $status
