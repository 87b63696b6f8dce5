"""Fast tests of the benchmark harness (rlkern.bench): measuring, checking, running, writing."""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import time

import pytest
import torch

from rlkern.bench import allocator, cli, kit, report
from rlkern.bench.cases import (
    FLOOR,
    RLKERN,
    Case,
    CaseOptions,
    Impl,
    ImplUnavailableError,
    Size,
    Tolerance,
    case_names,
    get_case,
)
from rlkern.bench.check import compare
from rlkern.bench.harness import (
    cpu_peak_supported,
    peak_extra_memory,
    summarize,
    time_call,
)
from rlkern.bench.runner import ERROR, MISMATCH, OK, SKIPPED, Measurement, run_case

MIB = 1024 * 1024

# ---------------------------------------------------------------------------------------------
# harness: memory


@pytest.mark.skipif(not cpu_peak_supported(), reason="needs Linux /proc/self/clear_refs")
def test_peak_memory_sees_a_256_mib_allocation() -> None:
    # torch.ones writes every page, so all of it becomes resident; 256 MiB is far above
    # glibc's largest dynamic mmap threshold, so it is mmapped with or without MALLOC_ENV.
    peak = peak_extra_memory(lambda: torch.ones(64 * MIB, dtype=torch.float32))
    assert peak is not None
    assert abs(peak - 256 * MIB) <= 0.10 * 256 * MIB, peak / MIB


@pytest.mark.skipif(not cpu_peak_supported(), reason="needs Linux /proc/self/clear_refs")
def test_peak_memory_is_reset_between_calls() -> None:
    peak_extra_memory(lambda: torch.ones(64 * MIB, dtype=torch.float32))
    small = peak_extra_memory(lambda: torch.ones(1024))
    assert small is not None and small < 16 * MIB  # the earlier 256 MiB peak is forgotten


@pytest.mark.skipif(not (cpu_peak_supported() and allocator.available()),
                    reason="needs Linux /proc/self/clear_refs and glibc")
def test_peak_memory_sees_memory_the_heap_would_reuse() -> None:
    # 16 MiB is below the timing-mode mmap threshold: glibc serves it from the heap and keeps
    # it resident after the free, so once the heap has settled a new allocation can reuse it
    # without adding to the resident set. The memory mode must still count it.
    allocator.for_timing()
    for _ in range(3):
        torch.ones(4 * MIB, dtype=torch.float32)
    peak = peak_extra_memory(lambda: torch.ones(4 * MIB, dtype=torch.float32))
    assert peak is not None
    assert abs(peak - 16 * MIB) <= 0.10 * 16 * MIB, peak / MIB


# ---------------------------------------------------------------------------------------------
# harness: timing


def test_summarize_median_min_iqr() -> None:
    t = summarize([5.0, 1.0, 4.0, 2.0, 3.0], warmup=(9.0,))
    assert (t.median, t.min, t.iqr) == (3.0, 1.0, 2.0)
    assert t.times == (5.0, 1.0, 4.0, 2.0, 3.0)  # call order kept for the JSON
    assert t.warmup == (9.0,)
    assert summarize([2.0]).iqr == 0.0
    with pytest.raises(ValueError):
        summarize([])


class FakeClock:
    """A clock that advances only when the timed function runs, by scripted durations."""

    def __init__(self, durations: list[float]) -> None:
        self.now = 0.0
        self.durations = iter(durations)
        self.calls = 0

    def __call__(self) -> float:
        return self.now

    def fn(self) -> None:
        self.calls += 1
        self.now += next(self.durations)


def test_time_call_warmup_then_repeats() -> None:
    clock = FakeClock([100.0, 50.0, 3.0, 1.0, 2.0, 5.0, 4.0])
    t = time_call(clock.fn, repeats=5, warmup=2, clock=clock)
    assert t is not None and clock.calls == 7
    assert t.warmup == (100.0, 50.0)  # compilation-like first calls stay out of the figures
    assert t.times == (3.0, 1.0, 2.0, 5.0, 4.0)
    assert (t.median, t.min, t.iqr) == (3.0, 1.0, 2.0)


def test_time_call_budget_skips_after_warmup() -> None:
    clock = FakeClock([2.0] * 10)
    assert time_call(clock.fn, repeats=5, warmup=1, clock=clock, budget_s=9.0) is None
    assert clock.calls == 1
    assert time_call(clock.fn, repeats=5, warmup=1, clock=clock, budget_s=10.0) is not None


@pytest.mark.parametrize(("repeats", "warmup"), [(0, 1), (5, -1)])
def test_time_call_rejects_bad_counts(repeats: int, warmup: int) -> None:
    with pytest.raises(ValueError):
        time_call(lambda: None, repeats=repeats, warmup=warmup)


# ---------------------------------------------------------------------------------------------
# check


def test_check_levels() -> None:
    ref = {"x": torch.tensor([-10.0, -1.0, 0.5])}
    tol = {"x": Tolerance(atol=1e-2, rtol=1e-2, gate=0.1)}
    assert compare({"x": ref["x"] + 1e-3}, ref, tol).message == "ok"
    warned = compare({"x": ref["x"] + 0.05}, ref, tol)
    assert warned.ok and warned.warnings and warned.message.startswith("warn")
    assert not compare({"x": ref["x"] + 5.0}, ref, tol).ok  # another quantity: a mismatch
    assert not compare({"x": torch.full((3,), float("nan"))}, ref, tol).ok
    assert not compare({}, ref, tol).ok  # a missing output is never "agreeing"
    # (B, L) against (N,) compares the same elements in the same order.
    assert compare({"x": ref["x"].view(1, 3)}, ref, tol).ok


# ---------------------------------------------------------------------------------------------
# runner, on a synthetic case whose implementations misbehave on purpose


def _toy_case() -> Case:
    def make_inputs(size: Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.arange(size["N"], dtype=torch.float32)

    def broken(x: torch.Tensor) -> dict[str, torch.Tensor]:
        raise RuntimeError("boom")

    def slow(x: torch.Tensor) -> dict[str, torch.Tensor]:
        time.sleep(0.02)
        return {"y": x * 2}

    def implementations(mode: str) -> list[Impl]:
        return [
            Impl("rlkern", lambda x: {"y": x * 2}, role=RLKERN),
            Impl("same", lambda x: {"y": (x * 2).to(torch.bfloat16)}),
            Impl("other", lambda x: {"y": x * 3}),
            Impl("broken", broken),
            Impl("slow", slow),
            Impl("absent", broken, skip="not installed"),
            Impl("floor", lambda x: x.sum() and {}, role=FLOOR),
        ]

    return Case(
        name="toy", sizes=[Size({"N": 64}), Size({"N": 32})], quick_sizes=[Size({"N": 8})],
        modes=("fwd",), make_inputs=make_inputs, implementations=implementations,
        tolerances={"y": Tolerance(atol=1e-2, rtol=1e-2)},
    )


def test_run_case_statuses_and_ratios() -> None:
    results = run_case(_toy_case(), repeats=3, budget_s=0.05)
    by = {(m.impl, m.size["N"]): m for m in results}
    assert [m.size["N"] for m in results][:7] == [32] * 7  # smallest size first
    assert by[("rlkern", 32)].status == OK and by[("rlkern", 32)].ratio_rlkern == 1.0
    assert by[("same", 32)].status == OK and by[("same", 32)].check.ok
    other = by[("other", 32)]
    assert other.status == MISMATCH and other.timing is None and other.peak_bytes is None
    assert by[("broken", 32)].status == ERROR and "boom" in by[("broken", 32)].reason
    assert by[("absent", 32)].status == SKIPPED and by[("absent", 32)].reason == "not installed"
    # 3 × 20 ms > 50 ms: over budget at N=32, so N=64 is not even tried.
    assert by[("slow", 32)].status == SKIPPED and "budget" in by[("slow", 32)].reason
    assert by[("slow", 64)].status == SKIPPED and "already at N=32" in by[("slow", 64)].reason
    floor = by[("floor", 32)]
    assert floor.ratio_floor == 1.0 and floor.timing is not None and len(floor.timing.times) == 3


def test_run_case_interleaves_timed_calls() -> None:
    log: list[str] = []

    def impl(name: str, role: str = "peer", warmup: int = 1) -> Impl:
        return Impl(name, lambda x: log.append(name) or ({} if role == FLOOR else {"y": x}),
                    role=role, warmup=warmup)

    case = Case(
        name="order", sizes=[Size({"N": 4})], quick_sizes=[], modes=("fwd",),
        make_inputs=lambda size, dtype, device: torch.zeros(size["N"]),
        implementations=lambda mode: [impl("r", RLKERN), impl("c", warmup=3), impl("f", FLOOR)],
        tolerances={"y": Tolerance(atol=1e-6)},
    )
    results = run_case(case, repeats=3)
    # First calls (checked) and the extra warm-ups of "c", then rounds in rotating order, then
    # one call each measuring memory.
    first_calls = ["r", "c", "c", "c", "f"]
    rounds = ["r", "c", "f", "c", "f", "r", "f", "r", "c"]
    memory_calls = ["r", "c", "f"]
    assert log == [*first_calls, *rounds, *memory_calls]
    c = next(m for m in results if m.impl == "c")
    assert c.first_call_s is not None and len(c.timing.warmup) == 2 and len(c.timing.times) == 3


def test_run_case_only_keeps_rlkern_and_floor() -> None:
    results = run_case(_toy_case(), sizes=[Size({"N": 8})], repeats=1, only=["same"])
    assert [m.impl for m in results] == ["rlkern", "same", "floor"]


# ---------------------------------------------------------------------------------------------
# writers


def _measurements() -> list[Measurement]:
    results = run_case(_toy_case(), sizes=[Size({"N": 8}), Size({"N": 16})], repeats=2,
                       only=["same"])
    return results


def test_json_structure(tmp_path) -> None:
    results = _measurements()
    env = report.environment("cpu", {"toy.rlkern_backend": "cpu"})
    path = report.write_json(tmp_path / "out.json", results, env, {"toy": ("a note",)})
    data = json.loads(path.read_text())
    assert data["schema"] == report.SCHEMA
    for key in ("torch", "cpu", "torch_threads", "date", "cpu_allocator", "toy.rlkern_backend"):
        assert key in data["environment"]
    assert data["notes"] == {"toy": ["a note"]}
    assert len(data["results"]) == len(results) == 6
    first = data["results"][0]
    for key in ("case", "mode", "size", "dtype", "device", "impl", "role", "status",
                "timing", "peak_bytes", "ratio_rlkern", "ratio_floor", "check"):
        assert key in first
    assert len(first["timing"]["times"]) == 2 and first["timing"]["median"] > 0
    same = next(r for r in data["results"] if r["impl"] == "same")
    assert same["check"]["ok"] is True and "y" in same["check"]["errors"]


def test_markdown_structure() -> None:
    results = _measurements()
    text = report.to_markdown(results, report.environment("cpu"), {"toy": ("a note",)})
    lines = text.splitlines()
    assert "## toy — fwd (bfloat16)" in lines  # the dtype the run asked for
    header = next(line for line in lines if line.startswith("| N |"))
    assert header.count("|") == 9  # N + 7 columns
    rows = [line for line in lines if line.startswith("| 8 |") or line.startswith("| 16 |")]
    assert len(rows) == 6 and all(r.count("|") == 9 for r in rows)
    assert "- a note" in lines


def test_plots(tmp_path) -> None:
    paths = report.write_plots(tmp_path, _measurements(), report.environment("cpu"))
    assert [p.name for p in paths] == ["toy_fwd_vs_N.png"]
    assert paths[0].stat().st_size > 0


def test_plots_fall_back_to_the_product_of_dims(tmp_path) -> None:
    # Sizes that move N and V together (like the quick sizes) form no sweep of one dim.
    results = [Measurement(case="c", mode="fwd", size={"N": n, "V": v}, dtype="bfloat16",
                           device="cpu", impl="rlkern", role=RLKERN, status=OK,
                           timing=summarize([n * v * 1e-9]), peak_bytes=n * v)
               for n, v in ((8, 64), (16, 128))]
    paths = report.write_plots(tmp_path, results, report.environment("cpu"))
    assert [p.name for p in paths] == ["c_fwd_vs_N_V.png"]


# ---------------------------------------------------------------------------------------------
# the real logprobs case and the CLI, end to end at tiny sizes


def test_registry_has_logprobs() -> None:
    assert "logprobs" in case_names()
    case = get_case("logprobs", CaseOptions())
    assert case.modes == ("fwd", "fwd+bwd", "bwd")
    for mode in case.modes:
        impls = case.implementations(mode)
        assert impls[0].role == RLKERN and impls[-1].role == FLOOR
        if mode == "bwd":  # the backward op alone: rlkern's two variants and the floor
            assert [i.name for i in impls] == ["rlkern", "rlkern (inplace_backward)", "floor"]
        else:
            assert {i.name for i in impls} >= {"rlkern", "trl", "verl (eager formula)",
                                                "torch.compile", "floor"}


def test_cli_end_to_end_tiny(tmp_path, capsys) -> None:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args([
        "--op", "logprobs", "--size", "N=8,V=64", "--size", "N=16,V=64", "--repeats", "2",
        "--mode", "fwd", "--mode", "fwd+bwd",
        "--impl", "verl (eager formula)", "--backend", "torch", "--device", "cpu",
        "--json", str(tmp_path / "r.json"), "--markdown", str(tmp_path / "r.md"),
        "--plot", str(tmp_path / "plots"),
    ])
    assert args.func is cli.run
    assert args.func(args) == 0
    data = json.loads((tmp_path / "r.json").read_text())
    rows = {(r["mode"], r["size"]["N"], r["impl"]): r for r in data["results"]}
    assert len(rows) == 2 * 2 * 3
    for key in itertools.product(("fwd", "fwd+bwd"), (8, 16), ("rlkern", "floor")):
        assert rows[key]["status"] == OK, rows[key]
    verl = rows[("fwd+bwd", 16, "verl (eager formula)")]
    assert verl["status"] == OK and verl["check"]["ok"], verl
    assert data["environment"]["logprobs.rlkern_backend"] == "torch"
    assert (tmp_path / "r.md").read_text().count("## logprobs") == 2
    assert len(list((tmp_path / "plots").glob("*.png"))) == 2
    assert "logprobs — fwd+bwd" in capsys.readouterr().out


def test_linear_grpo_loss_case_peers_agree_tiny(tmp_path) -> None:
    """The fused-loss case runs end to end and its peers (Liger, eager TRL math) pass the
    agreement gate against rlkern: the case compares like with like."""
    pytest.importorskip("liger_kernel", reason="liger-kernel is not installed")
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args([
        "--op", "linear_grpo_loss", "--size", "B=3,T=5,H=32,V=300", "--repeats", "1",
        "--impl", "liger", "--impl", "eager", "--device", "cpu",
        "--json", str(tmp_path / "r.json"),
    ])
    assert args.func(args) == 0
    rows = {r["impl"]: r for r in json.loads((tmp_path / "r.json").read_text())["results"]}
    assert set(rows) == {"rlkern", "liger", "eager", "floor"}
    for name in ("liger", "eager"):
        assert rows[name]["status"] == OK and rows[name]["check"]["ok"], rows[name]


def test_gae_case_peers_agree_tiny(tmp_path) -> None:
    """The ``gae`` case runs its three estimators end to end and verl's functions pass the
    agreement gate against rlkern's (advantages and returns)."""
    pytest.importorskip("verl.trainer.ppo.core_algos", reason="verl is not installed")
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--op", "gae", "--size", "B=5,T=40", "--repeats", "1",
                              "--device", "cpu", "--json", str(tmp_path / "r.json")])
    assert args.func(args) == 0
    results = json.loads((tmp_path / "r.json").read_text())["results"]
    peers = [r for r in results if r["impl"].startswith("verl ")]
    assert sorted(r["impl"] for r in peers) == ["verl gae", "verl reinforce_plus_plus",
                                                 "verl remax"]
    for row in peers:
        assert row["status"] == OK and row["check"]["ok"], row



def test_policy_loss_kl_mode_peers_agree_tiny(tmp_path) -> None:
    """``fwd+bwd+kl`` (verl's actor loss with ``use_kl_loss``): the restated formula, its
    torch.compile and, where installed, verl's own functions pass the agreement gate against
    rlkern on the loss and the gradient; OpenRLHF's loss sits out with its reason."""
    from rlkern.bench.cases.policy_loss import NO_KL_TERM

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--op", "policy_loss", "--size", "B=6,T=40", "--repeats", "1",
                              "--mode", "fwd+bwd+kl", "--device", "cpu",
                              "--json", str(tmp_path / "r.json")])
    assert args.func(args) == 0
    rows = {r["impl"]: r for r in json.loads((tmp_path / "r.json").read_text())["results"]}
    peers = ["verl formula (eager)", "torch.compile"]
    if importlib.util.find_spec("verl") is not None:
        peers.append("verl")
    else:
        print("verl is not installed: its row is skipped, the formula's stands in")
    for name in peers:
        assert rows[name]["status"] == OK and rows[name]["check"]["ok"], rows[name]
    for name in ("rlkern (OpenRLHF PolicyLoss)", "openrlhf"):
        assert rows[name]["status"] == SKIPPED and NO_KL_TERM in rows[name]["reason"], rows[name]
    assert rows["floor"]["status"] == OK


def test_advantages_odd_group_mode_runs_its_whole_groups(tmp_path) -> None:
    """``contiguous G=5`` takes the first 5·⌊N/5⌋ rows (48 → 45 here): rlkern and TRL's
    formula run on them and agree, and its floor runs."""
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--op", "advantages", "--size", "N=48", "--mode", "contiguous G=5",
                              "--repeats", "1", "--device", "cpu", "--json",
                              str(tmp_path / "r.json")])
    assert args.func(args) == 0
    rows = {r["impl"]: r for r in json.loads((tmp_path / "r.json").read_text())["results"]}
    assert set(rows) == {"rlkern", "trl formula", "floor"}
    assert all(r["mode"] == "contiguous G=5" for r in rows.values())
    assert rows["rlkern"]["status"] == OK and rows["floor"]["status"] == OK
    assert rows["trl formula"]["status"] == OK and rows["trl formula"]["check"]["ok"]


@pytest.mark.parametrize(("op", "size", "peers"), [
    ("token_baseline", "B=6,T=24", ["verl optimal_token_baseline",
                                    "verl tir_optimal_token_baseline"]),
    ("gdpo", "N=24,T=10", ["verl gdpo"])])
def test_verl_estimator_cases_peers_agree_tiny(tmp_path, op, size, peers) -> None:
    """The ``token_baseline`` and ``gdpo`` cases run end to end and verl's functions pass the
    agreement gate against rlkern's."""
    pytest.importorskip("verl.trainer.ppo.core_algos", reason="verl is not installed")
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--op", op, "--size", size, "--repeats", "1",
                              "--device", "cpu", "--json", str(tmp_path / "r.json")])
    assert args.func(args) == 0
    results = json.loads((tmp_path / "r.json").read_text())["results"]
    rows = [r for r in results if r["impl"].startswith("verl ")]
    assert sorted(r["impl"] for r in rows) == peers
    for row in rows:
        assert row["status"] == OK and row["check"]["ok"], row
    assert any(r["impl"] == "rlkern" and r["status"] == OK for r in results)

# ---------------------------------------------------------------------------------------------
# kit: the building blocks the cases share


def test_peer_missing_and_unimportable() -> None:
    absent = kit.Peer("rlkern_no_such_package", lambda: 1, hint="pip install it")
    assert absent.missing() == "rlkern_no_such_package is not installed (pip install it)"
    with pytest.raises(ImplUnavailableError, match="not installed"):
        absent.get()
    calls: list[int] = []

    def broken() -> None:
        calls.append(1)
        raise RuntimeError("bad build")

    with pytest.raises(ImplUnavailableError, match=r"torch is not importable \(RuntimeError"):
        kit.Peer("torch", broken).get()
    loaded = kit.Peer("torch", lambda: calls.append(2) or "module")
    assert loaded.missing() is None
    assert loaded.get() == loaded.get() == "module" and calls.count(2) == 1  # loaded once


def test_rlkern_backend_choice(monkeypatch) -> None:
    from rlkern import backends

    chosen = kit.RlkernBackend.choose(CaseOptions(rlkern_backend="torch"))
    assert (chosen.name, chosen.concrete, chosen.notes) == ("torch", "torch", ())
    assert chosen.environment == {"rlkern_backend": "torch"}
    monkeypatch.setattr(backends, "has_cpp", lambda: False)
    fallback = kit.RlkernBackend.choose(CaseOptions())
    assert fallback.name == "torch" and "not built" in fallback.note
    assert fallback.notes == (fallback.note,)
    for name in case_names():  # every case says which backend its rlkern rows ran
        if name != "micro_groups":  # (the schedules of a model run, not an rlkern op)
            case = get_case(name, CaseOptions())
            assert case.environment == {"rlkern_backend": "torch"}, name
            assert case.warnings == fallback.notes, name


def test_floors_touch_inputs_and_return_nothing() -> None:
    x = torch.randn(4, 5).bfloat16()
    assert kit.read_once(x, torch.ones(3, dtype=torch.bool), torch.arange(3)) == {}
    kit.write_once(x, torch.float32)
    leaf = kit.fresh_leaf(x)
    assert leaf.requires_grad and leaf.is_leaf and leaf.data_ptr() == x.data_ptr()


def test_micro_groups_summary_reports_the_kv_budget_simulation(tmp_path) -> None:
    """The micro_groups case's summary (no real run given) has the issue 18 simulation per
    schedule, with and without the budget, and its plot has the budget row."""
    pytest.importorskip("matplotlib", reason="the summary's plot needs matplotlib")
    from rlkern.bench.cases.sample import kv_budget_report, micro_groups_summary

    small = kv_budget_report(P=6, G=8, prompt_len=32, max_new=512, seed=1)
    budget = small["kv_budget_tokens"]
    assert budget == small["unbudgeted"]["full_group"]["peak_tokens"] // 2
    assert set(small["budgeted"]) == {"full_group", "micro_group", "length_aware"}
    for r in small["budgeted"].values():
        assert r["peak_tokens"] <= budget and 0 < r["kv_utilisation"] <= 1
    lines = micro_groups_summary([], str(tmp_path))
    budget_lines = [line for line in lines if line.startswith("issue 18 simulation, ")]
    assert len(budget_lines) == 6
    assert all("preemptions" in line and "recomputed" in line
               for line in budget_lines if ", budget:" in line)
    assert any("target ≥ 25%" in line for line in lines)
    assert (tmp_path / "micro_groups.png").stat().st_size > 0


def test_truncated_logprobs_and_sample_groups_cases_tiny(tmp_path) -> None:
    """Functional run at a tiny size (no timing claims): top-p log-probs against plain
    log-probs, and sample(num_samples=8) against 8 separate draws, all run."""
    for op, modes in (("truncated_logprobs", ("fwd", "fwd+bwd")), ("sample", ("G=8",))):
        parser = argparse.ArgumentParser()
        cli.add_arguments(parser)
        argv = ["--op", op, "--size", "N=4,V=300", "--repeats", "1", "--device", "cpu",
                "--json", str(tmp_path / f"{op}.json")]
        for mode in modes:
            argv += ["--mode", mode]
        args = parser.parse_args(argv)
        assert args.func(args) == 0
        rows = json.loads((tmp_path / f"{op}.json").read_text())["results"]
        names = {"truncated_logprobs": {"rlkern", "plain token_logprobs", "floor"},
                 "sample": {"rlkern", "8 separate draws", "floor"}}[op]
        assert {r["impl"] for r in rows} == names
        assert len(rows) == 3 * len(modes)
        for r in rows:
            assert r["status"] == OK, r
