#!/usr/bin/env bash
# A paired A/B of the policy loss's CPU forward between two source trees (policy_loss_ab.cpp):
# each tree's csrc/cpu/policy_loss.cpp is built as CMakeLists.txt builds it (-ffp-contract=off),
# with rlkern renamed, and both run in one process, their calls alternating.
#   bench/profile/policy_loss_ab.sh A_DIR B_DIR [B=1024] [calls=30] [holes=0]   # THREADS=n
# A_DIR / B_DIR: trees with csrc/ (this checkout, or `git archive <commit> csrc | tar -x -C <dir>`).
source "$(dirname "$0")/common.sh"  # cxx_flags, torch_libs, $here (SRC and PERF unused)
side_a="$(cd "$1" && pwd)" side_b="$(cd "$2" && pwd)"
shift 2
out="${TMPDIR:-/tmp}/rlkern_profile_policy_loss_ab"
flags=("${cxx_flags[@]}" -std=c++17 -fopenmp)
build_side() {  # TREE SIDE: the side's kernel and its C entry points, as objects
  local tree="$1" side="$2" inc=(-I"$1/csrc" -I"$1/csrc/include" -I"$here")
  g++ "${flags[@]}" -ffp-contract=off -Drlkern="rlkern_$side" "${inc[@]}" \
    -c "$tree/csrc/cpu/policy_loss.cpp" -o "$out.kernel_$side.o"
  g++ "${flags[@]}" -Drlkern="rlkern_$side" -DSIDE="$side" "${inc[@]}" \
    -c "$here/policy_loss_ab_side.cpp" -o "$out.side_$side.o"
}
build_side "$side_a" a &
pid=$!
build_side "$side_b" b
wait "$pid"
g++ "${flags[@]}" "$here/policy_loss_ab.cpp" "$out".kernel_{a,b}.o "$out".side_{a,b}.o -o "$out" \
  "${torch_libs[@]}"
"$out" "$@"
