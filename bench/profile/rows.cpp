// Per-row cost of the CPU row kernels on one thread, rows streamed from memory: a bare read,
// the token-logprobs fold, and the sampler's kept-set search with each filter; and two
// arithmetic-only rows with no memory traffic (the data stays in L1): the fold's own
// instructions, and the least any exact fp32 softmax needs here — one 2^x and one add per
// logit, V of them (the "arithmetic floor"); the fold + entropy of rows with −inf in every block
// (the exact path, as masked logits take it); and the backward's row (grad_row, one read and one
// write) next to a plain copy of the row into an already-written buffer. Built and run by
// bench/profile/rows.sh; the figures and a perf profile are in docs/benchmarks.md ("Where the
// CPU time goes").
//
//   rows [rows=512]     bf16 rows of V = 151,936 logits (σ = 4, as the bench's peaked_logits),
//                       512 rows = 156 MB, well beyond the last-level cache.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "bf16_rows.h"
#include "cpu/kept_set.h"

using namespace rlkern::cpu;
using namespace rlkern::cpu::sampler;

int main(int argc, char** argv) {
  constexpr int64_t V = 151936;
  constexpr double T = 0.7;
  const int64_t R = argc > 1 ? std::atol(argv[1]) : 512;
  const std::vector<uint16_t> x = normal_bf16_rows(R, V, float_to_bf16);
  // An L1-resident block of the row's values as fp32, shifted by its max, for the 2^x row.
  alignas(64) static float l1_block[kBlock];
  for (int64_t i = 0; i < kBlock; ++i) l1_block[i] = bf16_to_float(x[i]) - 20.0f;
  // The same rows with one logit in a thousand set to −inf (bf16 0xff80).
  std::vector<uint16_t> masked(x);
  for (int64_t i = 0; i < R * V; i += 997) masked[i] = 0xff80;
  Scratch s(V);
  std::vector<uint16_t> g(R * V, 0);  // the backward's output, written once before any timing
  const RowGrad rg{0.0, 20.0, 15.0, -0.5, 0.3, 1.0};  // shift 0, lse 20 (a moderate row)
  double sink = 0.0;
  auto filtered = [&](RowFilter f) {
    return [&s, &sink, f](const uint16_t* row) {
      const KeptRow k = filter_row(row, DType::kBFloat16, V, f, s);
      sink += double(draw(s, k, V, 0.37));
    };
  };
  const std::vector<std::pair<std::string, std::function<void(const uint16_t*)>>> cases = {
      {"read (vector max)", [&](const uint16_t* row) {
         VecF m = VecF::set1(-1e30f);
         for (int64_t i = 0; i + W <= V; i += W) m = VecF::max(m, VecF::load(row + i, BF16{}));
         sink += m.reduce_max();
       }},
      {"fold (token_logprobs)", [&](const uint16_t* row) {
         RowState st = rlkern::softmax_stats_empty<double>();
         fold_row<BF16, false, false>(row, V, row_scale(T), st);
         sink += st.s;
       }},
      {"fold + entropy", [&](const uint16_t* row) {
         RowState st = rlkern::softmax_stats_empty<double>();
         fold_row<BF16, true, false>(row, V, row_scale(T), st);
         sink += st.t;
       }},
      // The arithmetic-only rows: the same row-sized work on one L1-resident block.
      {"fold + entropy, 0.1 % -inf", [&](const uint16_t* row) {
         // a masked row: −inf in every block; with the entropy the blocks take the exact path
         RowState st = rlkern::softmax_stats_empty<double>();
         const uint16_t* m = masked.data() + (row - x.data());
         fold_row<BF16, true, false>(m, V, row_scale(T), st);
         sink += st.t;
       }},
      {"fold, block in L1", [&](const uint16_t* row) {
         RowState st = rlkern::softmax_stats_empty<double>();
         for (int64_t b = 0; b < V; b += kBlock)
           fold_row<BF16, false, false>(x.data(), std::min(kBlock, V - b), row_scale(T), st);
         sink += st.s + double(row[0]);
       }},
      {"2^x + add only, in L1", [&](const uint16_t* row) {
         VecF acc = VecF::set1(0.0f);
         const VecF C = VecF::set1(row_scale(T).c), lo = VecF::set1(kExp2Min);
         for (int64_t b = 0; b < V; b += kBlock)
           for (int64_t i = 0; i + W <= std::min(kBlock, V - b); i += W)
             acc = acc + VecF::exp2(VecF::max(lo, VecF::load(l1_block + i) * C));
         sink += acc.reduce_add() + double(row[0]);
       }},
      {"copy (read + write)", [&](const uint16_t* row) {
         std::memcpy(g.data() + (row - x.data()), row, V * sizeof(uint16_t));
       }},
      {"backward (grad_row)", [&](const uint16_t* row) {
         grad_row<BF16>(row, g.data() + (row - x.data()), V, 5, rg, row_scale(T));
       }},
      {"sample: no filter", filtered({T, V, 1.0, 0.0, false})},
      {"sample: no filter, no entropy", filtered({T, V, 1.0, 0.0, false, false})},
      {"sample: top-p 0.9", filtered({T, V, 0.9, 0.0, false})},
      {"sample: min-p 0.05", filtered({T, V, 1.0, 0.05, false})},
      {"sample: top-k 50", filtered({T, 50, 1.0, 0.0, false})},
      {"sample: top-k 50 + top-p 0.9", filtered({T, 50, 0.9, 0.0, false})},
  };
  double read_us = 0.0;
  std::printf("%-30s %10s %8s %8s\n", "one thread, bf16 V=151936", "us / row", "GB/s", "x read");
  for (const auto& [name, fn] : cases) {
    double best = 1e30;
    for (int rep = 0; rep < 5; ++rep) {  // the best of 5 sweeps over all rows
      const auto a = std::chrono::steady_clock::now();
      for (int64_t r = 0; r < R; ++r) fn(x.data() + r * V);
      const auto b = std::chrono::steady_clock::now();
      best = std::min(best, std::chrono::duration<double, std::micro>(b - a).count() / R);
    }
    if (read_us == 0.0) read_us = best;
    std::printf("%-30s %10.1f %8.1f %8.2f\n", name.c_str(), best, V * 2.0 / best / 1e3,
                best / read_us);
  }
  return sink == 12345.678 ? 1 : 0;  // keeps the work observable
}
