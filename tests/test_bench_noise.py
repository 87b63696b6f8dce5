"""The noise rule of ``rlkern bench``: rounds repeat until every IQR is below ``max_iqr`` × its
median or a cap is reached; a measurement still that spread is ``noisy`` and no ratio that
involves it is given (text, Markdown, JSON). Timed calls come from a scripted timer: no real
timing here."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import json
from collections.abc import Callable

import pytest
import torch

from rlkern.bench import cli, report, runner
from rlkern.bench.cases import FLOOR, RLKERN, Case, Impl, Size, Tolerance
from rlkern.bench.runner import BUDGET, CAP, FIXED, OK, STABLE, run_case

# Scripted durations (seconds) by the index of the timed call of one implementation.
STEADY: Callable[[int], float] = lambda k: 1.0
NOISY: Callable[[int], float] = lambda k: (1.0, 3.0)[k % 2]  # IQR = median forever


def settles_after(n: int) -> Callable[[int], float]:
    """Noisy for the first ``n`` calls, then steady at 2 s."""
    return lambda k: NOISY(k) if k < n else 2.0


class ScriptedTimer:
    """A ``timer`` for :func:`run_case`: runs the call (so the order is logged) and returns
    the next scripted duration of the implementation that ran."""

    def __init__(self, scripts: dict[str, Callable[[int], float]]) -> None:
        self.scripts = scripts
        self.ran: list[str] = []  # appended to by the implementations
        self.timed: list[str] = []

    def __call__(self, call: Callable[[], object], *, device: object) -> float:
        call()
        name = self.ran[-1]
        k = self.timed.count(name)
        self.timed.append(name)
        return self.scripts[name](k)


def _case(timer: ScriptedTimer) -> Case:
    def impl(name: str, role: str) -> Impl:
        return Impl(name, lambda x: timer.ran.append(name) or ({} if role == FLOOR else {"y": x}),
                    role=role)

    return Case(
        name="noise", sizes=[Size({"N": 4})], quick_sizes=[], modes=("fwd",),
        make_inputs=lambda size, dtype, device: torch.zeros(size["N"]),
        implementations=lambda mode: [impl("rlkern", RLKERN), impl("peer", "peer"),
                                      impl("floor", FLOOR)],
        tolerances={"y": Tolerance(atol=1e-6)},
    )


def _run(scripts: dict[str, Callable[[int], float]], **kw: object) -> dict[str, runner.Measurement]:
    timer = ScriptedTimer({"rlkern": STEADY, "peer": STEADY, "floor": STEADY, **scripts})
    kw = {"repeats": 5, "max_iqr": 0.10, "max_repeats": 12, **kw}
    results = run_case(_case(timer), timer=timer, **kw)  # type: ignore[arg-type]
    return {m.impl: m for m in results}


def test_steady_implementations_stop_after_the_first_rounds() -> None:
    by = _run({"peer": lambda k: 2.0, "floor": lambda k: 0.5})
    for m in by.values():
        assert m.status == OK and not m.noisy
        assert len(m.timing.times) == 5 and m.extra["rounds"] == 5
        assert m.extra["stopped"] == STABLE
    assert by["peer"].ratio_rlkern == 2.0 and by["peer"].ratio_floor == 4.0
    assert by["rlkern"].ratio_floor == 2.0


def test_a_noisy_peer_gets_more_rounds_up_to_the_cap_then_no_ratio() -> None:
    by = _run({"peer": NOISY})
    peer = by["peer"]
    # Every implementation keeps running in the interleaved rounds, up to the cap, no further.
    for m in by.values():
        assert len(m.timing.times) == 12 and m.extra["rounds"] == 12
        assert m.extra["stopped"] == CAP
    assert peer.noisy and peer.timing.iqr >= 0.10 * peer.timing.median
    assert peer.ratio_rlkern is None and peer.ratio_floor is None
    assert peer.extra["ratio_withheld"] == ["ratio_rlkern", "ratio_floor"]
    # Ratios between steady medians are still given.
    assert not by["rlkern"].noisy and by["rlkern"].ratio_floor == 1.0
    assert "ratio_withheld" not in by["rlkern"].extra


def test_a_noisy_rlkern_withholds_every_ratio_to_it() -> None:
    by = _run({"rlkern": NOISY, "floor": lambda k: 0.5})
    assert by["rlkern"].noisy
    assert by["peer"].ratio_rlkern is None and by["floor"].ratio_rlkern is None
    assert by["peer"].extra["ratio_withheld"] == ["ratio_rlkern"]
    assert by["peer"].ratio_floor == 2.0  # steady peer over steady floor


def test_a_noisy_floor_withholds_every_ratio_to_it() -> None:
    by = _run({"floor": NOISY})
    assert by["floor"].noisy
    assert by["rlkern"].ratio_floor is None and by["peer"].ratio_floor is None
    assert by["peer"].ratio_rlkern == 1.0


def test_noise_that_settles_stops_before_the_cap() -> None:
    by = _run({"peer": settles_after(6)}, max_repeats=30)
    peer = by["peer"]
    assert 5 < peer.extra["rounds"] < 30 and peer.extra["stopped"] == STABLE
    assert not peer.noisy and peer.ratio_rlkern == 2.0
    # It stopped at the first round after which the IQR was below the bound.
    times = list(peer.timing.times)
    assert runner.summarize(times).iqr < 0.10 * runner.summarize(times).median
    assert runner.summarize(times[:-1]).iqr >= 0.10 * runner.summarize(times[:-1]).median


def test_extra_rounds_stop_at_the_time_budget() -> None:
    by = _run({"peer": NOISY}, max_repeats=30, budget_s=20.0)
    peer = by["peer"]
    assert peer.extra["stopped"] == BUDGET and peer.noisy
    assert sum(peer.timing.times) <= 20.0 < sum(peer.timing.times) + peer.timing.median
    assert 5 < peer.extra["rounds"] < 30


def test_without_a_noise_rule_exactly_repeats_rounds() -> None:
    by = _run({"peer": NOISY}, max_iqr=None, max_repeats=None)
    peer = by["peer"]
    assert len(peer.timing.times) == 5 and not peer.noisy and peer.ratio_rlkern == 1.0
    assert peer.extra["stopped"] == FIXED
    # max_repeats=None: no extra rounds, but a noisy one is still marked.
    marked = _run({"peer": NOISY}, max_repeats=None)["peer"]
    assert len(marked.timing.times) == 5 and marked.noisy and marked.extra["stopped"] == CAP


def test_interleaving_is_kept_in_extra_rounds() -> None:
    timer = ScriptedTimer({"rlkern": STEADY, "peer": NOISY, "floor": STEADY})
    run_case(_case(timer), repeats=2, max_iqr=0.1, max_repeats=4, timer=timer)
    assert timer.timed == ["rlkern", "peer", "floor", "peer", "floor", "rlkern",
                           "floor", "rlkern", "peer", "rlkern", "peer", "floor"]


@pytest.mark.parametrize(("kw", "match"), [({"max_iqr": 0.0}, "max_iqr"),
                                           ({"max_iqr": -0.1}, "max_iqr"),
                                           ({"max_repeats": 4}, "max_repeats")])
def test_run_case_rejects_a_bad_rule(kw: dict[str, float], match: str) -> None:
    timer = ScriptedTimer({})
    with pytest.raises(ValueError, match=match):
        run_case(_case(timer), repeats=5, timer=timer, **kw)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# writers


def _noisy_results() -> tuple[list[runner.Measurement], dict]:
    timer = ScriptedTimer({"rlkern": STEADY, "peer": NOISY, "floor": lambda k: 0.5})
    results = run_case(_case(timer), repeats=5, max_iqr=0.1, max_repeats=8, timer=timer)
    env = report.environment("cpu", {"max_iqr": 0.1, "max_repeats": 8})
    return results, env


def _check_header(line: str) -> None:
    date = line.split(";")[0].removeprefix("run ")
    when = dt.datetime.fromisoformat(date)
    assert when.utcoffset() == dt.timedelta(0)  # UTC, ISO 8601
    assert abs((dt.datetime.now(dt.timezone.utc) - when).total_seconds()) < 600
    assert report.cpu_model() in line and "cores" in line
    assert f"torch {torch.__version__}" in line and "triton " in line
    assert "noisy = IQR ≥ 10% of the median after up to 8 rounds" in line


def test_json_has_header_noisy_flag_and_null_ratios() -> None:
    results, env = _noisy_results()
    data = json.loads(json.dumps(report.to_json(results, env)))
    _check_header(data["header"])
    assert data["environment"]["max_iqr"] == 0.1 and "triton" in data["environment"]
    rows = {r["impl"]: r for r in data["results"]}
    peer = rows["peer"]
    assert peer["noisy"] is True and peer["ratio_rlkern"] is None and peer["ratio_floor"] is None
    assert len(peer["timing"]["times"]) == 8 and peer["timing"]["median"] == 2.0
    assert peer["timing"]["iqr"] == 2.0  # the raw figures are kept
    assert rows["rlkern"]["noisy"] is False and rows["rlkern"]["ratio_floor"] == 2.0


def test_markdown_marks_noisy_and_prints_no_ratio() -> None:
    results, env = _noisy_results()
    lines = report.to_markdown(results, env).splitlines()
    _check_header(lines[2])
    row = {line.split("|")[2].strip(): [c.strip() for c in line.split("|")[1:-1]]
           for line in lines if line.startswith("| 4 |")}
    assert row["peer"][2] == "~2 s" and row["peer"][5:7] == ["noisy", "noisy"]
    assert row["peer"][7].startswith("noisy: IQR 100% of the median")
    assert row["rlkern"][2] == "1 s" and row["rlkern"][6] == "2×"
    assert row["floor"][5] == "0.5×" and row["floor"][6] == "1×"


def test_text_table_marks_noisy_and_has_the_header() -> None:
    from rich.console import Console

    results, env = _noisy_results()
    out = io.StringIO()
    report.print_tables(results, Console(file=out, width=200), env=env)
    text = out.getvalue()
    _check_header(text.splitlines()[0])
    peer = next(line for line in text.splitlines() if " peer " in line)
    assert "~2 s" in peer and peer.count("noisy") == 3 and "×" not in peer


# ---------------------------------------------------------------------------------------------
# CLI


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_cli_passes_the_rule_to_the_runner(monkeypatch) -> None:
    seen: list[dict] = []
    monkeypatch.setattr(runner, "run_case", lambda case, **kw: seen.append(kw) or [])
    assert cli.run(_parse("--op", "logprobs", "--device", "cpu")) == 0
    assert seen[-1]["max_iqr"] == 0.10 and seen[-1]["max_repeats"] == 30
    assert cli.run(_parse("--op", "logprobs", "--device", "cpu", "--max-iqr", "0.2",
                          "--max-repeats", "12")) == 0
    assert seen[-1]["max_iqr"] == 0.2 and seen[-1]["max_repeats"] == 12
    assert cli.run(_parse("--op", "logprobs", "--device", "cpu", "--max-iqr", "0")) == 0
    assert seen[-1]["max_iqr"] is None  # 0: the rule is off


@pytest.mark.parametrize("argv", [("--max-iqr", "-0.1"), ("--repeats", "8", "--max-repeats", "7")])
def test_cli_rejects_a_bad_rule(argv: tuple[str, ...], capsys) -> None:
    assert cli.run(_parse("--op", "logprobs", "--device", "cpu", *argv)) == 2
    assert "rlkern bench: --max-" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["rlkern bench", "python -m rlkern.bench"])
def test_help_states_the_rule(command: str) -> None:
    from rlkern import cli as rlkern_cli
    from rlkern.bench import __main__ as bench_main

    out = io.StringIO()
    with pytest.raises(SystemExit), contextlib.redirect_stdout(out):
        if command == "rlkern bench":
            rlkern_cli.main(["bench", "--help"])
        else:
            bench_main.main(["--help"])
    text = " ".join(out.getvalue().split())
    assert "--max-iqr" in text and "--max-repeats" in text
    assert 'every ratio that involves it (× rlkern, × floor) reads "noisy"' in text
