"""Ahead-of-time compilation of rlkern's GPU code, and its resource report (``rlkern aot-report``).

No GPU is needed: every Triton kernel listed in the ``AOT_SPECS`` of a ``rlkern.kernels``
module (or returned by its ``aot_specs(rlkern._C.LAYOUTS)``) is compiled with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` for each compute
capability (``sm_80``, ``sm_90`` by default), and the PTX is assembled with the same ``ptxas``
and flags Triton uses, with ``-v`` to read the resource usage:

* registers per thread and spill stores / loads (bytes) from ``ptxas -v``;
* shared memory (bytes) from Triton's metadata (Triton allocates it dynamically, so
  ``ptxas`` itself reports none).

A spec is a dict (built by ``aot_spec`` in ``kernels/_common.py``) with the keys ``name``
(config label), ``fn`` (the ``@triton.jit`` function), ``signature`` (arg name → Triton type,
``"constexpr"`` for constexpr args), ``constexprs`` (name → value), ``num_warps`` and optionally
``divisible_by_16`` (arg names Triton would specialise as 16-divisible at runtime) and
``num_stages``. Modules whose name starts with ``_`` (shared helpers) are not scanned.

With ``TRITON_INTERPRET=1`` (how the Triton kernels are tested on CPU), ``triton.jit`` returns
interpreter objects that cannot be compiled, so :func:`compile_all` compiles in a fresh Python
subprocess with that variable removed and reads its results back as JSON.

The CUDA C++ kernels (``csrc/cuda/*.cu``) are reported too when ``rlkern.nvcc`` and ``nvcc``
are available (``nvcc -Xptxas -v`` for the same architectures).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

Row = dict[str, Any]

DEFAULT_TARGETS: tuple[tuple[int], ...] = ((80,), (90,))

# Columns of the report, in order: (key, header).
_COLUMNS = (
    ("kernel", "kernel"),
    ("config", "config"),
    ("target", "target"),
    ("num_warps", "warps"),
    ("registers", "registers"),
    ("spill_stores", "spill st (B)"),
    ("spill_loads", "spill ld (B)"),
    ("shared_bytes", "shared (B)"),
)


# ---------------------------------------------------------------------------------------------
# Locating kernels and tools


def kernels_dir() -> Path:
    """The directory of the ``rlkern.kernels`` package (installed, or the source tree's)."""
    try:
        # Safe under TRITON_INTERPRET: the package's __init__ defines no kernels.
        pkg = importlib.import_module("rlkern.kernels")
        return Path(next(iter(pkg.__path__)))
    except ImportError:
        import rlkern

        return Path(rlkern.__file__).resolve().parents[2] / "kernels"


def _load_kernel_modules(directory: Path) -> tuple[list[ModuleType], list[Row]]:
    """Import every ``kernels/<op>.py`` (as ``rlkern.kernels.<op>``); import failures become
    error rows instead of aborting the report."""
    modules: list[ModuleType] = []
    errors: list[Row] = []
    for path in sorted(directory.glob("*.py")):
        if path.name.startswith("_"):
            continue
        name = f"rlkern.kernels.{path.stem}"
        try:
            module = sys.modules.get(name)
            if module is None:
                spec = importlib.util.spec_from_file_location(name, path)
                assert spec is not None and spec.loader is not None
                module = importlib.util.module_from_spec(spec)
                sys.modules[name] = module
                spec.loader.exec_module(module)
        except Exception as exc:  # a module under construction must not hide the others
            sys.modules.pop(name, None)
            errors.append({"kernel": path.stem, "config": "-", "target": "-",
                           "error": f"import failed: {exc!r}"})
            continue
        modules.append(module)
    return modules, errors


def find_ptxas(cc: int = 90) -> str | None:
    """The ``ptxas`` Triton uses for compute capability ``cc`` (its bundled one unless
    overridden), else the first ``ptxas`` on ``PATH``; ``None`` if there is none."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        path = get_ptxas(cc).path
        if path and os.path.exists(path):
            return str(path)
    except Exception:  # triton missing or its layout changed: fall back to PATH
        pass
    return shutil.which("ptxas")


# ---------------------------------------------------------------------------------------------
# Compiling one spec (runs in the worker process)


def _spec_fields(spec: Any) -> dict[str, Any]:
    """Accept a dict spec or an object with the same attributes."""
    keys = ("name", "fn", "signature", "constexprs", "num_warps", "divisible_by_16")
    if isinstance(spec, dict):
        return {k: spec.get(k) for k in keys}
    return {k: getattr(spec, k, None) for k in keys}


_RE_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_RE_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_RE_REGS = re.compile(r"Used (\d+) registers")


def parse_ptxas_log(log: str) -> dict[str, dict[str, int]]:
    """Per entry function: ``registers``, ``spill_stores``, ``spill_loads`` from ``ptxas -v``."""
    usage: dict[str, dict[str, int]] = {}
    current: dict[str, int] | None = None
    for line in log.splitlines():
        if match := _RE_ENTRY.search(line):
            current = usage.setdefault(match.group(1), {})
        elif current is not None and (match := _RE_SPILL.search(line)):
            current["spill_stores"] = int(match.group(1))
            current["spill_loads"] = int(match.group(2))
        elif current is not None and (match := _RE_REGS.search(line)):
            current["registers"] = int(match.group(1))
    return usage


def _ptxas_usage(ptx: str, cc: int, kernel_name: str) -> dict[str, Any]:
    """Assemble ``ptx`` with Triton's ptxas flags plus ``-v`` and parse the resource usage."""
    ptxas = find_ptxas(cc)
    if ptxas is None:
        return {"error": "ptxas not found"}
    target = re.search(r"^\s*\.target\s+(sm_\w+)", ptx, re.MULTILINE)
    arch = target.group(1) if target else f"sm_{cc}{'a' if cc >= 90 else ''}"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        base = [ptxas, "-lineinfo", "-v", f"--gpu-name={arch}", str(src), "-o",
                str(Path(tmp) / "kernel.cubin")]
        # Triton passes --regAllocOptLevel=2 (a ptxas 13 workaround); older ptxas lack it.
        for extra in (["--regAllocOptLevel=2"], []):
            proc = subprocess.run([*base[:3], *extra, *base[3:]], capture_output=True, text=True,
                                  check=False)
            if proc.returncode == 0:
                break
        if proc.returncode != 0:
            return {"error": f"ptxas failed: {proc.stderr.strip()[-500:]}"}
    usage = parse_ptxas_log(proc.stdout + proc.stderr)
    found = usage.get(kernel_name) or (next(iter(usage.values())) if usage else None)
    if not found:
        return {"error": "no resource usage in the ptxas log"}
    return {"ptxas": ptxas, "arch": arch, **found}


def compile_spec(spec: Any, cc: int) -> Row:
    """Compile one spec for ``sm_<cc>`` and measure it. Never raises: errors go in ``error``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fields = _spec_fields(spec)
    fn = fields["fn"]
    kernel = getattr(fn, "__name__", str(fn))
    row: Row = {"kernel": kernel, "config": fields["name"], "target": f"sm_{cc}",
                "num_warps": fields["num_warps"], "registers": None, "spill_stores": None,
                "spill_loads": None, "shared_bytes": None, "error": None}
    try:
        arg_names = list(fn.arg_names)
        sig = fields["signature"]
        signature = {name: sig[name] for name in arg_names}  # the kernel's argument order
        attrs = {(arg_names.index(name),): [["tt.divisibility", 16]]
                 for name in fields["divisible_by_16"] or ()}
        src = ASTSource(fn=fn, signature=signature, constexprs=dict(fields["constexprs"] or {}),
                        attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                                  options={"num_warps": int(fields["num_warps"])})
        row["shared_bytes"] = int(getattr(compiled.metadata, "shared", 0))
        usage = _ptxas_usage(compiled.asm["ptx"], cc, compiled.metadata.name)
        row["error"] = usage.pop("error", None)
        for key in ("registers", "spill_stores", "spill_loads"):
            row[key] = usage.get(key)
        row["arch"] = usage.get("arch")
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {str(exc).strip()[-800:]}"
    return row


def _normalise_targets(targets: Iterable[int | Sequence[int]]) -> list[int]:
    """``((80,), (90,))``, ``(80, 90)`` or ``["80", "sm_90"]`` → ``[80, 90]``."""
    out = []
    for target in targets:
        value = target[0] if isinstance(target, (tuple, list)) else target
        out.append(int(str(value).removeprefix("sm_")))
    return out


def _module_specs(module: ModuleType) -> list[Any]:
    """A kernel module's specs: its ``AOT_SPECS``, or ``aot_specs(rlkern._C.LAYOUTS)`` for a
    module whose kernels take the layout tables of the C++ headers as constexprs."""
    if hasattr(module, "aot_specs"):
        from rlkern import _C

        return list(module.aot_specs(_C.LAYOUTS))
    return list(getattr(module, "AOT_SPECS", ()))


def compile_in_process(targets: Iterable[int | Sequence[int]] = DEFAULT_TARGETS,
                       directory: Path | None = None) -> list[Row]:
    """Compile every spec of every kernel module here (``TRITON_INTERPRET`` must be off)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("TRITON_INTERPRET=1: Triton kernels cannot be compiled ahead of time "
                           "in this process; use compile_all(), which uses a subprocess")
    modules, rows = _load_kernel_modules(directory or kernels_dir())
    for cc in _normalise_targets(targets):
        for module in modules:
            for spec in _module_specs(module):
                row = compile_spec(spec, cc)
                row["module"] = module.__name__.rsplit(".", 1)[-1]
                rows.append(row)
    return rows


_compiled: dict[tuple[Any, ...], list[Row]] = {}


def _sources_fingerprint(directory: Path) -> tuple[tuple[str, int, int], ...]:
    """(name, mtime, size) of every kernel source: a cached result is reused only while the
    sources are unchanged."""
    return tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size)
                 for p in sorted(directory.glob("*.py")))


def compile_all(targets: Iterable[int | Sequence[int]] = DEFAULT_TARGETS,
                timeout: float = 1800.0, *, use_cache: bool = True) -> list[Row]:
    """Compile every Triton kernel spec for every target in a clean subprocess.

    Args:
        targets: compute capabilities, as ``((80,), (90,))`` or ``(80, 90)``.
        timeout: seconds for the whole compilation.
        use_cache: reuse this process's earlier result for the same targets while the kernel
            sources are unchanged (the report and the tests then compile once).

    Returns:
        One row per (spec, target): ``kernel, config, target, num_warps, registers,
        spill_stores, spill_loads, shared_bytes, error`` (``error`` is ``None`` on success).
    """
    ccs = _normalise_targets(targets)
    directory = kernels_dir()
    key = (tuple(ccs), str(directory), _sources_fingerprint(directory))
    if use_cache and key in _compiled:
        return [dict(row) for row in _compiled[key]]
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    # The child sees exactly the modules this process sees (source tree or installed).
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "aot.json"
        cmd = [sys.executable, "-m", "rlkern.aot", "--worker-out", str(out),
               "--kernels-dir", str(directory), "--targets", ",".join(map(str, ccs))]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                              check=False)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"AOT worker failed (exit {proc.returncode}):\n"
                               f"{(proc.stdout + proc.stderr)[-3000:]}")
        rows = json.loads(out.read_text())
    _compiled[key] = rows
    return [dict(row) for row in rows]


# ---------------------------------------------------------------------------------------------
# CUDA C++ kernels (nvcc), owned by rlkern.nvcc


def cuda_results(archs: Sequence[int] = (80, 90)) -> tuple[list[Row], str | None]:
    """``nvcc -Xptxas -v`` usage of ``csrc/cuda/*.cu`` as ``(rows, None)``, or ``([], reason)``."""
    try:
        nvcc_mod = importlib.import_module("rlkern.nvcc")
    except ImportError as exc:
        return [], f"CUDA kernels not reported: rlkern.nvcc is not importable ({exc})"
    if shutil.which("nvcc") is None:
        return [], "CUDA kernels not reported: nvcc is not on PATH"
    compile_sources = getattr(nvcc_mod, "compile_cuda_sources", None)
    if compile_sources is None:
        return [], "CUDA kernels not reported: rlkern.nvcc has no compile_cuda_sources()"
    try:
        return list(compile_sources(archs=tuple(archs))), None
    except Exception as exc:
        return [], f"CUDA kernels not reported: compile_cuda_sources failed ({exc!r})"


# ---------------------------------------------------------------------------------------------
# Report


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)


def render_table(rows: Sequence[Row], columns: Sequence[tuple[str, str]], title: str) -> None:
    """Print ``rows`` as a table: with ``rich`` when installed, plain text otherwise."""
    try:
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table
    except ImportError:
        header = [h for _, h in columns]
        body = [[_cell(r.get(k)) for k, _ in columns] for r in rows]
        widths = [max(len(x) for x in col) for col in zip(header, *body, strict=True)]
        print(title)
        for line in (header, ["-" * w for w in widths], *body):
            print("  ".join(x.ljust(w) for x, w in zip(line, widths, strict=True)))
        return
    table = Table(title=title)
    for key, header in columns:
        numeric = key not in ("kernel", "config", "target", "file")
        table.add_column(header, justify="right" if numeric else "left")
    for r in rows:
        # escape: config labels such as "[bf16]" must not be read as rich markup
        table.add_row(*[escape(_cell(r.get(k))) for k, _ in columns])
    Console(width=max(shutil.get_terminal_size().columns, 160)).print(table)


def run(args: argparse.Namespace) -> int:
    """``rlkern aot-report``: compile, print the tables, optionally write JSON. Returns 1 if a
    kernel failed to compile or spilled (the latter only with ``--fail-on-spill``)."""
    ccs = _normalise_targets(args.targets.split(","))
    rows = compile_all(ccs)
    arch_list = ", ".join(f"sm_{cc}" for cc in ccs)
    render_table(rows, _COLUMNS, f"Triton kernels, compiled ahead of time ({arch_list})")
    failed = [r for r in rows if r.get("error")]
    for r in failed:
        print(f"ERROR {r['kernel']} {r['config']} {r['target']}: {r['error']}")
    spilled = [r for r in rows if (r.get("spill_stores") or 0) + (r.get("spill_loads") or 0)]

    cuda_rows: list[Row] = []
    note: str | None = "CUDA kernels skipped (--no-cuda)"
    if not args.no_cuda:
        cuda_rows, note = cuda_results(ccs)
    if cuda_rows:
        columns = (("file", "file"), ("kernel", "kernel"), ("arch", "arch"),
                   ("registers", "registers"), ("spill_stores", "spill st (B)"),
                   ("spill_loads", "spill ld (B)"), ("shared_bytes", "shared (B)"))
        render_table(cuda_rows, columns, "CUDA kernels (nvcc -Xptxas -v)")
    elif note:
        print(note)

    if args.json:
        Path(args.json).write_text(json.dumps({"triton": rows, "cuda": cuda_rows,
                                               "cuda_note": note}, indent=2))
        print(f"wrote {args.json}")
    if failed or (args.fail_on_spill and spilled):
        return 1
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``rlkern aot-report``; sets ``args.func``."""
    parser.add_argument("--targets", default="80,90",
                        help="comma-separated compute capabilities (default: 80,90)")
    parser.add_argument("--json", metavar="PATH", default=None,
                        help="also write the results as JSON to PATH")
    parser.add_argument("--no-cuda", action="store_true",
                        help="skip the nvcc report of csrc/cuda/*.cu")
    parser.add_argument("--fail-on-spill", action="store_true",
                        help="exit with status 1 if any Triton kernel spills registers")
    parser.set_defaults(func=run)


def _worker_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the compile subprocess (``python -m rlkern.aot --worker-out PATH``)."""
    parser = argparse.ArgumentParser(prog="python -m rlkern.aot")
    parser.add_argument("--worker-out", required=True)
    parser.add_argument("--kernels-dir", default=None)
    parser.add_argument("--targets", default="80,90")
    args = parser.parse_args(argv)
    directory = Path(args.kernels_dir) if args.kernels_dir else None
    rows = compile_in_process(args.targets.split(","), directory)
    Path(args.worker_out).write_text(json.dumps(rows))
    return 0


if __name__ == "__main__":
    if "--worker-out" in sys.argv:
        sys.exit(_worker_main())
    cli = argparse.ArgumentParser(prog="python -m rlkern.aot", description=__doc__)
    add_arguments(cli)
    parsed = cli.parse_args()
    sys.exit(parsed.func(parsed))
