"""pytest-benchmark suite over the ``micro_groups`` case (see bench/suite.py): a real
``rlkern.generate_groups`` run on a tiny random Llama per schedule, checked to give the same
completions as the length-aware schedule before it is timed.

Run with ``pytest bench/ --benchmark-only``. The scheduling figures (peak KV tokens, decode
steps, the lognormal simulation) are in ``rlkern bench --op micro_groups`` and
``test_bench_sample.py::test_micro_group_schedule``.
"""

import pytest
import torch

pytest.importorskip("transformers", reason="the micro_groups case runs a transformers Llama")

from suite import make_suite

# The tiny model runs in fp32 whatever the dtype.
inputs, references, test_micro_groups = make_suite("micro_groups", torch.float32)


def test_kv_budget_schedule(benchmark) -> None:
    """The issue 18 workload in simulation (not a timing): every schedule with and without a
    KV budget of half the full group's peak; the issue's targets."""
    from rlkern.bench.cases.sample import kv_budget_lines, kv_budget_report

    report = benchmark.pedantic(kv_budget_report, rounds=1, iterations=1)
    benchmark.extra_info.update({"kv_budget_tokens": report["kv_budget_tokens"],
                                 "peak_ratio": report["peak_ratio"],
                                 "step_reduction": report["step_reduction"]})
    budget = report["kv_budget_tokens"]
    assert all(r["peak_tokens"] <= budget for r in report["budgeted"].values())
    assert report["budgeted"]["length_aware"]["preemptions"] > 0
    assert report["peak_ratio"] <= 0.5 and report["step_reduction"] >= 0.25
    assert len(kv_budget_lines(report)) == 1 + 2 * 3 + 1
