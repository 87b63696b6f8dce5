"""Step d of ``rlkern gpu-check``: the report as JSON (everything) and Markdown (for reading).

The Markdown starts with one dated header line (UTC, ISO 8601) naming the GPU (or the CPU of a
dry run), CUDA, driver, torch and triton; then the steps, the tests' counts, and a table per
rlkern backend and op: median, IQR, × rlkern, × measured floor, × bandwidth floor. Noisy
medians (IQR ≥ 10 % of the median after the allowed rounds) carry a ``~`` and no ratio.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rlkern.bench.report import fmt_ratio, fmt_time, json_safe


def header_line(report: dict[str, Any]) -> str:
    """Date and machine of the check in one line."""
    env = report.get("environment") or {}
    where = (f"{env.get('gpu')} (sm {env.get('compute_capability')}), CUDA "
             f"{env.get('torch_cuda')}, driver {env.get('driver')}" if env.get("gpu")
             else f"dry run on CPU: {env.get('cpu')}, {env.get('cpu_count')} cores")
    return (f"run {env.get('date')}; {where}; torch {env.get('torch')}, triton "
            f"{env.get('triton') or 'not installed'}, rlkern {env.get('rlkern')}")


def _ratio(row: dict[str, Any], key: str) -> str:
    if key in (row.get("extra") or {}).get("ratio_withheld", ()) or (
            key == "ratio_hbm" and row.get("noisy")):
        return "noisy"
    return fmt_ratio(row.get(key))


def _bench_lines(bench: dict[str, Any]) -> list[str]:
    lines = [f"Bandwidth floor: bytes the case's floor moves / {bench['bytes_per_s'] / 1e9:.4g} "
             "GB/s.", ""]
    head = ["op", "mode", "size", "implementation", "median", "IQR", "× rlkern", "× floor",
            "× bandwidth floor", "status"]
    for p in bench["passes"]:
        lines += [f"### rlkern backend `{p['backend']}`", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in p["results"]:
            t = r.get("timing") or {}
            median = fmt_time(t.get("median"))
            status = r["status"] if not r.get("reason") else f"{r['status']}: {r['reason']}"
            if r.get("hbm_floor_s") is None and r["role"] == "floor" and r.get("why"):
                status += f" ({r['why']})"
            cells = [r["case"], r["mode"], " ".join(f"{k}={v}" for k, v in r["size"].items()),
                     r["impl"], f"~{median}" if r.get("noisy") else median,
                     fmt_time(t.get("iqr")), _ratio(r, "ratio_rlkern"), _ratio(r, "ratio_floor"),
                     _ratio(r, "ratio_hbm"), status.replace("|", "/")]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += [f"- not timed: {s}" for s in bench.get("skipped", ())]
    lines += [f"- failed: {s}" for s in bench.get("failed", ())]
    return lines


def to_markdown(report: dict[str, Any]) -> str:
    """The Markdown report (see the module doc)."""
    title = "rlkern gpu-check" + (" (dry run)" if report.get("dry_run") else "")
    lines = [f"# {title}", "", header_line(report) + ".", "", "## Steps", "",
             "| step | status | seconds | note |", "|---|---|---:|---|"]
    for s in report["steps"]:
        lines.append(f"| {s['name']} | {s['status']} | {s.get('seconds', '')} | "
                     f"{s.get('reason', '')} |".replace("\n", " "))
    env = report.get("environment") or {}
    lines += ["", "## Environment", ""]
    lines += [f"- {k}: {v}" for k, v in env.items() if k != "cuda_ops_registered"]
    lines.append(f"- CUDA kernels registered: {len(env.get('cuda_ops_registered') or [])} "
                 "rlkern ops")
    bw = report.get("bandwidth")
    if bw:
        lines.append(f"- bandwidth used for floors: {bw['bytes_per_s'] / 1e9:.4g} GB/s "
                     f"({bw['source']}); measured copy {bw['measured_copy_bytes_per_s'] / 1e9:.4g}"
                     " GB/s")
    tests = report.get("tests") or {}
    lines += ["", "## Tests", ""]
    if tests.get("counts"):
        c = tests["counts"]
        lines.append(f"{c['passed']} passed, {c['failures']} failed, {c['errors']} errors, "
                     f"{c['skipped']} skipped ({tests.get('seconds')} s"
                     f"{'; stopped by the timeout: partial' if c.get('partial') else ''}): "
                     f"`{tests.get('command')}` with RLKERN_TEST_DEVICE={tests.get('device')}")
    else:
        lines.append(f"{tests.get('status', 'not run')}: {tests.get('reason', '')}")
    if tests.get("status") == "failed":
        lines += ["", "```", *tests.get("log_tail", []), "```"]
    lines += ["", "## Timings", ""]
    bench = report.get("bench")
    lines += _bench_lines(bench) if bench else ["not run"]
    return "\n".join(lines).rstrip() + "\n"


def write_reports(out_dir: Path, report: dict[str, Any]) -> tuple[Path, Path]:
    """Write ``gpu_check.json`` (with the header line) and ``gpu_check.md`` into ``out_dir``."""
    report["header"] = header_line(report)
    js, md = out_dir / "gpu_check.json", out_dir / "gpu_check.md"
    js.write_text(json.dumps(json_safe(report), indent=2, default=str) + "\n")
    md.write_text(to_markdown(report))
    return js, md
