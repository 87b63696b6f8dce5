// Glue from tensors to the CPU epilogues of the fused linear op (see linear_logprobs_ops.h).
#include "cpu/linear_logprobs_ops.h"

#include <cmath>

#include "cpu/glue.h"
#include "cpu/linear_logprobs.h"
#include "logprobs_op.h"

namespace rlkern::cpu {
namespace {

using namespace rlkern::logprobs;

// 0 (no soft-capping) or a finite positive cap.
void check_softcap(double softcap) {
  TORCH_CHECK_VALUE(softcap == 0.0 || (std::isfinite(softcap) && softcap > 0.0),
                    "softcap must be 0 (none) or a finite positive float, got ", softcap);
}

LinearTileArgs tile_args(const at::Tensor& tile, const at::Tensor& labels, int64_t vocab_offset,
                         double temperature, int64_t ignore_index) {
  LinearTileArgs a{};
  a.tile = tile.const_data_ptr();
  a.dtype = dtype_of(tile, "tile");
  a.n = tile.size(0);
  a.vt = tile.size(1);
  a.stride_row = tile.stride(0);
  a.vocab_offset = vocab_offset;
  a.labels = labels.const_data_ptr<int64_t>();
  a.ignore_index = ignore_index;
  a.temperature = temperature;
  return a;
}

void tile_fwd(const at::Tensor& tile, const at::Tensor& labels, int64_t vocab_offset,
              double temperature, int64_t ignore_index, bool with_entropy,
              const at::Tensor& stats, double softcap) {
  check_tile(tile, labels, "tile");
  check_temperature(temperature);
  check_softcap(softcap);
  check_stats(stats, tile.size(0), tile);
  if (tile.numel() == 0) return;
  LinearTileArgs a = tile_args(tile, labels, vocab_offset, temperature, ignore_index);
  a.with_entropy = with_entropy;
  a.softcap = softcap;
  a.stats = stats.data_ptr<double>();
  linear_logprobs_tile_fwd(a);
}

void finish_out(const at::Tensor& stats, const at::Tensor& labels, double temperature,
                int64_t ignore_index, const TensorList& outputs) {
  const int64_t n = labels.numel();
  check_temperature(temperature);
  check_stats(stats, n, stats);
  checks::array(labels, "labels", n, at::kLong, stats);
  // The outputs' dtype is the hidden states' accumulation dtype, which stats do not carry:
  // take logprobs' (a malformed list is reported by fwd_outputs).
  const std::optional<at::Tensor> logprobs =
      outputs.size() == kNumOutputs ? outputs.get(kLogprobs) : std::nullopt;
  const at::ScalarType acc = logprobs.has_value() ? logprobs->scalar_type() : at::kFloat;
  TORCH_CHECK_TYPE(acc == at::kFloat || acc == at::kDouble,
                   "logprobs: expected float32 or float64, got ", acc);
  const RowPointers out = fwd_outputs(outputs, n, acc, stats, /*with_stats=*/false);
  linear_logprobs_finish(stats.const_data_ptr<double>(), labels.const_data_ptr<int64_t>(), n,
                         ignore_index, temperature, acc == at::kDouble, out);
}

void tile_bwd(const at::Tensor& tile, const at::Tensor& labels, int64_t vocab_offset,
              const TensorList& outputs, const TensorList& grad_outputs, double temperature,
              int64_t ignore_index, const at::Tensor& grad_tile,
              const std::optional<at::Tensor>& stats, double softcap) {
  check_tile(tile, labels, "tile");
  check_tile(grad_tile, labels, "grad_tile");
  check_temperature(temperature);
  check_softcap(softcap);
  TORCH_CHECK(grad_tile.sizes() == tile.sizes(), "grad_tile: expected the tile's shape ",
              tile.sizes(), ", got ", grad_tile.sizes());
  checks::dtype(grad_tile, "grad_tile", tile.scalar_type());
  const GradInputs in =
      bwd_rows(outputs, grad_outputs, tile.size(0), checks::acc_dtype(tile), tile);
  if (tile.numel() == 0) return;
  LinearTileArgs a = tile_args(tile, labels, vocab_offset, temperature, ignore_index);
  a.in = in;
  a.grad_tile = grad_tile.data_ptr();
  a.grad_stride_row = grad_tile.stride(0);
  a.softcap = softcap;
  if (stats.has_value()) {
    check_stats(*stats, tile.size(0), tile);
    a.exact_stats = stats->const_data_ptr<double>();
  }
  linear_logprobs_tile_bwd(a);
}

}  // namespace

void impl_linear_logprobs_ops(torch::Library& m) {
  m.impl(kLinearTileFwd.name, &tile_fwd);
  m.impl(kLinearFinishOut.name, &finish_out);
  m.impl(kLinearTileBwd.name, &tile_bwd);
}

}  // namespace rlkern::cpu
