#!/usr/bin/env bash
# Builds bench/profile/ids.cpp against the sources (headers, plus torch's for ATen/Parallel.h,
# with OpenMP as the extension is) and runs it: the cost of each pass of the ids path.
#   bench/profile/ids.sh [N] [threads]      # add PERF=1 to record a profile (perf record -g)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$here/../.."
torch_dir="$(python -c 'import os, torch; print(os.path.dirname(torch.__file__))')"
out="${TMPDIR:-/tmp}/rlkern_profile_ids"
g++ -O3 -g -march=native -fopenmp -fno-math-errno -std=c++17 -I"$root/csrc" \
  -I"$root/csrc/include" -I"$torch_dir/include" -I"$torch_dir/include/torch/csrc/api/include" \
  "$here/ids.cpp" -o "$out" -L"$torch_dir/lib" -ltorch_cpu -lc10 -Wl,-rpath,"$torch_dir/lib"
if [[ "${PERF:-0}" == 1 ]]; then
  perf record -g -o "$out.perf" "$out" "${1:-65536}" "${2:-2}"
  perf report -i "$out.perf" --stdio --no-children | head -40
else
  "$out" "${1:-65536}" "${2:-2}"
fi
