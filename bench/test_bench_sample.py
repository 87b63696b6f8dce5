"""pytest-benchmark suite over the ``sample`` case (see bench/suite.py), plus the micro-group
scheduling numbers (simulation; not a timing).

Run with ``pytest bench/ --benchmark-only``. The case compares no outputs (draws are random;
exactness is tested statistically in tests/test_sample.py).
"""

import torch

from rlkern.bench.cases.sample import micro_group_report
from suite import make_suite

inputs, references, test_sample = make_suite("sample", torch.bfloat16)


def test_micro_group_schedule(benchmark) -> None:
    report = benchmark.pedantic(micro_group_report, rounds=1, iterations=1)
    benchmark.extra_info.update(report)
    assert report["step_reduction"] >= 0.25
