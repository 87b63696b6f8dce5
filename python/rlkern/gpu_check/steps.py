"""Steps b and c of ``rlkern gpu-check``: the device test suite and the timings.

* :func:`run_tests` — pytest in a subprocess on a chosen list of test files, with
  ``RLKERN_TEST_DEVICE`` set (the device suite ``tests/test_device_backends.py`` puts its
  tensors there; the ``*_triton.py`` files use CUDA tensors wherever CUDA is available), bounded
  by a timeout; pass / fail / skip counts from its JUnit XML.
* :func:`run_bench` — every op case of ``rlkern bench`` through its Python API
  (:func:`rlkern.bench.runner.run_case`, with the noise rule), for each rlkern backend, and
  each timed median against the bandwidth floor: the bytes the case's floor moves
  (:func:`rlkern.bench.traffic.count_traffic`) divided by the machine's peak bandwidth.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

#: Test files run on the GPU: the device suite (every compiled backend on CUDA tensors) and
#: the Triton suites, which use CUDA tensors when CUDA is available. Nothing here compiles
#: the extension (test_cuda_compile.py and friends are left out: they build).
GPU_TEST_FILES = (
    "tests/test_device_backends.py",
    "tests/test_logprobs_triton.py",
    "tests/test_linear_logprobs_triton.py",
    "tests/test_advantages_triton.py",
)
#: The dry run's stand-in: the device suite on CPU tensors, a few fast tests of it.
DRY_RUN_TEST_FILES = ("tests/test_device_backends.py",)
DRY_RUN_K = "group_advantages"

#: Cases timed: every op (micro_groups times a model's generation schedules, not an op).
NOT_OPS = frozenset({"micro_groups"})
#: Ops with no CUDA C++ kernels (Triton only on GPUs): left out of the ``cuda`` backend pass.
TRITON_ONLY = frozenset({"linear_logprobs", "linear_grpo_loss"})
#: Dry run: each dim of a case's quick sizes capped at this (CPU stand-in sizes).
DRY_RUN_DIM = 64


def repo_root() -> Path | None:
    """The source tree rlkern was imported from (its ``tests/`` beside ``python/``), if any."""
    import rlkern

    root = Path(rlkern.__file__).resolve().parents[2]
    return root if (root / "tests" / "conftest.py").exists() else None


def _counts(junit: Path) -> dict[str, int] | None:
    """tests / failures / errors / skipped (and passed) summed over a JUnit XML's suites."""
    if not junit.exists():
        return None
    root = ET.parse(junit).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = {k: sum(int(s.get(k, 0)) for s in suites)
             for k in ("tests", "failures", "errors", "skipped")}
    total["passed"] = total["tests"] - total["failures"] - total["errors"] - total["skipped"]
    return total


_PROGRESS = re.compile(r"^([.FEsxX]+)\s*(\[\s*\d+%\])?$")


def _progress_counts(log: str) -> dict[str, int]:
    """Counts from pytest's ``-q`` progress lines (``..F.s  [ 40%]``): what a run stopped by
    the timeout got through (its JUnit XML is never written)."""
    chars = "".join(m.group(1) for line in log.splitlines()
                    if (m := _PROGRESS.match(line.strip())))
    failures, errors, skipped = chars.count("F"), chars.count("E"), chars.count("s")
    return {"tests": len(chars), "failures": failures, "errors": errors, "skipped": skipped,
            "passed": len(chars) - failures - errors - skipped}


def run_tests(out_dir: Path, *, device: str, files: tuple[str, ...], k: str | None,
              timeout_s: float, name: str = "device suite") -> dict[str, Any]:
    """Run pytest on ``files`` (relative to the source tree) with ``RLKERN_TEST_DEVICE=device``;
    the log and JUnit XML go to ``out_dir``. Returns what the report shows."""
    root = repo_root()
    record: dict[str, Any] = {"name": name, "device": device, "files": list(files), "k": k,
                              "timeout_s": timeout_s}
    if root is None:
        record.update(status="skipped", reason="no source tree with tests/ beside the rlkern "
                      "that was imported (an installed wheel): nothing to run")
        return record
    missing = [f for f in files if not (root / f).exists()]
    if missing:
        raise FileNotFoundError(f"test files not found under {root}: {missing}")
    junit, log = out_dir / "pytest_junit.xml", out_dir / "pytest.log"
    import rlkern

    python_dir = str(Path(rlkern.__file__).resolve().parents[1])
    env = dict(os.environ, RLKERN_TEST_DEVICE=device,
               PYTHONPATH=os.pathsep.join(p for p in (python_dir, os.environ.get("PYTHONPATH"))
                                          if p))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE",
           f"--junitxml={junit}", *files, *(["-k", k] if k else [])]
    record["command"] = " ".join(cmd[1:])
    start = time.perf_counter()
    with open(log, "w") as log_file:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log_file,
                                stderr=subprocess.STDOUT)
        try:
            record["returncode"] = proc.wait(timeout=timeout_s)
            record["timed_out"] = False
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            record.update(returncode=None, timed_out=True)
    record["seconds"] = round(time.perf_counter() - start, 1)
    text = log.read_text(errors="replace")
    record["counts"] = _counts(junit)
    if record["counts"] is None and record["timed_out"]:
        record["counts"] = {**_progress_counts(text), "partial": True}
    record["log"] = str(log)
    record["log_tail"] = text.splitlines()[-15:]
    ok = record["returncode"] == 0 and record["counts"] is not None
    record["status"] = "ok" if ok else "failed"
    if record["timed_out"]:
        record["reason"] = (f"pytest ran past {timeout_s:g} s and was stopped; counts are of "
                            "the tests it finished")
    return record


def _tiny(sizes: list[Any]) -> list[Any]:
    from rlkern.bench.cases import Size

    return [Size({k: min(v, DRY_RUN_DIM) for k, v in s.dims.items()}) for s in sizes[:1]]


def _hbm_floor(case: Any, size: Any, mode: str, dtype: torch.dtype, device: torch.device,
               bytes_per_s: float) -> dict[str, Any]:
    """Bytes the case's floor moves at ``size`` in ``mode`` and their time at ``bytes_per_s``."""
    from rlkern.bench.cases import FLOOR
    from rlkern.bench.traffic import count_traffic

    floor = next((i for i in case.implementations(mode) if i.role == FLOOR), None)
    if floor is None:
        return {"hbm_floor_s": None, "floor_bytes": None, "why": "the case has no floor"}
    inputs = case.make_inputs(size, dtype, device)
    traffic = count_traffic(lambda: floor.fn(inputs))
    if traffic.compute_bound:
        return {"hbm_floor_s": None, "floor_bytes": traffic.total,
                "why": "compute-bound floor (matmuls): compare with the measured floor"}
    return {"hbm_floor_s": traffic.total / bytes_per_s, "floor_bytes": traffic.total}


def _time_case(case: Any, *, device: torch.device, dry_run: bool, bytes_per_s: float,
               budget_s: float, peers: bool) -> list[dict[str, Any]]:
    """Rows of one case: its measurements (JSON-ready) with the bandwidth floor and ratio."""
    from rlkern.bench.cases import CaseOptions
    from rlkern.bench.runner import DEFAULT_MAX_IQR, DEFAULT_MAX_REPEATS, OK, run_case

    dtype = CaseOptions().dtype
    sizes = _tiny(case.quick_sizes) if dry_run else case.quick_sizes
    measured = run_case(
        case, sizes=sizes, repeats=3 if dry_run else 5, budget_s=budget_s, device=device,
        dtype=dtype, only=None if peers and not dry_run else (), max_iqr=DEFAULT_MAX_IQR,
        max_repeats=3 if dry_run else DEFAULT_MAX_REPEATS)
    floors: dict[tuple[str, str], dict[str, Any]] = {}
    rows = []
    for m in measured:
        key = (m.mode, repr(m.size))
        if key not in floors:
            size = next(s for s in sizes if dict(s.dims) == m.size)
            try:
                floors[key] = _hbm_floor(case, size, m.mode, dtype, device, bytes_per_s)
            except Exception as exc:  # the timings stand without it
                floors[key] = {"hbm_floor_s": None, "floor_bytes": None,
                               "why": f"bytes not counted: {type(exc).__name__}: {exc}"}
        row = asdict(m)
        row.update(floors[key])
        hbm = floors[key]["hbm_floor_s"]
        row["ratio_hbm"] = (m.timing.median / hbm if m.status == OK and m.timing and hbm
                            and not m.noisy else None)
        rows.append(row)
    return rows


def run_bench(*, device: torch.device, dry_run: bool, bytes_per_s: float, deadline: float,
              ops: list[str] | None = None, budget_s: float = 10.0) -> dict[str, Any]:
    """Time every op case (see the module doc); peers only in the first backend's pass.
    Cases not started by ``deadline`` (a ``time.monotonic()`` value) are listed in
    ``skipped``, cases that raised in ``failed``, with the reason. Returns the report's
    ``bench`` part."""
    from rlkern import backends
    from rlkern.bench.cases import CaseOptions, case_names, get_case

    names = [n for n in (ops or case_names()) if n not in NOT_OPS]
    if device.type == "cuda":
        kinds = ["triton"] + (["cuda"] if backends.has_cuda_kernels() else [])
    else:
        kinds = ["auto"]  # the dry run: the CPU kernels
    passes: list[dict[str, Any]] = []
    skipped: list[str] = []
    failed: list[str] = []
    for backend in kinds:
        rows: list[dict[str, Any]] = []
        for name in names:
            if backend == "cuda" and name in TRITON_ONLY:
                continue  # backend='cuda' raises for these ops by design
            if time.monotonic() > deadline:
                skipped.append(f"{name} [{backend}]: the check's time limit was reached")
                continue
            try:  # one case failing (e.g. out of memory) must not lose the others' rows
                rows += _time_case(get_case(name, CaseOptions(device=device,
                                                              rlkern_backend=backend)),
                                   device=device, dry_run=dry_run, bytes_per_s=bytes_per_s,
                                   budget_s=budget_s, peers=backend == kinds[0])
            except Exception as exc:
                failed.append(f"{name} [{backend}]: "
                              + f"{type(exc).__name__}: {exc}".splitlines()[0])
        passes.append({"backend": backend, "results": rows})
    return {"passes": passes, "skipped": skipped, "failed": failed, "bytes_per_s": bytes_per_s}
