"""pytest-benchmark suite over the ``advantages`` and ``gigpo`` cases of :mod:`rlkern.bench`
(their first quick size).

Run with ``pytest bench/ --benchmark-only``. The implementations, inputs and agreement rule are
the cases' own, so these numbers and ``rlkern bench`` measure the same calls. Each
implementation is checked against rlkern before it is timed, as in ``rlkern bench``; verl's
rows are skipped when verl is not installed.
"""

from __future__ import annotations

import re

import pytest
import torch

from rlkern.bench.cases import FLOOR, RLKERN, CaseOptions, Impl, ImplUnavailableError, get_case
from rlkern.bench.check import compare

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = {name: get_case(name, CaseOptions(device=DEVICE)) for name in ("advantages", "gigpo")}
ROUNDS = 5


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9+.]+", "_", text).strip("_")


PARAMS = [
    pytest.param(name, mode, impl, id=f"{name}-{_slug(mode)}-{_slug(impl.name)}")
    for name, case in CASES.items()
    for mode in case.modes
    for impl in case.implementations(mode)
]


@pytest.fixture(scope="module")
def inputs() -> dict[str, object]:
    return {name: case.make_inputs(case.quick_sizes[0], torch.float32, DEVICE)
            for name, case in CASES.items()}


@pytest.mark.parametrize(("name", "mode", "impl"), PARAMS)
def test_advantages(benchmark, inputs, name: str, mode: str, impl: Impl) -> None:
    case = CASES[name]
    if impl.skip:
        pytest.skip(impl.skip)
    inp = inputs[name]
    try:
        out = impl.fn(inp)  # also the warm-up call (verl is imported here)
    except ImplUnavailableError as exc:
        pytest.skip(str(exc))
    if impl.role not in (FLOOR, RLKERN):
        ref = next(i for i in case.implementations(mode) if i.role == RLKERN).fn(inp)
        check = compare(out, ref, case.tolerances)
        assert check.ok, f"{impl.name} disagrees with rlkern: {check.message}"
        benchmark.extra_info["check"] = check.message
    del out
    size = case.quick_sizes[0]
    benchmark.group = f"{name} {mode} {size.label()}"
    benchmark.extra_info.update(size=dict(size.dims), role=impl.role, note=impl.note)
    benchmark.pedantic(impl.fn, args=(inp,), rounds=ROUNDS, iterations=1,
                       warmup_rounds=max(0, impl.warmup - 1))
