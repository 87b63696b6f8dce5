"""pytest-benchmark suite over the ``policy_loss`` case of :mod:`rlkern.bench` (first quick size).

Run with ``pytest bench/ --benchmark-only``. The implementations, inputs and agreement rule
are the case's own, so these numbers and ``rlkern bench`` measure the same calls. Each
implementation is checked against rlkern before it is timed, as in ``rlkern bench``.
"""

from __future__ import annotations

import re

import pytest
import torch

from rlkern.bench import allocator
from rlkern.bench.cases import FLOOR, RLKERN, CaseOptions, Impl, Outputs, get_case
from rlkern.bench.check import compare

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASE = get_case("policy_loss", CaseOptions(device=DEVICE))
SIZE = CASE.quick_sizes[0]
DTYPE = torch.float32  # the case makes fp32 inputs whatever the dtype
ROUNDS = 5


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9+.]+", "_", text).strip("_")


PARAMS = [
    pytest.param(mode, impl, id=f"{mode}-{_slug(impl.name)}")
    for mode in CASE.modes
    for impl in CASE.implementations(mode)
]


@pytest.fixture(scope="module")
def inputs() -> object:
    allocator.for_timing()  # the allocator settings `rlkern bench` times with
    return CASE.make_inputs(SIZE, DTYPE, DEVICE)


@pytest.fixture(scope="module")
def references(inputs: object) -> dict[str, Outputs]:
    """rlkern's outputs per mode: what every other implementation must agree with."""
    return {
        mode: next(i for i in CASE.implementations(mode) if i.role == RLKERN).fn(inputs)
        for mode in CASE.modes
    }


@pytest.mark.parametrize(("mode", "impl"), PARAMS)
def test_policy_loss(benchmark, inputs: object, references: dict[str, Outputs], mode: str,
                  impl: Impl) -> None:
    if impl.skip:
        pytest.skip(impl.skip)
    out = impl.fn(inputs)  # also the first (warm-up) call: compilation happens here
    if impl.role not in (FLOOR, RLKERN):
        check = compare(out, references[mode], CASE.tolerances)
        assert check.ok, f"{impl.name} disagrees with rlkern: {check.message}"
        benchmark.extra_info["check"] = check.message
    del out
    benchmark.group = f"policy_loss {mode} {SIZE.label()} {str(DTYPE).removeprefix('torch.')}"
    benchmark.extra_info.update(size=dict(SIZE.dims), role=impl.role, note=impl.note)
    benchmark.pedantic(impl.fn, args=(inputs,), rounds=ROUNDS, iterations=1,
                       warmup_rounds=max(0, impl.warmup - 1))
