#!/usr/bin/env bash
# Builds bench/profile/gigpo.cpp with GiGPO's sources (token_advantages.cpp, and advantages.cpp
# for the helpers it links against; OpenMP and GNU C++17, as the extension is built) and runs
# it: the cost of each pass of GiGPO's float32 path.
#   bench/profile/gigpo.sh [S] [threads] [states] [hashed|dense]   # PERF=1, SRC=: common.sh
source "$(dirname "$0")/common.sh"
out="${TMPDIR:-/tmp}/rlkern_profile_gigpo${SRC:+_src}"
profile_build "$out" "-fopenmp -std=gnu++17" "$here/gigpo.cpp" \
  "$src/csrc/cpu/token_advantages.cpp" "$src/csrc/cpu/advantages.cpp"
profile_run "$out" "${1:-65536}" "${2:-2}" "${3:-16}" "${4:-hashed}"
