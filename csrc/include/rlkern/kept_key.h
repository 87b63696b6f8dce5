// The sampler's kept-set numerics that the CPU (csrc/cpu/kept_set.h) and CUDA
// (rlkern/cuda_sample_row.cuh) kernels share; kernels/sample.py restates them for Triton.
//
//   order_key(z)            a monotone map of fp32 to [0, 2^32): larger z, larger key; equal
//                           values, equal keys (−0 takes +0's key: z = x − max is −0 for a
//                           logit −0 beside a max of +0, and the two tie, kept in index order
//                           as the reference's stable sort keeps them).
//   kept_log_weight(w, z)   log w of a kept token's weight w = exp(z) as the kernel formed it
//                           in fp32, or z itself where w underflowed to 0 (z below about −103):
//                           its log-prob stays finite, and every other token keeps log(w)'s
//                           bits.
//
// Torch-free, host + device.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "rlkern/host_device.h"

namespace rlkern::sample {

RLKERN_HOST_DEVICE uint32_t order_key(float z) {
  uint32_t b;
  memcpy(&b, &z, sizeof b);
  if (b == 0x80000000u) b = 0;
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

RLKERN_HOST_DEVICE double kept_log_weight(float w, double z) {
  return w > 0.0f ? ::log(double(w)) : z;
}

}  // namespace rlkern::sample
