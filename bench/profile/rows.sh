#!/usr/bin/env bash
# Builds bench/profile/rows.cpp against the sources (headers only, plus torch's for
# ATen/Parallel.h) and runs it: per-row cost of the CPU row kernels on one thread.
#   bench/profile/rows.sh [rows]        # add PERF=1 to record a profile (perf record -g)
# SRC=<dir> builds against another tree's csrc/ (an A/B against an older commit: `git archive
# <commit> csrc | tar -x -C <dir>`).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="${SRC:-$here/../..}"
torch_dir="$(python -c 'import os, torch; print(os.path.dirname(torch.__file__))')"
out="${TMPDIR:-/tmp}/rlkern_profile_rows${SRC:+_src}"
g++ -O3 -g -march=native -fno-math-errno -std=c++17 -I"$root/csrc" -I"$root/csrc/include" \
  -I"$torch_dir/include" -I"$torch_dir/include/torch/csrc/api/include" "$here/rows.cpp" \
  -o "$out" -L"$torch_dir/lib" -ltorch_cpu -lc10 -Wl,-rpath,"$torch_dir/lib"
if [[ "${PERF:-0}" == 1 ]]; then
  perf record -g -o "$out.perf" "$out" "${1:-512}"
  perf report -i "$out.perf" --stdio --no-children | head -40
else
  "$out" "${1:-512}"
fi
