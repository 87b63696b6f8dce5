"""``rlkern gpu-check``: validate rlkern on a CUDA machine in one run (builds nothing).

Steps, each recorded (status, seconds) even when an earlier one fails:

a. environment — GPU, CUDA, driver, torch, triton, whether ``rlkern._C`` has CUDA kernels
   (:mod:`rlkern.gpu_check.machine`);
b. tests — pytest on the device suite and the Triton suites, on CUDA tensors
   (``RLKERN_TEST_DEVICE=cuda``), bounded by ``--pytest-timeout``; pass / fail / skip counts;
c. bench — every op of ``rlkern bench`` at its quick sizes, rlkern on each GPU backend (triton,
   cuda) and the peers that are installed (never installed here), with the noise rule, and each
   median against the bandwidth floor: bytes the case's floor moves / peak bandwidth (vendor
   HBM figure by GPU name, else a measured device-to-device copy; the report says which);
d. report — ``gpu_check.json`` and ``gpu_check.md`` in ``--out``.

``--dry-run`` runs every step on CPU with stand-ins: CPU tensors and backends, a few fast tests
of the device suite, tiny sizes, a measured CPU copy for the bandwidth — so the check is known
to work before a GPU is lent. Exit code 0 when every step passed, 1 otherwise, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

SCHEMA = "rlkern-gpu-check/1"
DEFAULT_OUT = "gpu_check"
#: Whole check, seconds: the timing step starts no new case after this (target: < 8 min).
DEFAULT_DEADLINE_S = 330.0
DEFAULT_PYTEST_TIMEOUT_S = 210.0
#: Bytes per buffer of the measured copy (GPU / dry run).
COPY_BYTES = {"cuda": 1 << 30, "cpu": 64 << 20}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Define the ``gpu-check`` options on ``parser`` and make :func:`run` its handler."""
    parser.add_argument("--dry-run", action="store_true",
                        help="run every step on CPU with stand-ins (tiny sizes, CPU backends, "
                        "a few fast tests); for CI and to try the check without a GPU")
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                        help="where gpu_check.json, gpu_check.md and the pytest log go "
                        "(default %(default)s)")
    parser.add_argument("--pytest-timeout", type=float, default=DEFAULT_PYTEST_TIMEOUT_S,
                        metavar="SECONDS", help="stop the test step after this long "
                        "(default %(default)g)")
    parser.add_argument("--deadline", type=float, default=DEFAULT_DEADLINE_S, metavar="SECONDS",
                        help="start no further benchmark case after this long since the check "
                        "began (default %(default)g)")
    parser.add_argument("--op", action="append", metavar="NAME",
                        help="time only this case (repeatable; default: every op)")
    parser.add_argument("--skip-tests", action="store_true", help="leave out the test step")
    parser.add_argument("--skip-bench", action="store_true", help="leave out the timing step")
    parser.set_defaults(func=run)


def _step(report: dict[str, Any], name: str, fn: Callable[[], Any]) -> Any:
    """Run one step; record its status and seconds; an exception fails the step, not the check."""
    start = time.perf_counter()
    entry: dict[str, Any] = {"name": name}
    report["steps"].append(entry)
    try:
        result = fn()
        entry["status"] = "ok"
        return result
    except Exception as exc:
        entry.update(status="error", reason=f"{type(exc).__name__}: {exc}".splitlines()[0],
                     traceback=traceback.format_exc())
        return None
    finally:
        entry["seconds"] = round(time.perf_counter() - start, 2)


def check(out_dir: Path, *, dry_run: bool, pytest_timeout_s: float = DEFAULT_PYTEST_TIMEOUT_S,
          deadline_s: float = DEFAULT_DEADLINE_S, ops: list[str] | None = None,
          tests: bool = True, bench: bool = True) -> dict[str, Any]:
    """Run the check (see the module doc) and write its reports into ``out_dir``; returns the
    JSON report as a dict."""
    from rlkern.gpu_check import machine, steps
    from rlkern.gpu_check.report import write_reports

    began = time.monotonic()
    device = torch.device("cpu" if dry_run else "cuda")
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"schema": SCHEMA, "dry_run": dry_run, "steps": []}
    env = _step(report, "environment", lambda: machine.environment(device)) or {}
    report["environment"] = env
    report["bandwidth"] = _step(report, "bandwidth", lambda: machine.bandwidth(
        device, env, COPY_BYTES[device.type]))
    if tests:
        files = steps.DRY_RUN_TEST_FILES if dry_run else steps.GPU_TEST_FILES
        report["tests"] = _step(report, "tests", lambda: steps.run_tests(
            out_dir, device=device.type, files=files, k=steps.DRY_RUN_K if dry_run else None,
            timeout_s=pytest_timeout_s))
        if report["tests"] is not None and report["tests"]["status"] == "failed":
            report["steps"][-1].update(status="failed", reason="pytest reported failures or "
                                       "did not finish; see tests")
    else:
        report["tests"] = {"status": "skipped", "reason": "--skip-tests"}
    if bench and report["bandwidth"] is not None:
        report["bench"] = _step(report, "bench", lambda: steps.run_bench(
            device=device, dry_run=dry_run, bytes_per_s=report["bandwidth"]["bytes_per_s"],
            deadline=began + deadline_s, ops=ops))
        if report["bench"] is not None and report["bench"]["failed"]:
            report["steps"][-1].update(status="failed", reason="case(s) failed: " + "; ".join(
                report["bench"]["failed"]))
    else:
        report["bench"] = None
        report["steps"].append({"name": "bench", "status": "skipped",
                                "reason": "--skip-bench" if not bench else "no bandwidth"})
    report["seconds"] = round(time.monotonic() - began, 1)
    report["ok"] = all(s["status"] in ("ok", "skipped") for s in report["steps"])
    write_reports(out_dir, report)
    return report


def run(args: argparse.Namespace) -> int:
    """The ``gpu-check`` command; returns the exit code."""
    if not args.dry_run and not torch.cuda.is_available():
        print("rlkern gpu-check: no CUDA device here; use --dry-run to run the check on CPU "
              "with stand-ins", file=sys.stderr)
        return 2
    if args.pytest_timeout <= 0 or args.deadline <= 0:
        print("rlkern gpu-check: --pytest-timeout and --deadline must be > 0", file=sys.stderr)
        return 2
    out = Path(args.out)
    report = check(out, dry_run=args.dry_run, pytest_timeout_s=args.pytest_timeout,
                   deadline_s=args.deadline, ops=args.op, tests=not args.skip_tests,
                   bench=not args.skip_bench)
    for s in report["steps"]:
        print(f"{s['name']:12s} {s['status']:8s} {s.get('seconds', 0):7.1f} s  "
              f"{s.get('reason', '')}")
    print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'} "
          f"({report['seconds']:.0f} s in all)")
    return 0 if report["ok"] else 1


def main(argv: list[str] | None = None) -> int:
    """``python -m rlkern.gpu_check`` / ``python bench/gpu_check.py``."""
    parser = argparse.ArgumentParser(prog="rlkern gpu-check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)
