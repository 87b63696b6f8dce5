// The median wall time of `calls` calls of f, in µs: the probes' one timing rule (the data stay
// in the caches between calls, so it is a pass's own cost, not a cold call's).
#pragma once

#include <algorithm>
#include <chrono>
#include <vector>

template <typename F>
double median_us(const F& f, int calls = 100) {
  std::vector<double> t;
  for (int r = 0; r < calls; ++r) {
    const auto a = std::chrono::steady_clock::now();
    f();
    t.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - a)
                    .count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}
