"""``rlkern bench``: time rlkern against its peers and the machine's floor, in one process.

Examples::

    rlkern bench --quick                        # every case at its small sizes
    rlkern bench --op logprobs --json out.json --markdown out.md --plot plots/
    rlkern bench --op logprobs --size N=64,V=1000 --mode fwd --repeats 3

All implementations run in this one process, one after another, with their timed calls
interleaved; on CPU, glibc's allocator is set as :mod:`rlkern.bench.allocator` describes.

Noise rule: the timed calls run in interleaved rounds (one call per implementation, the order
rotating each round). After --repeats rounds, more rounds run until every implementation's
interquartile range (IQR) is below --max-iqr × its median (default 0.10), or --max-repeats
rounds have run, or one more round would take an implementation past --budget. A measurement
whose IQR is still at or above that bound is noisy: its median is printed with a "~" prefix
and every ratio that involves it (× rlkern, × floor) reads "noisy" instead of a number (null,
with "noisy": true, in the JSON). Every table starts with the run's UTC date and the machine.
"""

from __future__ import annotations

import argparse
import sys

import torch

from rlkern.backends import BACKENDS
from rlkern.bench import allocator
from rlkern.bench.runner import DEFAULT_MAX_IQR, DEFAULT_MAX_REPEATS

DEFAULT_BUDGET_S = 45.0
DEFAULT_REPEATS = 5


def _size(text: str) -> dict[str, int]:
    """Parse ``N=64,V=1000``."""
    try:
        pairs = [part.split("=", 1) for part in text.split(",") if part]
        return {key.strip(): int(value) for key, value in pairs}
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected e.g. N=64,V=1000, got {text!r}") from exc


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Define the ``bench`` options on ``parser`` and make :func:`run` its handler."""
    parser.add_argument("--quick", action="store_true",
                        help="small sizes only (each case's quick sizes)")
    parser.add_argument("--op", action="append", metavar="NAME",
                        help="case to run (repeatable; default: all registered cases)")
    parser.add_argument("--json", metavar="PATH", help="write every measurement as JSON")
    parser.add_argument("--markdown", metavar="PATH", help="write Markdown tables")
    parser.add_argument("--plot", metavar="DIR", help="write PNG plots (time, memory vs size)")
    parser.add_argument("--repeats", type=int, default=DEFAULT_REPEATS, metavar="K",
                        help="timed calls (rounds) per measurement at least; the median is "
                        "reported (default %(default)s)")
    parser.add_argument("--max-iqr", type=float, default=DEFAULT_MAX_IQR, metavar="FRACTION",
                        help="repeat rounds until every IQR is below FRACTION × its median; "
                        "one still at or above it is reported noisy, with no ratio "
                        "(default %(default)g; 0 = no repeats and no noise rule)")
    parser.add_argument("--max-repeats", type=int, default=DEFAULT_MAX_REPEATS, metavar="K",
                        help="at most K rounds of timed calls in all (>= --repeats; default "
                        "%(default)s)")
    parser.add_argument("--mode", action="append", metavar="MODE",
                        help="only this mode, e.g. fwd or fwd+bwd (repeatable)")
    parser.add_argument("--impl", action="append", metavar="NAME",
                        help="only this peer (repeatable); rlkern and the floor always run")
    parser.add_argument("--size", action="append", type=_size, metavar="N=..,V=..",
                        help="replace the case's sizes (repeatable; dims are the case's, so use "
                        "with --op)")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, metavar="SECONDS",
                        help="skip an implementation whose timed calls would take longer than "
                        "this, and its larger sizes (default %(default)g; 0 = no limit)")
    parser.add_argument("--backend", default="auto", choices=BACKENDS,
                        help="backend of the rlkern implementation (default auto)")
    parser.add_argument("--device", default=None,
                        help="cpu or cuda (default: cuda when available)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the benchmarks selected by ``args``; returns the process exit code."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.repeats < 1:
        print("rlkern bench: --repeats must be >= 1", file=sys.stderr)
        return 2
    if args.max_iqr < 0:
        print("rlkern bench: --max-iqr must be >= 0 (0 turns the noise rule off)",
              file=sys.stderr)
        return 2
    if args.max_repeats < args.repeats:
        print(f"rlkern bench: --max-repeats ({args.max_repeats}) must be >= --repeats "
              f"({args.repeats})", file=sys.stderr)
        return 2
    if args.repeats < DEFAULT_REPEATS:
        print(f"rlkern bench: note: {args.repeats} timed calls per measurement; medians of fewer "
              f"than {DEFAULT_REPEATS} are easily moved by one slow call", file=sys.stderr)

    from rich.console import Console

    from rlkern.bench import report
    from rlkern.bench.cases import CaseOptions, Size, case_names, get_case
    from rlkern.bench.runner import ERROR, run_case

    console = Console()
    names = args.op or case_names()
    unknown = sorted(set(names) - set(case_names()))
    if unknown:
        console.print(f"[red]unknown case(s) {unknown}; known: {case_names()}[/]")
        return 2
    if device.type == "cpu" and not allocator.available():
        console.print("[yellow]note:[/] not glibc: CPU peak-memory figures may miss memory "
                      "the allocator reuses without returning it")
    options = CaseOptions(device=device, rlkern_backend=args.backend)
    results = []
    notes: dict[str, tuple[str, ...]] = {}
    extra_env: dict[str, str] = {}
    budget = args.budget if args.budget and args.budget > 0 else None
    max_iqr = args.max_iqr or None  # 0: off
    # Dated when the run starts; the noise rule goes into every table's header line.
    env = report.environment(device, {"max_iqr": max_iqr, "max_repeats": args.max_repeats})
    with report.Progress(console) as progress:
        for name in names:
            case = get_case(name, options)
            notes[name] = case.notes
            extra_env.update({f"{name}.{k}": v for k, v in case.environment.items()})
            for warning in case.warnings:
                progress.note(warning)
            known = {i.name for mode in case.modes for i in case.implementations(mode)}
            if args.impl and not set(args.impl) <= known:
                progress.note(f"{name}: no implementation(s) {sorted(set(args.impl) - known)}; "
                              f"known: {sorted(known)}")
            sizes = ([Size(s) for s in args.size] if args.size
                     else case.quick_sizes if args.quick else case.sizes)
            modes = [m for m in args.mode if m in case.modes] if args.mode else None
            if modes == []:
                progress.note(f"{name}: has modes {list(case.modes)}, none of {args.mode}")
                continue
            measured = run_case(case, sizes=sizes, modes=modes, repeats=args.repeats,
                                budget_s=budget, device=device, dtype=options.dtype,
                                only=args.impl, listener=progress, max_iqr=max_iqr,
                                max_repeats=args.max_repeats)
            results += measured
            if case.summary is not None:
                notes[name] = (*notes[name], *case.summary(measured, args.plot))
    env.update(extra_env)
    report.print_tables(results, console, notes, env)
    if args.json:
        console.print(f"wrote {report.write_json(args.json, results, env, notes)}")
    if args.markdown:
        console.print(f"wrote {report.write_markdown(args.markdown, results, env, notes)}")
    if args.plot:
        for path in report.write_plots(args.plot, results, env):
            console.print(f"wrote {path}")
    return 1 if any(m.status == ERROR and m.role == "rlkern" for m in results) else 0
