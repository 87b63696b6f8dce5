#!/usr/bin/env bash
# Builds bench/profile/gigpo.cpp with GiGPO's sources (token_advantages.cpp, and advantages.cpp
# for the helpers it links against; torch's headers and libraries, OpenMP as the extension)
# and runs it: the cost of each pass of GiGPO's float32 path.
#   bench/profile/gigpo.sh [S] [threads] [states]   # add PERF=1 to record a profile
# SRC=<dir> builds against another tree's csrc/ (an A/B against an older commit: `git archive
# <commit> csrc | tar -x -C <dir>`).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
src="${SRC:-$here/../..}"
torch_dir="$(python -c 'import os, torch; print(os.path.dirname(torch.__file__))')"
out="${TMPDIR:-/tmp}/rlkern_profile_gigpo${SRC:+_src}"
g++ -O3 -g -march=native -fopenmp -fno-math-errno -std=gnu++17 -I"$src/csrc" \
  -I"$src/csrc/include" -I"$torch_dir/include" -I"$torch_dir/include/torch/csrc/api/include" \
  "$here/gigpo.cpp" "$src/csrc/cpu/token_advantages.cpp" "$src/csrc/cpu/advantages.cpp" \
  -o "$out" -L"$torch_dir/lib" -ltorch_cpu -lc10 -Wl,-rpath,"$torch_dir/lib"
if [[ "${PERF:-0}" == 1 ]]; then
  perf record -g -o "$out.perf" "$out" "${1:-65536}" "${2:-2}" "${3:-16}"
  perf report -i "$out.perf" --stdio --no-children | head -40
else
  "$out" "${1:-65536}" "${2:-2}" "${3:-16}"
fi
