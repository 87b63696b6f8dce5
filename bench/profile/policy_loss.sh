#!/usr/bin/env bash
# Builds bench/profile/policy_loss.cpp with csrc/cpu/policy_loss.cpp (as CMakeLists.txt compiles
# it: -ffp-contract=off) and runs it: ns per valid token of the policy loss's CPU forward on one
# thread, streamed and in L2.
#   bench/profile/policy_loss.sh [B]    # PERF=1, SRC=<dir>: see common.sh
source "$(dirname "$0")/common.sh"
out="${TMPDIR:-/tmp}/rlkern_profile_policy_loss${SRC:+_src}"
profile_build "$out" "-std=c++17 -fopenmp -ffp-contract=off" "$here/policy_loss.cpp" \
  "$src/csrc/cpu/policy_loss.cpp"
profile_run "$out" "${1:-4096}"
