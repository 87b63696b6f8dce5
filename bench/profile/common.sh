# Sourced by the bench/profile/*.sh scripts: builds a probe against a source tree and runs it.
# SRC=<dir> builds against another tree's csrc/ instead of this one (an A/B against an older
# commit: `git archive <commit> csrc | tar -x -C <dir>`); PERF=1 runs the probe under
# `perf record -g` and prints the top of its report; PROFILE_OPT: see cxx_flags.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[1]}")" && pwd)"
src="${SRC:-$here/../..}"
torch_dir="$(python -c 'import os, torch; print(os.path.dirname(torch.__file__))')"
# Every probe's compile flags (-O3 -march=native over torch's headers) and torch's libraries.
# PROFILE_OPT replaces "-O3 -g": the tests build with -O0, which checks that a probe builds, runs
# and prints the same bits in a fifth of the time (policy_loss.cpp: 18 s instead of 142 s);
# figures from such a build mean nothing.
read -ra opt <<< "${PROFILE_OPT:--O3 -g}"
cxx_flags=("${opt[@]}" -march=native -fno-math-errno -I"$torch_dir/include"
           -I"$torch_dir/include/torch/csrc/api/include")
torch_libs=(-L"$torch_dir/lib" -ltorch_cpu -lc10 -Wl,-rpath,"$torch_dir/lib")

# profile_build OUT CXXFLAGS FILE...: cxx_flags over the sources' headers (CXXFLAGS: each
# probe's language standard and OpenMP, as its comments say), linked to torch.
profile_build() {
  local out="$1" flags="$2"
  shift 2
  # shellcheck disable=SC2086  # flags are words
  g++ "${cxx_flags[@]}" $flags -I"$src/csrc" -I"$src/csrc/include" "$@" -o "$out" \
    "${torch_libs[@]}"
}

# profile_run OUT ARG...
profile_run() {
  local out="$1"
  shift
  if [[ "${PERF:-0}" == 1 ]]; then
    perf record -g -o "$out.perf" "$out" "$@"
    perf report -i "$out.perf" --stdio --no-children | head -40
  else
    "$out" "$@"
  fi
}
