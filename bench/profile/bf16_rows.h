// The probes' bf16 rows (rows.cpp, sample_ab.cpp): R rows of V values of N(0, 16), as the bench's
// peaked_logits. 64 random rows' worth of values are spread over all rows by a multiplicative
// hash (drawing R·V normals would take longer than the measurement). `to_bf16` rounds a float.
#pragma once

#include <algorithm>
#include <cstdint>
#include <random>
#include <vector>

inline std::vector<uint16_t> normal_bf16_rows(int64_t R, int64_t V, uint16_t (*to_bf16)(float)) {
  std::mt19937 gen(1);
  std::normal_distribution<float> normal(0.0f, 4.0f);
  std::vector<uint16_t> x(R * V);
  const int64_t pool = 64 * V;
  for (int64_t i = 0; i < std::min(pool, R * V); ++i) x[i] = to_bf16(normal(gen));
  for (int64_t i = pool; i < R * V; ++i) x[i] = x[(uint64_t(i) * 2654435761u) % pool];
  return x;
}
