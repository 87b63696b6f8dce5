// CPU kernel of the optimal token baseline (see token_baseline.h): one task per group, the
// group's G and W rows in a per-thread double scratch, then the position-wise (or rank-wise)
// sums and one write per element. Group sums run over the group's rows in row order, so the
// result does not depend on the thread count.
#include "cpu/token_baseline.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/group_index.h"

namespace rlkern::cpu {
namespace {

constexpr int64_t kGrainElems = 1 << 16;  // elements per task at least (small batches: 1 thread)

Grouping make_grouping(TokenGrouping g, int64_t n, int32_t* row_group) {
  if (g.group_ids == nullptr) return contiguous_grouping(n, g.group_size);
  return group_by_keys<1, float>(g.group_ids, nullptr, n, nullptr, row_group, nullptr);
}

template <typename T>
void run(const TokenBaselineArgs& a) {
  const int64_t n = a.n, t_len = a.t;
  const T* r = static_cast<const T*>(a.rewards);
  const T* lp = static_cast<const T*>(a.logprobs);
  const T* sp = static_cast<const T*>(a.sum_pi_squared);
  const T* rho = static_cast<const T*>(a.is_weights);
  const uint8_t* valid = a.valid;
  T* adv = static_cast<T*>(a.advantages);
  T* ret = static_cast<T*>(a.returns);

  std::vector<int32_t> row_group(size_t(std::max<int64_t>(n, 1)));
  const Grouping grouping = make_grouping(a.grouping, n, row_group.data());
  const GroupRows gr = group_rows(grouping, n);
  const int64_t groups_per_task = std::max<int64_t>(
      1, kGrainElems * grouping.num_groups / std::max<int64_t>(1, n * t_len));

  at::parallel_for(0, grouping.num_groups, groups_per_task, [&](int64_t begin, int64_t end) {
    // Per group: G and W of each member at aligned index k (compacted for TIR-OTB), the
    // member's number of valid tokens, and the group's sums over k.
    std::vector<double> g_buf, w_buf;
    std::vector<double> num(static_cast<size_t>(t_len)), den(static_cast<size_t>(t_len));
    std::vector<int64_t> len, members;
    for (int64_t g = begin; g < end; ++g) {
      const int64_t* rows = gr.rows.data() + gr.offsets[g];
      const int64_t count = gr.offsets[g + 1] - gr.offsets[g];
      g_buf.assign(size_t(count * t_len), 0.0);
      w_buf.assign(size_t(count * t_len), 0.0);
      len.assign(size_t(count), 0);
      for (int64_t m = 0; m < count; ++m) {
        const int64_t base = rows[m] * t_len;
        double* gm = g_buf.data() + m * t_len;
        double* wm = w_buf.data() + m * t_len;
        int64_t valid_count = 0;
        for (int64_t t = 0; t < t_len; ++t) valid_count += valid[base + t] != 0;
        len[m] = valid_count;
        // Reward-to-go, written for every position (verl's returns), stored at k.
        double carry = 0.0;
        int64_t k = valid_count;
        for (int64_t t = t_len - 1; t >= 0; --t) {
          const bool v = valid[base + t] != 0;
          if (v) carry += double(r[base + t]);
          ret[base + t] = T(carry);
          if (v) gm[a.multi_turn ? --k : t] = carry;
        }
        // Cumulative path-variance proxy, stored at k.
        double acc = 0.0;
        k = 0;
        for (int64_t t = 0; t < t_len; ++t) {
          if (valid[base + t] == 0) continue;
          double w = 1.0 - 2.0 * std::exp(double(lp[base + t])) + double(sp[base + t]);
          if (rho != nullptr) {
            const double p = double(rho[base + t]);
            w *= p * p;
          }
          acc += w;
          wm[a.multi_turn ? k++ : t] = acc;
        }
      }
      // Members of the group: TIR-OTB leaves rows without valid tokens out.
      members.clear();
      for (int64_t m = 0; m < count; ++m)
        if (!a.multi_turn || len[m] > 0) members.push_back(m);
      const int64_t size = int64_t(members.size());
      std::fill(num.begin(), num.end(), 0.0);
      std::fill(den.begin(), den.end(), 0.0);
      int64_t tail_member = -1, tail_from = t_len;  // the zero-tail row and its first index
      if (size >= 2) {
        // G and W are 0 at the invalid entries of g_buf / w_buf: plain sums over members.
        for (int64_t m : members) {
          const double* gm = g_buf.data() + m * t_len;
          const double* wm = w_buf.data() + m * t_len;
          const int64_t base = rows[m] * t_len;
          for (int64_t k = 0; k < t_len; ++k) {
            const bool v = a.multi_turn ? k < len[m] : valid[base + k] != 0;
            if (!v) continue;
            num[size_t(k)] += gm[k] * wm[k];
            den[size_t(k)] += wm[k];
          }
        }
        if (a.zero_tail) {
          int64_t longest = -1, second = -1, at_longest = 0;
          for (int64_t m : members) {
            if (len[m] > longest) {
              second = longest;
              longest = len[m];
              at_longest = 1;
              tail_member = m;
            } else if (len[m] == longest) {
              ++at_longest;
              second = longest;
            } else if (len[m] > second) {
              second = len[m];
            }
          }
          if (at_longest == 1 && longest > second) {
            tail_from = second;
          } else {
            tail_member = -1;
          }
        }
      }
      for (int64_t m = 0; m < count; ++m) {
        const int64_t base = rows[m] * t_len;
        const double* gm = g_buf.data() + m * t_len;
        const bool baseline = size >= 2 && (!a.multi_turn || len[m] > 0);
        int64_t k = 0;
        for (int64_t t = 0; t < t_len; ++t) {
          if (valid[base + t] == 0) {
            adv[base + t] = T(0);
            continue;
          }
          const int64_t kk = a.multi_turn ? k++ : t;
          double b = 0.0;
          if (baseline && !(m == tail_member && kk >= tail_from))
            b = num[size_t(kk)] / (den[size_t(kk)] + a.eps);
          adv[base + t] = T(gm[kk] - b);
        }
      }
    }
  });
}

}  // namespace

void optimal_token_baseline(const TokenBaselineArgs& args) {
  if (args.n == 0 || args.t == 0) return;
  if (args.f64)
    run<double>(args);
  else
    run<float>(args);
}

}  // namespace rlkern::cpu
