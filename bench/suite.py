"""One pytest-benchmark suite per ``rlkern.bench`` case, built from the case itself.

``make_suite(name, dtype)`` returns the ``inputs`` / ``references`` fixtures and the
parametrized test for case ``name`` (its first quick size): the implementations, inputs and
agreement rule are the case's own, so these numbers and ``rlkern bench`` measure the same calls.
Each implementation is checked against rlkern before it is timed, as in ``rlkern bench``.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
import torch

from rlkern.bench import allocator
from rlkern.bench.cases import (
    FLOOR,
    RLKERN,
    CaseOptions,
    Impl,
    ImplUnavailableError,
    Outputs,
    get_case,
)
from rlkern.bench.check import compare

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ROUNDS = 5


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9+.]+", "_", text).strip("_")


def make_suite(name: str, dtype: torch.dtype) -> tuple[Callable, Callable, Callable]:
    case = get_case(name, CaseOptions(device=DEVICE))
    size = case.quick_sizes[0]
    params = [
        pytest.param(mode, impl, id=f"{mode}-{_slug(impl.name)}")
        for mode in case.modes
        for impl in case.implementations(mode)
    ]

    @pytest.fixture(scope="module")
    def inputs() -> object:
        allocator.for_timing()  # the allocator settings `rlkern bench` times with
        return case.make_inputs(size, dtype, DEVICE)

    @pytest.fixture(scope="module")
    def references(inputs: object) -> dict[str, Outputs]:
        """rlkern's outputs per mode: what every other implementation must agree with."""
        return {
            mode: next(i for i in case.implementations(mode) if i.role == RLKERN).fn(inputs)
            for mode in case.modes
        }

    @pytest.mark.parametrize(("mode", "impl"), params)
    def test_case(benchmark, inputs: object, references: dict[str, Outputs], mode: str,
                  impl: Impl) -> None:
        if impl.skip:
            pytest.skip(reason=impl.skip)
        try:
            out = impl.fn(inputs)  # also the first (warm-up) call: compilation happens here
        except ImplUnavailableError as exc:  # a peer that cannot run here (e.g. verl absent)
            pytest.skip(reason=str(exc))
        if impl.role not in (FLOOR, RLKERN):
            check = compare(out, references[mode], case.tolerances)
            assert check.ok, f"{impl.name} disagrees with rlkern: {check.message}"
            benchmark.extra_info["check"] = check.message
        del out
        benchmark.group = f"{name} {mode} {size.label()} {str(dtype).removeprefix('torch.')}"
        benchmark.extra_info.update(size=dict(size.dims), role=impl.role, note=impl.note)
        benchmark.pedantic(impl.fn, args=(inputs,), rounds=ROUNDS, iterations=1,
                           warmup_rounds=max(0, impl.warmup - 1))

    return inputs, references, test_case
