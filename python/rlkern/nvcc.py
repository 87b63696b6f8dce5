"""Compile the CUDA C++ sources ahead of time and report ptxas' resource usage per kernel.

No GPU is needed: ``nvcc`` compiles every ``csrc/cuda/*.cu`` for the requested architectures
(default ``sm_80`` and ``sm_90``) with ``-Xptxas -v``, and ptxas' verbose report is parsed into
one row per (kernel, architecture)::

    {"file": "csrc/cuda/logprobs.cu",   # path relative to the repository root
     "kernel": "void rlkern::(anonymous namespace)::logprobs_fwd_kernel<...>(...)",
     "arch": 80,                         # int, the compute capability × 10
     "registers": 40, "spill_stores": 0, "spill_loads": 0,   # bytes for the spills
     "shared_bytes": 320}                # static shared memory per block

``kernel`` is demangled with ``c++filt`` when it is available, else the mangled name.
The compile command for one source and one architecture is::

    nvcc -std=c++17 -O3 -I csrc/include -gencode arch=compute_XX,code=sm_XX -Xptxas -v -c -o <tmp>.o

Each (source, arch) pair is a separate nvcc process (run in parallel), so ptxas' per-arch
reports cannot interleave and every line is attributed to the right architecture.

Used by ``tests/test_cuda_compile.py`` (every kernel compiles for both architectures; the hot
kernels do not spill) and by ``rlkern aot-report``. Needs the source tree (an editable install
or a checkout): a non-editable install has no ``csrc`` and raises :class:`FileNotFoundError`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

__all__ = [
    "NvccError",
    "compile_cuda_sources",
    "cuda_sources",
    "find_nvcc",
    "nvcc_available",
    "repo_root",
]

DEFAULT_ARCHS = (80, 90)
NVCC_FLAGS = ("-std=c++17", "-O3")
COMPILE_TIMEOUT_S = 600

_ENTRY_RE = re.compile(r"Compiling entry function '(?P<name>[^']+)' for 'sm_(?P<arch>\d+)")
_PROPS_FOR_RE = re.compile(r"Function properties for (?P<name>\S+)")
_SPILL_RE = re.compile(
    r"(?P<stack>\d+) bytes stack frame, (?P<stores>\d+) bytes spill stores, "
    r"(?P<loads>\d+) bytes spill loads"
)
_USED_RE = re.compile(r"Used (?P<regs>\d+) registers")
_SMEM_RE = re.compile(r"(?P<smem>\d+) bytes smem")


class NvccError(RuntimeError):
    """nvcc failed to compile a source (the message holds the command and its output)."""


def find_nvcc() -> str | None:
    """Path of ``nvcc``: ``$RLKERN_NVCC``, ``$CUDA_HOME/bin``, ``$CUDA_PATH/bin``, ``PATH``,
    then ``/usr/local/cuda/bin``; ``None`` if none exists."""
    explicit = os.environ.get("RLKERN_NVCC")
    if explicit:
        return explicit if Path(explicit).is_file() else None
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


def nvcc_available() -> bool:
    """Whether an ``nvcc`` executable can be found (see :func:`find_nvcc`)."""
    return find_nvcc() is not None


def repo_root() -> Path:
    """The source tree holding ``csrc/`` (this file is ``<root>/python/rlkern/nvcc.py``)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "csrc" / "cuda").is_dir():
        raise FileNotFoundError(
            f"rlkern's CUDA sources are not next to the package (looked for {root / 'csrc'}): "
            "compiling them needs the source tree, i.e. a checkout or an editable install "
            "(`pip install --no-build-isolation -e .`), not an installed wheel"
        )
    return root


def cuda_sources() -> list[Path]:
    """Every ``csrc/cuda/*.cu`` of the source tree, sorted."""
    return sorted((repo_root() / "csrc" / "cuda").glob("*.cu"))


def _display_path(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _parse_ptxas(text: str) -> list[dict]:
    """Rows ``{kernel (mangled), arch, registers, spill_stores, spill_loads, shared_bytes}``.

    ptxas -v prints, per entry function::

        ptxas info : Compiling entry function '<mangled>' for 'sm_80'
        ptxas info : Function properties for <mangled>
            0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
        ptxas info : Used 40 registers, used 1 barriers, 320 bytes smem, 464 bytes cmem[0]

    ("bytes smem" is absent when the kernel has no static shared memory.)
    """
    rows: list[dict] = []
    spills: dict[str, tuple[int, int]] = {}
    entry: str | None = None
    arch = 0
    props_for: str | None = None
    for line in text.splitlines():
        if m := _ENTRY_RE.search(line):
            entry, arch = m["name"], int(m["arch"])
            continue
        if m := _PROPS_FOR_RE.search(line):
            props_for = m["name"]
            continue
        if (m := _SPILL_RE.search(line)) and props_for is not None:
            spills[props_for] = (int(m["stores"]), int(m["loads"]))
            continue
        if (m := _USED_RE.search(line)) and entry is not None:
            smem = _SMEM_RE.search(line)
            stores, loads = spills.get(entry, (0, 0))
            rows.append(
                {
                    "kernel": entry,
                    "arch": arch,
                    "registers": int(m["regs"]),
                    "spill_stores": stores,
                    "spill_loads": loads,
                    "shared_bytes": int(smem["smem"]) if smem else 0,
                }
            )
            entry = None
    return rows


def _demangle(names: Sequence[str]) -> dict[str, str]:
    """Map mangled → demangled with one ``c++filt`` call; identity if c++filt is missing."""
    unique = sorted(set(names))
    cxxfilt = shutil.which("c++filt")
    if not unique or cxxfilt is None:
        return {n: n for n in unique}
    try:
        out = subprocess.run(
            [cxxfilt],
            input="\n".join(unique) + "\n",
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return {n: n for n in unique}
    if len(out) != len(unique):
        return {n: n for n in unique}
    return dict(zip(unique, out, strict=True))


def _compile_one(nvcc: str, source: Path, arch: int, include: Path, obj: Path) -> str:
    cmd = [
        nvcc,
        *NVCC_FLAGS,
        f"-I{include}",
        "-gencode",
        f"arch=compute_{arch},code=sm_{arch}",
        "-Xptxas",
        "-v",
        "-c",
        "-o",
        str(obj),
        str(source),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise NvccError(f"nvcc timed out after {COMPILE_TIMEOUT_S} s: {' '.join(cmd)}") from exc
    if proc.returncode != 0:
        raise NvccError(
            f"nvcc failed (exit {proc.returncode}) for {source.name} on sm_{arch}:\n"
            f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}"
        )
    return proc.stdout + proc.stderr  # ptxas -v reports on stderr; keep both to be safe


def compile_cuda_sources(
    archs: Iterable[int] = DEFAULT_ARCHS,
    sources: Iterable[str | os.PathLike[str]] | None = None,
) -> list[dict]:
    """Compile CUDA sources with nvcc for each architecture and parse ptxas' report.

    Args:
        archs: compute capabilities × 10 (``80`` → ``sm_80``).
        sources: ``.cu`` files (default: every ``csrc/cuda/*.cu`` of the source tree).

    Returns:
        One dict per (source, kernel, arch) with keys ``file`` (str, relative to the repository
        root), ``kernel`` (str, demangled when ``c++filt`` exists), ``arch`` (int),
        ``registers``, ``spill_stores``, ``spill_loads`` (bytes), ``shared_bytes`` (static
        shared memory, bytes) — all ints; sorted by file, kernel, arch.

    Raises:
        FileNotFoundError: nvcc or the source tree is missing.
        NvccError: a source failed to compile.
    """
    nvcc = find_nvcc()
    if nvcc is None:
        raise FileNotFoundError(
            "nvcc not found (looked at $RLKERN_NVCC, $CUDA_HOME/bin, $CUDA_PATH/bin, PATH and "
            "/usr/local/cuda/bin)"
        )
    root = repo_root()
    srcs = cuda_sources() if sources is None else [Path(s).resolve() for s in sources]
    arch_list = [int(a) for a in archs]
    jobs = [(src, arch) for src in srcs for arch in arch_list]
    if not jobs:
        return []
    include = root / "csrc" / "include"
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="rlkern-nvcc-") as tmp:
        workers = max(1, min(len(jobs), os.cpu_count() or 1))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = [
                (
                    src,
                    pool.submit(
                        _compile_one,
                        nvcc,
                        src,
                        arch,
                        include,
                        Path(tmp) / f"{i}_{src.stem}.sm_{arch}.o",
                    ),
                )
                for i, (src, arch) in enumerate(jobs)
            ]
            for src, fut in futures:
                for row in _parse_ptxas(fut.result()):
                    rows.append({"file": _display_path(src, root), **row})
    names = _demangle([r["kernel"] for r in rows])
    out = [
        {
            "file": r["file"],
            "kernel": names[r["kernel"]],
            "arch": r["arch"],
            "registers": r["registers"],
            "spill_stores": r["spill_stores"],
            "spill_loads": r["spill_loads"],
            "shared_bytes": r["shared_bytes"],
        }
        for r in rows
    ]
    out.sort(key=lambda r: (r["file"], r["kernel"], r["arch"]))
    return out
