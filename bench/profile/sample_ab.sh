#!/usr/bin/env bash
# A paired A/B of the sampler's CPU row between two source trees (sample_ab.cpp): each tree's
# csrc/cpu/kept_set.h is built into sample_ab_side.cpp with rlkern renamed, and both run in one
# process, their passes alternating.
#   bench/profile/sample_ab.sh A_DIR B_DIR [rows=128] [passes=30]
# A_DIR / B_DIR: trees with csrc/ (this checkout, or `git archive <commit> csrc | tar -x -C <dir>`).
source "$(dirname "$0")/common.sh"  # cxx_flags, $here (SRC and PERF unused)
side_a="$(cd "$1" && pwd)" side_b="$(cd "$2" && pwd)"
shift 2
out="${TMPDIR:-/tmp}/rlkern_profile_sample_ab"
flags=("${cxx_flags[@]}" -std=c++17)
build_side() {  # TREE SIDE
  g++ "${flags[@]}" -Drlkern="rlkern_$2" -DSIDE="$2" -I"$1/csrc" -I"$1/csrc/include" \
    -c "$here/sample_ab_side.cpp" -o "$out.side_$2.o"
}
build_side "$side_a" a &
pid=$!
build_side "$side_b" b
wait "$pid"
g++ "${flags[@]}" -I"$side_a/csrc" -I"$side_a/csrc/include" "$here/sample_ab.cpp" \
  "$out".side_{a,b}.o -o "$out"
"$out" "$@"
