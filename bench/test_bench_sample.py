"""pytest-benchmark suite over the ``sample`` case of :mod:`rlkern.bench` (its first quick size),
plus the micro-group scheduling numbers (simulation; not a timing).

Run with ``pytest bench/ --benchmark-only``. Sampler outputs are random draws, so they are not
compared here (exactness is tested statistically in tests/test_sample.py).
"""

from __future__ import annotations

import re

import pytest
import torch

from rlkern.bench import allocator
from rlkern.bench.cases import CaseOptions, Impl, get_case
from rlkern.bench.cases.sample import micro_group_report

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASE = get_case("sample", CaseOptions(device=DEVICE))
SIZE = CASE.quick_sizes[0]
DTYPE = torch.bfloat16
ROUNDS = 3


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9+.]+", "_", text).strip("_")


PARAMS = [
    pytest.param(mode, impl, id=f"{mode}-{_slug(impl.name)}")
    for mode in CASE.modes
    for impl in CASE.implementations(mode)
]


@pytest.fixture(scope="module")
def inputs() -> object:
    allocator.for_timing()
    return CASE.make_inputs(SIZE, DTYPE, DEVICE)


@pytest.mark.parametrize(("mode", "impl"), PARAMS)
def test_sample(benchmark, inputs: object, mode: str, impl: Impl) -> None:
    if impl.skip:
        pytest.skip(impl.skip)
    impl.fn(inputs)
    benchmark.group = f"sample {mode} {SIZE.label()} {str(DTYPE).removeprefix('torch.')}"
    benchmark.extra_info.update(size=dict(SIZE.dims), role=impl.role, note=impl.note)
    benchmark.pedantic(impl.fn, args=(inputs,), rounds=ROUNDS, iterations=1,
                       warmup_rounds=max(0, impl.warmup - 1))


def test_micro_group_schedule(benchmark) -> None:
    report = benchmark.pedantic(micro_group_report, rounds=1, iterations=1)
    benchmark.extra_info.update(report)
    assert report["step_reduction"] >= 0.25
