"""``rlkern gpu-check``: the dry run on CPU end to end, the reports' structure, the parts it is
built from (bandwidth table, traffic counting, pytest counts) and its errors."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rlkern
from rlkern import cli
from rlkern.bench.cases import case_names
from rlkern.bench.kit import as_integers, copy_once, read_once, write_once
from rlkern.bench.traffic import count_traffic
from rlkern.gpu_check import machine, steps

ROOT = Path(__file__).resolve().parents[1]
PYTHON_DIR = str(Path(rlkern.__file__).resolve().parents[1])


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[int, Path]:
    out = tmp_path_factory.mktemp("gpu_check")
    return cli.main(["gpu-check", "--dry-run", "--out", str(out)]), out


def test_dry_run_passes_and_writes_both_reports(dry_run) -> None:
    code, out = dry_run
    assert code == 0
    data = json.loads((out / "gpu_check.json").read_text())
    assert data["schema"] == "rlkern-gpu-check/1" and data["dry_run"] is True and data["ok"]
    assert [(s["name"], s["status"]) for s in data["steps"]] == [
        ("environment", "ok"), ("bandwidth", "ok"), ("tests", "ok"), ("bench", "ok")]
    when = dt.datetime.fromisoformat(data["environment"]["date"])
    assert when.utcoffset() == dt.timedelta(0)
    assert data["header"].startswith(f"run {data['environment']['date']}; dry run on CPU")
    for key in ("torch", "triton", "rlkern_C_built", "rlkern_C_with_cuda",
                "cuda_ops_registered", "driver", "torch_cuda", "cpu", "cpu_count", "peers"):
        assert key in data["environment"], key
    assert set(data["environment"]["peers"]) == set(machine.PEERS)
    bw = data["bandwidth"]
    assert bw["bytes_per_s"] == bw["measured_copy_bytes_per_s"] > 0
    assert bw["source"].startswith("measured CPU memory")


def test_dry_run_tests_step(dry_run) -> None:
    _, out = dry_run
    tests = json.loads((out / "gpu_check.json").read_text())["tests"]
    assert tests["device"] == "cpu" and tests["files"] == list(steps.DRY_RUN_TEST_FILES)
    assert tests["k"] == steps.DRY_RUN_K and not tests["timed_out"] and tests["returncode"] == 0
    counts = tests["counts"]
    assert counts["passed"] >= 3 and counts["failures"] == counts["errors"] == 0
    assert (out / "pytest_junit.xml").exists() and "passed" in (out / "pytest.log").read_text()


def test_dry_run_times_every_op_against_the_bandwidth_floor(dry_run) -> None:
    _, out = dry_run
    bench = json.loads((out / "gpu_check.json").read_text())["bench"]
    assert [p["backend"] for p in bench["passes"]] == ["auto"]
    assert bench["skipped"] == bench["failed"] == []
    rows = bench["passes"][0]["results"]
    assert {r["case"] for r in rows} == set(case_names()) - steps.NOT_OPS
    for r in rows:
        assert r["status"] == "ok", r
        assert max(r["size"].values()) <= steps.DRY_RUN_DIM
        for key in ("noisy", "ratio_rlkern", "ratio_floor", "ratio_hbm", "hbm_floor_s",
                    "floor_bytes", "timing"):
            assert key in r, key
        if r["noisy"]:  # no ratio for a noisy median
            assert r["ratio_rlkern"] is r["ratio_floor"] is r["ratio_hbm"] is None
        elif r["hbm_floor_s"] is not None:
            assert r["ratio_hbm"] == pytest.approx(r["timing"]["median"] / r["hbm_floor_s"])
    # The fwd floor of token logprobs reads the bf16 logits once (and writes one element).
    lp = next(r for r in rows if r["case"] == "logprobs" and r["mode"] == "fwd")
    n, v = lp["size"]["N"], lp["size"]["V"]
    assert lp["floor_bytes"] == n * v * 2 + 2
    assert lp["hbm_floor_s"] == pytest.approx(lp["floor_bytes"] / bench["bytes_per_s"])
    # The matmul floors are compute-bound: no bandwidth floor.
    lin = next(r for r in rows if r["case"] == "linear_logprobs")
    assert lin["hbm_floor_s"] is None and "compute-bound" in lin["why"]


def test_dry_run_markdown(dry_run) -> None:
    _, out = dry_run
    data = json.loads((out / "gpu_check.json").read_text())
    text = (out / "gpu_check.md").read_text()
    lines = text.splitlines()
    assert lines[0] == "# rlkern gpu-check (dry run)" and lines[2] == data["header"] + "."
    for heading in ("## Steps", "## Environment", "## Tests", "## Timings",
                    "### rlkern backend `auto`"):
        assert heading in lines, heading
    table = [line for line in lines if line.startswith("| logprobs |")]
    assert len(table) == 2 * 3  # rlkern and floor, three modes
    assert all(line.count("|") == 11 for line in table)
    assert f"{data['tests']['counts']['passed']} passed, 0 failed" in text


def test_wrapper_script_and_skips(tmp_path) -> None:
    env = {"PYTHONPATH": PYTHON_DIR, "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--dry-run", "--skip-tests",
                           "--skip-bench", "--out", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert data["tests"] == {"status": "skipped", "reason": "--skip-tests"}
    assert data["bench"] is None and data["steps"][-1] == {
        "name": "bench", "status": "skipped", "reason": "--skip-bench"}
    assert (tmp_path / "gpu_check.md").read_text().count("not run") == 1


def test_a_failing_step_fails_the_check_but_not_the_reports(tmp_path, monkeypatch) -> None:
    def broken(**kw: object) -> None:
        raise RuntimeError("no timings today")

    monkeypatch.setattr(steps, "run_bench", broken)
    code = cli.main(["gpu-check", "--dry-run", "--skip-tests", "--out", str(tmp_path)])
    assert code == 1
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    bench = data["steps"][-1]
    assert bench["status"] == "error" and bench["reason"] == "RuntimeError: no timings today"
    assert not data["ok"] and "no timings today" in (tmp_path / "gpu_check.md").read_text()


def test_without_cuda_the_real_check_refuses(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["gpu-check", "--out", str(tmp_path)]) == 2
    assert "no CUDA device here; use --dry-run" in capsys.readouterr().err
    assert not (tmp_path / "gpu_check.json").exists()


@pytest.mark.parametrize("argv", [["--pytest-timeout", "0"], ["--deadline", "-1"]])
def test_bad_limits_are_refused(argv, tmp_path, capsys) -> None:
    assert cli.main(["gpu-check", "--dry-run", "--out", str(tmp_path), *argv]) == 2
    assert "must be > 0" in capsys.readouterr().err


def test_a_timed_out_pytest_is_stopped_and_reported(tmp_path) -> None:
    record = steps.run_tests(tmp_path, device="cpu", files=steps.DRY_RUN_TEST_FILES,
                             k=steps.DRY_RUN_K, timeout_s=0.5)
    assert record["timed_out"] and record["returncode"] is None
    assert record["status"] == "failed" and "ran past 0.5 s" in record["reason"]
    assert record["counts"]["partial"] is True


def test_missing_test_files_are_an_error(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"tests/no_such_test\.py"):
        steps.run_tests(tmp_path, device="cpu", files=("tests/no_such_test.py",), k=None,
                        timeout_s=10)


def test_gpu_test_files_exist() -> None:
    for name in (*steps.GPU_TEST_FILES, *steps.DRY_RUN_TEST_FILES):
        assert (ROOT / name).is_file(), name


def test_progress_counts() -> None:
    log = "....F..s  [ 40%]\n.E.x\nsome other line\nFAILED tests/x.py::t\n"
    assert steps._progress_counts(log) == {"tests": 12, "failures": 1, "errors": 1,
                                           "skipped": 1, "passed": 9}


@pytest.mark.parametrize(("name", "entry", "peak"), [
    ("NVIDIA H200", "H200", 4.8e12), ("NVIDIA GH200 480GB", "GH200", 4.0e12),
    ("NVIDIA H100 80GB HBM3", "H100", 3.35e12), ("NVIDIA H100 PCIe", "H100 PCIe", 2.0e12),
    ("NVIDIA A100-SXM4-80GB", "A100-SXM4-80GB", 2.039e12),
    ("NVIDIA A100-SXM4-40GB", "A100", 1.555e12), ("NVIDIA L4", "L4", 300e9),
    ("NVIDIA L40S", "L40S", 864e9), ("NVIDIA A10G", "A10G", 600e9),
])
def test_bandwidth_table(name: str, entry: str, peak: float) -> None:
    assert machine.peak_from_table(name) == (entry, peak)


def test_bandwidth_table_misses_unknown_gpus() -> None:
    assert machine.peak_from_table("Some Future GPU") is None
    # On CPU (the dry run) the table is never consulted: the measured copy is used.
    bw = machine.bandwidth(torch.device("cpu"), {"gpu": "NVIDIA H200"}, 1 << 20)
    assert bw["bytes_per_s"] == bw["measured_copy_bytes_per_s"] and "measured" in bw["source"]


def test_registered_ops_come_from_the_dispatcher() -> None:
    from rlkern import backends

    if not backends.has_cpp():
        pytest.skip("rlkern._C is not built")
    cpu = machine.ops_registered("CPU")
    assert "rlkern::logprobs_fwd_out" in cpu and all(n.startswith("rlkern::") for n in cpu)
    assert bool(machine.ops_registered("CUDA")) == backends.has_cuda_kernels()


def test_peers_are_found_not_imported(monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "flashinfer" else real(name, *a))
    found = machine.peers()
    assert found["flashinfer"] is None
    assert found["trl"] == (importlib.metadata.version("trl") if real("trl") else None)


def test_traffic_of_the_floors() -> None:
    x = torch.randn(100, 1000).bfloat16()
    read = count_traffic(lambda: read_once(x))
    assert (read.read, read.written, read.compute_bound) == (200_000, 2, False)  # amax: 1 elem
    w = count_traffic(lambda: write_once(x, torch.float32))  # a fill: nothing read
    assert (w.read, w.written) == (0, 400_000)
    rw = count_traffic(lambda: copy_once(x, torch.float32))
    assert (rw.read, rw.written) == (200_000, 400_000) and rw.total == 600_000
    views = count_traffic(lambda: x.view(torch.int16).reshape(-1).t())
    assert views.total == 0
    mm = count_traffic(lambda: torch.ones(8, 16) @ torch.ones(16, 4))
    assert mm.compute_bound and mm.read == (8 * 16 + 16 * 4) * 4 and mm.written == 8 * 4 * 4


def test_no_case_starts_after_the_deadline() -> None:
    import time

    bench = steps.run_bench(device=torch.device("cpu"), dry_run=True, bytes_per_s=1e10,
                            deadline=time.monotonic() - 1)
    assert bench["passes"] == [{"backend": "auto", "results": []}]
    names = sorted(set(case_names()) - steps.NOT_OPS)
    assert bench["skipped"] == [f"{n} [auto]: the check's time limit was reached" for n in names]


def test_op_selects_the_cases(tmp_path) -> None:
    assert cli.main(["gpu-check", "--dry-run", "--skip-tests", "--op", "gigpo",
                     "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "gpu_check.json").read_text())["bench"]["passes"][0]["results"]
    assert {r["case"] for r in rows} == {"gigpo"} and {r["impl"] for r in rows} == {"rlkern",
                                                                                   "floor"}


def test_a_failing_case_is_reported_and_the_others_still_run(tmp_path, monkeypatch) -> None:
    real = steps._time_case

    def flaky(case, **kw):
        if case.name == "gigpo":
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real(case, **kw)

    monkeypatch.setattr(steps, "_time_case", flaky)
    assert cli.main(["gpu-check", "--dry-run", "--skip-tests", "--op", "gigpo", "--op",
                     "advantages", "--op", "nonexistent", "--out", str(tmp_path)]) == 1
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    bench = data["bench"]
    assert bench["failed"][0] == "gigpo [auto]: OutOfMemoryError: CUDA out of memory"
    assert bench["failed"][1].startswith("nonexistent [auto]: KeyError")
    assert {r["case"] for r in bench["passes"][0]["results"]} == {"advantages"}
    assert data["steps"][-1]["status"] == "failed" and "gigpo [auto]" in data["steps"][-1]["reason"]
    assert "- failed: gigpo [auto]: OutOfMemoryError" in (tmp_path / "gpu_check.md").read_text()


def test_traffic_floor_reads_each_input_once() -> None:
    """A case floor reads each named input once: a field written from (``copies``) is read by
    that copy only, and a plain write reads nothing; so the policy loss's fwd+bwd floor moves
    its three inputs plus one gradient, and the logprobs one the logits plus one gradient."""
    from rlkern.bench.cases import Size
    from rlkern.bench.cases.logprobs import _floor as logprobs_floor
    from rlkern.bench.cases.policy_loss import _floor as policy_loss_floor
    from rlkern.bench.cases.policy_loss import make_inputs as policy_loss_inputs

    inp = policy_loss_inputs(Size({"B": 4, "T": 64}), torch.float32, torch.device("cpu"))
    t = count_traffic(lambda: policy_loss_floor("fwd+bwd")(inp))
    inputs = (inp.logprobs, inp.old_logprobs, inp.mask)
    maxima = sum(x.element_size() for x in inputs)  # each amax writes one element
    assert (t.read, t.written) == (sum(x.nbytes for x in inputs), inp.old_logprobs.nbytes + maxima)

    logits = torch.randn(8, 100).bfloat16()
    fake = type("Inputs", (), {"logits": logits})()
    t = count_traffic(lambda: logprobs_floor("fwd+bwd")(fake))
    assert (t.read, t.written) == (1_600, 1_600)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_as_integers_tells_apart_what_float_equality_does_not(dtype) -> None:
    """The floors' integer view is a bit view: +0 and -0 (equal as floats) differ, a NaN equals
    itself, and nothing is copied."""
    x = torch.tensor([0.0, -0.0, float("nan")], dtype=dtype)
    ints = as_integers(x)
    assert ints.element_size() == x.element_size() and ints.data_ptr() == x.data_ptr()
    assert x[0] == x[1] and ints[0] != ints[1]
    assert torch.equal(as_integers(x[2:]), as_integers(x[2:].clone()))
