// torch's eager CPU ops on 16-bit logits, reproduced bit for bit (torch-free interface).
//
// A trainer that computes log-probabilities or an entropy in the logits' 16-bit dtype (TRL's
// selective_log_softmax and entropy_from_logits on the CPU) gets values that every op has
// rounded to that dtype. The drop-ins return the same bits, from rlkern's fold and these two
// kernels, without the trainer's (N, V) temporaries. round16 is round-to-nearest-even into bf16
// or fp16; exp and log are Sleef's expf_u10 / logf_u10, which torch's vector kernels call.
//
// log_softmax_stats_16bit: per row, what torch's log_softmax (LogSoftmaxKernelImpl.h,
// serial_vec_log_softmax_lastdim_range) keeps between its passes:
//   m     = max_v x_v
//   S     = Σ_v exp(x_v − m)   in float, in torch's order: two vector accumulators over
//           blocks of 2·L logits (L float lanes: 16 with AVX-512, 8 with AVX2), the tail
//           blended in lane by lane, the two added, then a butterfly over the lanes; a row
//           shorter than 2·L is summed lane after lane (vec_reduce_all's slow path)
//   log_s = round16(log(round16(S)))
// so that log_softmax(x)_v = round16((x_v − m) − log_s). Exact where the build's vector width
// is the one torch dispatches to (both AVX-512 here); a build without Sleef's entry points in
// libtorch_cpu takes std::exp / std::log, which can differ in the last bit.
//
// entropy_terms_16bit: the terms of `-(exp(lp) * lp).sum(-1)` with lp that log_softmax:
//   t_v = round16(round16(exp(lp_v)) · lp_v)   (the product is exact in float)
// A logit at −inf gives t_v = 0, the limit of p·log p (torch's ops give 0 · (−inf) = NaN). The
// sum is left to torch, whose reduction order is its own.
#pragma once

#include <cstdint>

#include "cpu/logprobs.h"  // LogitsLayout

namespace rlkern::cpu {

// Both kernels read the B·L rows of a LogitsLayout (bf16 or fp16 logits, any (B, L) strides,
// so a trainer's view such as logits[:, :-1, :] is read in place); row r is (r / L, r % L).

// Fills shift (m) and log_s, float32 (B·L,). Threads split the rows.
void log_softmax_stats_16bit(const LogitsLayout& rows, float* shift, float* log_s);

// Fills terms, (count, V) contiguous in the logits' dtype, for the rows first … first + count
// from each row's m (shift) and log_s as log_softmax_stats_16bit gives them (shift and log_s
// point at row `first`'s). Threads split the rows.
void entropy_terms_16bit(const LogitsLayout& rows, int64_t first, int64_t count,
                         const float* shift, const float* log_s, void* terms);

}  // namespace rlkern::cpu
