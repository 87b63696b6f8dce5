"""Presenting measurements: rich progress and tables, JSON, Markdown and PNG plots.

Every writer takes the list of :class:`~rlkern.bench.runner.Measurement` a run produced plus
the run's environment, so a table, a JSON file and a plot of one run always show the same data.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import math
import os
import platform
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from rlkern.bench import allocator
from rlkern.bench.runner import OK, Listener, Measurement, iqr_text

SCHEMA = "rlkern-bench/1"
_MIB = 1024 * 1024


# ---------------------------------------------------------------------------------------------
# Environment


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device | str, extra: Mapping[str, Any] | None = None) -> dict:
    """What a reader needs to interpret the numbers: software, machine, threads, date."""
    import rlkern

    dev = torch.device(device)
    env: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "rlkern": rlkern.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(dev),
        "cpu_allocator": (
            f"glibc, mmap threshold {allocator.TIMING_MMAP_THRESHOLD} B while timing, "
            f"{allocator.MEMORY_MMAP_THRESHOLD} B + malloc_trim while measuring memory"
            if allocator.available() else "not glibc: left as is"
        ),
    }
    if dev.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(dev)
        env["cuda"] = torch.version.cuda
    for package in ("triton", "trl"):
        try:
            # Metadata, not an import: importing trl takes seconds.
            env[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:  # optional; the cases say so
            env[package] = None
    env.update(extra or {})
    return env


def header_line(env: Mapping[str, Any]) -> str:
    """One line that dates a table and names the machine: UTC date (ISO 8601), CPU model and
    cores, GPU where there is one, torch / triton versions, and the noise rule of the run."""
    parts = [f"run {env.get('date')}", f"{env.get('cpu')}, {env.get('cpu_count')} cores "
             f"({env.get('torch_threads')} torch threads)"]
    if env.get("gpu"):
        parts.append(f"{env.get('gpu')} (CUDA {env.get('cuda')})")
    parts.append(f"torch {env.get('torch')}, triton {env.get('triton') or 'not installed'}")
    parts.append(f"device {env.get('device')}")
    if env.get("max_iqr") is not None:
        parts.append(f"noisy = IQR ≥ {float(env['max_iqr']):.0%} of the median after up to "
                     f"{env.get('max_repeats')} rounds (no ratio given)")
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------
# Formatting shared by the table writers


def fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds >= 1:
        return f"{seconds:.3g} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} µs"


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "—"
    return f"{n / _MIB:.4g} MiB"


def fmt_ratio(r: float | None) -> str:
    return "—" if r is None else f"{r:.3g}×"


#: What a table prints in place of a ratio withheld because a median in it is noisy.
NOISY = "noisy"


def ratio_cell(m: Measurement, which: str) -> str:
    """``m.ratio_rlkern`` / ``m.ratio_floor`` (``which``) as printed: ``noisy`` where the
    runner withheld it because a median in it is noisy, ``—`` where there is none."""
    if which in m.extra.get("ratio_withheld", ()):  # type: ignore[operator]
        return NOISY
    return fmt_ratio(getattr(m, which))


def median_cell(m: Measurement) -> str:
    """The median as printed; a noisy one carries a ``~`` prefix."""
    text = fmt_time(m.timing.median if m.timing else None)
    return f"~{text}" if m.noisy else text


def _check_text(m: Measurement) -> str:
    """The check column: agreement with rlkern, or why there is no number."""
    if m.status != OK:
        return f"{m.status}: {m.reason}"
    if m.noisy:
        noisy = f"{NOISY}: {iqr_text(m.timing)}" if m.timing is not None else NOISY
        if m.reason or m.check is not None:
            return f"{noisy}; {m.reason or m.check.message}"  # type: ignore[union-attr]
        return noisy
    if m.reason:
        return m.reason
    if m.check is None:
        return {"rlkern": "reference", "floor": "—"}.get(m.role, "")
    return m.check.message


def _groups(results: Sequence[Measurement]) -> dict[tuple[str, str], list[Measurement]]:
    out: dict[tuple[str, str], list[Measurement]] = {}
    for m in results:
        out.setdefault((m.case, m.mode), []).append(m)
    return out


def _size_text(size: Mapping[str, int]) -> str:
    return " ".join(f"{k}={v}" for k, v in size.items())


# ---------------------------------------------------------------------------------------------
# rich


class Progress(Listener):
    """A ``rich.progress`` bar over all measurements; notes print above it."""

    def __init__(self, console: Any | None = None) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeElapsedColumn,
        )
        from rich.progress import Progress as RichProgress

        self.console = console or Console()
        self._bar = RichProgress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), console=self.console, transient=True,
        )
        self._task: Any = None

    def __enter__(self) -> Progress:
        self._bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.__exit__(*exc)

    def start(self, total: int) -> None:
        self._task = self._bar.add_task("starting", total=total)

    def step(self, description: str) -> None:
        self._bar.update(self._task, description=description)

    def done(self, measurement: Measurement) -> None:
        self._bar.advance(self._task)

    def note(self, text: str) -> None:
        self._bar.console.print(f"[yellow]note:[/] {text}", highlight=False)


def print_tables(results: Sequence[Measurement], console: Any | None = None,
                 notes: Mapping[str, Sequence[str]] | None = None,
                 env: Mapping[str, Any] | None = None) -> None:
    """One rich table per (case, mode); a section per size. With ``env``, the
    :func:`header_line` (date, machine) is printed first."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    if not console.is_terminal and console.width < 160:
        # Piped or captured output: rich would assume 80 columns and wrap every row.
        console = Console(width=160)
    if env is not None:
        console.print(header_line(env), highlight=False, markup=False, soft_wrap=True)
    for (case, mode), rows in _groups(results).items():
        table = Table(title=f"{case} — {mode} ({rows[0].dtype}, {rows[0].device})",
                      title_justify="left")
        for col, just in (("size", "left"), ("implementation", "left"), ("median", "right"),
                          ("IQR", "right"), ("peak extra mem", "right"), ("× rlkern", "right"),
                          ("× floor", "right"), ("check", "left")):
            table.add_column(col, justify=just, no_wrap=col != "check")  # type: ignore[arg-type]
        last = None
        for m in rows:
            first = m.size != last
            if first and last is not None:
                table.add_section()
            last = m.size
            warned = m.check is not None and bool(m.check.warnings)
            style = ("red" if m.status in ("error", "mismatch") else "dim"
                     if m.status == "skipped" else "yellow" if warned or m.noisy else None)
            table.add_row(
                _size_text(m.size) if first else "", m.impl, median_cell(m),
                fmt_time(m.timing.iqr if m.timing else None),
                fmt_bytes(m.peak_bytes), ratio_cell(m, "ratio_rlkern"),
                ratio_cell(m, "ratio_floor"), _check_text(m), style=style,
            )
        console.print(table)
        for note in (notes or {}).get(case, ()):
            console.print(f"  [dim]{note}[/]", highlight=False)


# ---------------------------------------------------------------------------------------------
# JSON


def json_safe(value: Any) -> Any:
    """JSON-safe copy: non-finite floats become strings (JSON has no inf/NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def to_json(results: Sequence[Measurement], env: Mapping[str, Any],
            notes: Mapping[str, Sequence[str]] | None = None) -> dict:
    """The whole run as one JSON-ready dict: ``schema``, ``header`` (:func:`header_line`),
    ``environment``, ``notes``, ``results``.

    Each result holds every timed call (``timing.times``, seconds), the warm-up calls, the
    summary (median, min, IQR), peak extra memory in bytes, ratios and the check's errors.
    A result with ``noisy: true`` keeps its raw timing but has ``ratio_rlkern`` and
    ``ratio_floor`` null, and so does every ratio taken to it (``extra.ratio_withheld`` names
    those).
    """
    return json_safe({
        "schema": SCHEMA,
        "header": header_line(env),
        "environment": dict(env),
        "notes": {k: list(v) for k, v in (notes or {}).items()},
        "results": [asdict(m) for m in results],
    })


def write_json(path: str | os.PathLike, results: Sequence[Measurement],
               env: Mapping[str, Any], notes: Mapping[str, Sequence[str]] | None = None) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(to_json(results, env, notes), indent=2) + "\n")
    return out


# ---------------------------------------------------------------------------------------------
# Markdown


def to_markdown(results: Sequence[Measurement], env: Mapping[str, Any],
                notes: Mapping[str, Sequence[str]] | None = None) -> str:
    """A Markdown section per (case, mode): one row per size × implementation."""
    lines = [
        "# rlkern benchmark",
        "",
        header_line(env) + ".",
        "",
        "Median of the timed calls; ratios are to rlkern and to the floor measured in the same "
        f"run. A `~` median is noisy; a ratio that involves one reads `{NOISY}`.",
        "",
    ]
    for (case, mode), rows in _groups(results).items():
        dims = list(rows[0].size)
        lines += [f"## {case} — {mode} ({rows[0].dtype})", ""]
        head = [*dims, "implementation", "median", "IQR", "peak extra mem", "× rlkern",
                "× floor", "check"]
        lines += ["| " + " | ".join(head) + " |",
                  "|" + "|".join("---:" if h not in ("implementation", "check") else "---"
                                 for h in head) + "|"]
        for m in rows:
            cells = [str(m.size[d]) for d in dims] + [
                m.impl, median_cell(m),
                fmt_time(m.timing.iqr if m.timing else None), fmt_bytes(m.peak_bytes),
                ratio_cell(m, "ratio_rlkern"), ratio_cell(m, "ratio_floor"),
                _check_text(m).replace("|", "/"),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        lines += [f"- {note}" for note in (notes or {}).get(case, ())]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def write_markdown(path: str | os.PathLike, results: Sequence[Measurement],
                   env: Mapping[str, Any],
                   notes: Mapping[str, Sequence[str]] | None = None) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(to_markdown(results, env, notes))
    return out


# ---------------------------------------------------------------------------------------------
# Plots


def _sweeps(rows: Sequence[Measurement]) -> list[tuple[str, dict[str, int]]]:
    """(swept dim, fixed other dims) for every line of sizes with ≥ 2 values of one dim.

    Sizes that vary several dims at once (e.g. the quick sizes) form no such line; they are
    plotted against the product of the dims instead (``"N·V"``, fixed dims empty).
    """
    dims = list(rows[0].size)
    out: list[tuple[str, dict[str, int]]] = []
    for dim in dims:
        seen: dict[tuple, set[int]] = {}
        for m in rows:
            fixed = tuple((d, m.size[d]) for d in dims if d != dim)
            seen.setdefault(fixed, set()).add(m.size[dim])
        out += [(dim, dict(fixed)) for fixed, values in seen.items() if len(values) >= 2]
    if not out and len({tuple(m.size.items()) for m in rows}) >= 2 and len(dims) > 1:
        out.append(("·".join(dims), {}))
    return out


def _x(m: Measurement, dim: str) -> int:
    """The x value of ``m`` for ``dim``, a dim name or a product of dim names (``"N·V"``)."""
    value = 1
    for d in dim.split("·"):
        value *= m.size[d]
    return value


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")


def write_plots(directory: str | os.PathLike, results: Sequence[Measurement],
                env: Mapping[str, Any]) -> list[Path]:
    """PNGs of time and peak memory vs each swept dim, one line per implementation (log-log).

    One file per (case, mode, swept dim, fixed dims), e.g. ``logprobs_fwd_vs_N_V_151936.png``
    (``logprobs_fwd_vs_N_V.png`` when plotted against the product of the dims).
    """
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    out_dir = Path(directory)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for (case, mode), rows in _groups(results).items():
        for dim, fixed in _sweeps(rows):
            on_line = [m for m in rows
                       if m.status == OK and all(m.size[d] == v for d, v in fixed.items())]
            if not on_line:
                continue
            fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
            no_extra: list[str] = []
            # Colours by implementation, so both panels match even where one skips a line.
            for colour, impl in enumerate(dict.fromkeys(m.impl for m in rows)):
                pts = sorted(((_x(m, dim), m) for m in on_line if m.impl == impl),
                             key=lambda p: p[0])
                if not pts:
                    continue
                xs = [x for x, _ in pts]
                style = "--" if pts[0][1].role == "floor" else "-"
                ax_t.plot(xs, [m.timing.median for _, m in pts], style, marker="o", label=impl,
                          color=f"C{colour}")
                mem = [(x, m.peak_bytes / _MIB) for x, m in pts if m.peak_bytes]
                if mem:
                    ax_m.plot(*zip(*mem, strict=True), style, marker="o", label=impl,
                              color=f"C{colour}")
                if len(mem) < len(pts):  # a log axis cannot show 0: say so instead
                    no_extra.append(impl)
            fixed_txt = ", ".join(f"{k}={v}" for k, v in fixed.items()) or "sizes as run"
            for ax, ylabel in ((ax_t, "median time (s)"), (ax_m, "peak extra memory (MiB)")):
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel(dim)
                ax.set_ylabel(ylabel)
                ax.grid(True, which="both", alpha=0.3)
            ax_t.legend(fontsize=8)
            if no_extra:
                ax_m.text(0.02, 0.98, "no extra memory at some or all sizes (not drawn): "
                          + ", ".join(no_extra), transform=ax_m.transAxes, fontsize=7,
                          va="top", wrap=True)
            fig.suptitle(f"{case} {mode} vs {dim} ({fixed_txt}; {rows[0].dtype}, "
                         f"{env.get('device')}, torch {env.get('torch')})", fontsize=10)
            fig.tight_layout()
            stem = f"{_slug(case)}_{_slug(mode)}_vs_{_slug(dim)}"
            path = out_dir / (f"{stem}_{_slug(fixed_txt)}.png" if fixed else f"{stem}.png")
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written
