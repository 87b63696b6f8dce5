#!/usr/bin/env bash
# Builds bench/profile/rows.cpp against the sources (headers only, plus torch's for
# ATen/Parallel.h) and runs it: per-row cost of the CPU row kernels on one thread.
#   bench/profile/rows.sh [rows]        # PERF=1, SRC=<dir>: see common.sh
source "$(dirname "$0")/common.sh"
out="${TMPDIR:-/tmp}/rlkern_profile_rows${SRC:+_src}"
profile_build "$out" "-std=c++17" "$here/rows.cpp"
profile_run "$out" "${1:-512}"
