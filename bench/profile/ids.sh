#!/usr/bin/env bash
# Builds bench/profile/ids.cpp against the sources (headers, plus torch's for ATen/Parallel.h,
# with OpenMP as the extension is) and runs it: the cost of each pass of the ids path.
#   bench/profile/ids.sh [N] [threads]      # PERF=1, SRC=<dir>: see common.sh
source "$(dirname "$0")/common.sh"
out="${TMPDIR:-/tmp}/rlkern_profile_ids${SRC:+_src}"
profile_build "$out" "-fopenmp -std=c++17" "$here/ids.cpp"
profile_run "$out" "${1:-65536}" "${2:-2}"
