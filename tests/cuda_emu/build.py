"""Build CUDA sources into a CPU shared library whose kernels run in the emulator.

A ``.cu`` file is compiled by the host C++ compiler with ``cuda_emu.h`` force-included, after
three rewrites that keep every other character (and every line number) of the source:

* ``kernel<<<grid, block, shared_bytes, stream>>>(args)`` becomes a call of
  ``cuda_emu::launch`` that runs the kernel on emulated threads;
* ``__shared__ T name[N];`` becomes a reference to per-block storage, and
  ``extern __shared__ T name[];`` a pointer to the block's dynamic shared memory;
* a kernel declared with ``__launch_bounds__(max_threads, ...)`` gets a first statement that
  refuses blocks larger than ``max_threads``, as a GPU launch would.

The kernels are compiled with undefined-behaviour checks (misaligned accesses, out-of-bounds
indices of fixed-size arrays, signed overflow, bad shifts) whose reports fail the launch.
Libraries are cached by a hash of everything that goes into them. See README.md.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import itertools
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

EMU_DIR = Path(__file__).resolve().parent
HEADER = EMU_DIR / "cuda_emu.h"
# The runtime (cuda_emu_runtime.h says what each file holds), compiled once per compiler and
# emulator version and linked into every library.
RUNTIME_SOURCES = tuple(EMU_DIR / f"cuda_emu_{part}.cpp"
                        for part in ("runtime", "fiber", "api", "ubsan"))
RUNTIME_FILES = (*RUNTIME_SOURCES, EMU_DIR / "cuda_emu_runtime.h", EMU_DIR / "cuda_emu_fiber.h",
                 HEADER)
STUB_DIR = EMU_DIR / "include"  # stand-ins for <cuda_runtime.h>, <cuda_fp16.h>, <cuda_bf16.h>

# No fast-math and no FMA contraction: the host computes exactly what the source says.
# Strict aliasing is off because CUDA code reinterprets element arrays as uint4 vectors.
CXX_FLAGS = (
    "-std=c++17", "-O2", "-fPIC", "-pthread", "-ffp-contract=off", "-fno-strict-aliasing",
    "-Wall", "-Wno-unknown-pragmas", "-Wno-unused-function",
)
# Checks compiled into the kernels; cuda_emu_runtime.cpp implements their report handlers.
SANITIZE_FLAGS = (
    "-fsanitize=alignment,bounds,shift,signed-integer-overflow,integer-divide-by-zero,vla-bound",
    "-fsanitize-recover=all",
)
LINK_FLAGS = ("-shared", "-pthread", "-Wl,-z,defs", "-Wl,-Bsymbolic")
COMPILE_TIMEOUT_S = 300


class CudaEmuError(RuntimeError):
    """A source could not be rewritten or compiled (the message says where and why)."""


def find_compiler() -> list[str] | None:
    """The host C++ compiler: ``$CUDA_EMU_CXX`` (may hold a command line), else ``g++``."""
    explicit = os.environ.get("CUDA_EMU_CXX")
    if explicit:
        return shlex.split(explicit)
    found = shutil.which("g++")
    return [found] if found else None


# ------------------------------------------------------------------------------ rewriting


def _mask_comments_and_strings(text: str) -> str:
    """``text`` with comments and string/char literals blanked (newlines kept), so that the
    rewrites below only see code and every offset still points into ``text``."""
    out = list(text)
    i, n = 0, len(text)

    def blank(a: int, b: int) -> None:
        for k in range(a, b):
            if out[k] != "\n":
                out[k] = " "

    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            blank(i, j)
            i = j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
            blank(i, j)
            i = j
        elif c == '"' and i > 0 and text[i - 1] == "R" and (i < 2 or not _is_word(text[i - 2])
                                                             or text[i - 2] in "8uUL"):
            # a raw string R"delim( ... )delim"
            paren = text.find("(", i)
            close = text.find(")" + text[i + 1 : paren] + '"', paren)
            j = n if paren < 0 or close < 0 else close + paren - i + 1
            blank(i + 1, j - 1)
            i = j
        elif c == '"' or (c == "'" and not (i > 0 and _is_word(text[i - 1]))):
            # a string or char literal (a ' after a digit or letter is a digit separator)
            j = i + 1
            while j < n and text[j] != c and text[j] != "\n":
                j += 2 if text[j] == "\\" else 1
            blank(i + 1, min(j, n))
            i = j + 1
        else:
            i += 1
    return "".join(out)


def _is_word(c: str) -> bool:
    return c.isalnum() or c == "_"


def _line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def _match_forward(code: str, start: int) -> int:
    """Index of the bracket closing the one at ``start`` (``(``, ``[`` or ``{``)."""
    pairs = {"(": ")", "[": "]", "{": "}"}
    stack = []
    for i in range(start, len(code)):
        c = code[i]
        if c in pairs:
            stack.append(pairs[c])
        elif c in ")]}":
            if not stack or stack.pop() != c:
                break
            if not stack:
                return i
    raise CudaEmuError(f"unbalanced brackets from line {_line_of(code, start)}")


def _split_top_level(code: str) -> list[str]:
    """Split at the commas that are outside (), [] and {}."""
    parts, depth, last = [], 0, 0
    for i, c in enumerate(code):
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c == "," and depth == 0:
            parts.append(code[last:i])
            last = i + 1
    parts.append(code[last:])
    return [p.strip() for p in parts]


def _kernel_start(code: str, end: int) -> int:
    """Start of the kernel expression that ends at ``end`` (before ``<<<``): a possibly
    qualified name with template arguments, e.g. ``ns::kernel<T, (N > 2)>``."""
    i = end - 1
    while i >= 0 and code[i].isspace():
        i -= 1
    while i >= 0:
        if code[i] == ">":  # template arguments: back to the matching '<'
            angle = paren = 0
            while i >= 0:
                c = code[i]
                if c == ")":
                    paren += 1
                elif c == "(":
                    paren -= 1
                elif paren == 0 and c == ">":
                    angle += 1
                elif paren == 0 and c == "<":
                    angle -= 1
                    if angle == 0:
                        break
                i -= 1
            i -= 1
            while i >= 0 and code[i].isspace():
                i -= 1
        if i < 0 or not _is_word(code[i]):
            break
        while i >= 0 and _is_word(code[i]):
            i -= 1
        j = i
        while j >= 0 and code[j].isspace():
            j -= 1
        if j >= 1 and code[j - 1 : j + 1] == "::":
            i = j - 2
            while i >= 0 and code[i].isspace():
                i -= 1
            continue
        break
    return i + 1


def _one_line(s: str) -> str:
    return " ".join(s.split())


def _c_string(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


_SHARED_RE = re.compile(
    r"""(?P<extern>\bextern\s+)?(?:\bstatic\s+)?\b__shared__\s+
        (?:(?:__align__|alignas)\s*\(\s*(?P<align>\d+)\s*\)\s*)?
        (?P<type>[A-Za-z_][\w\s:<>,*]*?)\s*
        \b(?P<name>[A-Za-z_]\w*)\s*
        (?P<dims>(?:\[[^\[\];]*\]\s*)*)
        ;""",
    re.X,
)
_LAUNCH_BOUNDS_RE = re.compile(r"\b__launch_bounds__\s*\(")


@dataclass
class _Edit:
    start: int
    end: int
    text: str


def rewrite_cuda_source(text: str, display_name: str) -> str:
    """The emulator's version of a ``.cu`` source (see the module docstring).

    Line numbers are preserved and a ``#line`` directive names ``display_name``, so compiler
    messages and the emulator's error reports point into the original file.
    """
    code = _mask_comments_and_strings(text)
    edits: list[_Edit] = []

    def where(offset: int) -> str:
        return f"{display_name}:{_line_of(text, offset)}"

    def keep_lines(original: str, replacement: str) -> str:
        return replacement + "\n" * (original.count("\n") - replacement.count("\n"))

    # kernel<<<grid, block[, shared_bytes[, stream]]>>>(args)
    for m in re.finditer(r"<<<", code):
        close = code.find(">>>", m.end())
        if close < 0:
            raise CudaEmuError(f"{where(m.start())}: '<<<' without '>>>'")
        config = _split_top_level(text[m.end() : close])
        if not 2 <= len(config) <= 4 or not all(config):
            raise CudaEmuError(f"{where(m.start())}: cannot parse the launch configuration "
                               f"<<<{text[m.end() : close]}>>>")
        grid, block, shared, stream = config + ["0", "nullptr"][len(config) - 2 :]
        start = _kernel_start(code, m.start())
        kernel = text[start : m.start()].strip()
        if not kernel:
            raise CudaEmuError(f"{where(m.start())}: no kernel name before '<<<'")
        paren = close + 3
        while paren < len(code) and code[paren].isspace():
            paren += 1
        if paren >= len(code) or code[paren] != "(":
            raise CudaEmuError(f"{where(m.start())}: expected '(' after '>>>'")
        end = _match_forward(code, paren) + 1
        args = text[paren + 1 : end - 1].strip()
        replacement = (
            f"::cuda_emu::launch(::cuda_emu::LaunchConfig{{dim3({grid}), dim3({block}), "
            f"static_cast<size_t>({shared}), (cudaStream_t)({stream}), "
            f"{_c_string(_one_line(kernel))}, __PRETTY_FUNCTION__, __FILE__, __LINE__}}, "
            f"[&](auto&&... cuda_emu_args) {{ {_one_line(kernel)}(cuda_emu_args...); }}"
            + (f", {args})" if args else ")")
        )
        edits.append(_Edit(start, end, keep_lines(text[start:end], replacement)))

    # __shared__ declarations
    shared_ids = 0
    for m in _SHARED_RE.finditer(code):
        kind, name = text[m.start("type") : m.end("type")].strip(), m.group("name")
        dims = "".join(text[m.start("dims") : m.end("dims")].split())
        if m.group("extern"):
            if dims != "[]":
                raise CudaEmuError(
                    f"{where(m.start())}: extern __shared__ must be an unsized array"
                )
            replacement = f"{kind}* const {name} = ::cuda_emu::dynamic_shared<{kind}>();"
        else:
            align = m.group("align") or "0"
            replacement = (
                f"auto& {name} = ::cuda_emu::block_shared<{kind}{dims}, {align}>"
                f"({shared_ids}, {_c_string(name)});"
            )
            shared_ids += 1
        edits.append(_Edit(m.start(), m.end(), keep_lines(text[m.start() : m.end()], replacement)))

    # __launch_bounds__(max_threads, ...): refuse larger blocks at the top of the kernel body
    # (not through a macro: the check goes where the kernel is written)
    for m in _LAUNCH_BOUNDS_RE.finditer(code):
        if code[code.rfind("\n", 0, m.start()) + 1 : m.start()].lstrip().startswith("#"):
            continue
        close = _match_forward(code, m.end() - 1)
        max_threads = _split_top_level(text[m.end() : close])[0]
        depth, j = 0, close + 1
        while j < len(code):
            c = code[j]
            depth += c == "("
            depth -= c == ")"
            if depth == 0 and c in "{;":
                break
            j += 1
        if j < len(code) and code[j] == "{":
            check = f" if (::cuda_emu::launch_bounds_exceeded({max_threads})) return;"
            edits.append(_Edit(j + 1, j + 1, check))

    edits.sort(key=lambda e: e.start)
    for a, b in itertools.pairwise(edits):
        if b.start < a.end:
            raise CudaEmuError(f"{where(b.start)}: overlapping rewrites")
    covered = [(e.start, e.end) for e in edits]
    for m in re.finditer(r"\b__shared__\b", code):
        if not any(s <= m.start() < e for s, e in covered):
            raise CudaEmuError(
                f"{where(m.start())}: unsupported __shared__ declaration (supported: "
                "'__shared__ T name[dims];' and 'extern __shared__ T name[];' in a function)"
            )

    out = text
    for e in reversed(edits):
        out = out[: e.start] + e.text + out[e.end :]
    return f'#line 1 "{display_name}"\n' + out


# -------------------------------------------------------------------------------- building


def _display_name(path: Path) -> str:
    for parent in path.parents:
        if (parent / ".git").exists() or (parent / "pyproject.toml").exists():
            return path.relative_to(parent).as_posix()
    return path.as_posix()


def _header_files(dirs: Iterable[Path]) -> Iterator[Path]:
    for d in dirs:
        for p in sorted(Path(d).rglob("*")):
            if p.suffix in {".h", ".hpp", ".cuh", ".inc"} and p.is_file():
                yield p


def _run(cmd: Sequence[str], cwd: Path) -> None:
    try:
        proc = subprocess.run(
            list(cmd), cwd=cwd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S
        )
    except subprocess.TimeoutExpired as e:
        raise CudaEmuError(f"timed out after {COMPILE_TIMEOUT_S} s: {shlex.join(cmd)}") from e
    if proc.returncode != 0:
        log = (proc.stdout + proc.stderr).strip().splitlines()
        shown = "\n".join(log[:60]) + ("\n..." if len(log) > 60 else "")
        raise CudaEmuError(f"failed: {shlex.join(cmd)}\n{shown}")


def default_cache_dir() -> Path:
    explicit = os.environ.get("CUDA_EMU_CACHE")
    if explicit:
        return Path(explicit)
    return Path(tempfile.gettempdir()) / f"cuda-emu-{os.getuid() if hasattr(os, 'getuid') else 0}"


def build_library(
    sources: Sequence[str | os.PathLike],
    *,
    include_dirs: Sequence[str | os.PathLike] = (),
    defines: Sequence[str] = (),
    name: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """Compile ``sources`` (``.cu`` files) with the emulator into a shared library.

    Returns the library's path in ``cache_dir`` (default ``$CUDA_EMU_CACHE`` or a folder in
    the temp dir); an identical earlier build is reused. ``defines`` are ``NAME`` or
    ``NAME=VALUE``. Raises :class:`CudaEmuError` if no compiler is found or a step fails.
    """
    compiler = find_compiler()
    if compiler is None:
        raise CudaEmuError("no C++ compiler: install g++ or set CUDA_EMU_CXX")
    srcs = [Path(s).resolve() for s in sources]
    incs = [STUB_DIR, EMU_DIR, *(Path(d).resolve() for d in include_dirs)]
    include_flags = [f"-I{d}" for d in incs] + ["-include", str(HEADER)]
    define_flags = [f"-D{d}" for d in defines]
    rewritten = [rewrite_cuda_source(s.read_text(), _display_name(s)) for s in srcs]

    key = hashlib.sha256()
    version = subprocess.run([*compiler, "--version"], capture_output=True, text=True).stdout
    for part in (version, *CXX_FLAGS, *SANITIZE_FLAGS, *LINK_FLAGS, *define_flags, *rewritten):
        key.update(part.encode() + b"\0")
    for p in [*RUNTIME_SOURCES, *_header_files(incs)]:
        key.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    stem = name or "-".join(s.stem for s in srcs)
    out_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out = out_dir / f"{stem}-{key.hexdigest()[:16]}.so"
    if out.exists():
        return out

    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=f".{stem}-") as tmp:
        work = Path(tmp)
        jobs = []
        for i, (src, text) in enumerate(zip(srcs, rewritten, strict=True)):
            cpp = work / f"{i}-{src.stem}.emu.cpp"
            cpp.write_text(text)
            jobs.append([*compiler, *CXX_FLAGS, *SANITIZE_FLAGS, *include_flags, *define_flags,
                         "-x", "c++", "-c", str(cpp), "-o", f"{i}-{src.stem}.o"])
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            runtime = pool.submit(_runtime_objects, compiler, version, out_dir)
            for future in [pool.submit(_run, job, work) for job in jobs]:
                future.result()
            objects = [*map(str, runtime.result()), *(job[-1] for job in jobs)]
        _run([*compiler, *LINK_FLAGS, "-o", "lib.so", *objects], work)
        os.replace(work / "lib.so", out)
    # Keep the few newest builds of these sources (a loaded library may be unlinked safely).
    for old in sorted(out_dir.glob(f"{stem}-*.so"), key=lambda p: p.stat().st_mtime)[:-3]:
        with contextlib.suppress(OSError):
            old.unlink()
    return out


_runtime_lock = threading.Lock()


def _runtime_objects(compiler: list[str], version: str, out_dir: Path) -> list[Path]:
    """The compiled runtime files, shared by every library built with the same compiler and
    emulator files (built once even when several builds run at the same time). Compiled
    without the sanitizer: the checks are for the kernels, and the runtime implements their
    report handlers."""
    key = hashlib.sha256(version.encode())
    for part in (*CXX_FLAGS, *(p.read_text() for p in RUNTIME_FILES)):
        key.update(part.encode() + b"\0")
    objects = [out_dir / f"{src.stem}-{key.hexdigest()[:16]}.o" for src in RUNTIME_SOURCES]
    with _runtime_lock:
        missing = [(s, o) for s, o in zip(RUNTIME_SOURCES, objects, strict=True) if not o.exists()]
        if missing:
            with tempfile.TemporaryDirectory(dir=out_dir, prefix=".runtime-") as tmp, \
                    ThreadPoolExecutor(max_workers=len(missing)) as pool:
                jobs = [pool.submit(_run, [*compiler, *CXX_FLAGS, f"-I{STUB_DIR}", "-include",
                                           str(HEADER), "-c", str(src), "-o", obj.name], Path(tmp))
                        for src, obj in missing]
                for job in jobs:
                    job.result()
                for _, obj in missing:
                    os.replace(Path(tmp) / obj.name, obj)
    return objects


# --------------------------------------------------------------------------------- loading

ORDERS = {"forward": 0, "reverse": 1, "random": 2}


class EmulatedLibrary:
    """A loaded emulated library: ``lib`` holds the sources' own functions (bind their
    ``argtypes`` before calling); the methods control the emulator."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.lib = ctypes.CDLL(str(self.path))
        self.lib.cuda_emu_configure.argtypes = [
            ctypes.c_int, ctypes.c_uint64, ctypes.c_int, ctypes.c_int, ctypes.c_uint,
            ctypes.c_uint, ctypes.c_uint,
        ]
        self.lib.cuda_emu_configure.restype = None
        self.lib.cuda_emu_last_error.argtypes = []
        self.lib.cuda_emu_last_error.restype = ctypes.c_char_p
        self.lib.cuda_emu_counters.argtypes = [ctypes.POINTER(ctypes.c_uint64)]
        self.lib.cuda_emu_counters.restype = None
        self.configure()

    def configure(
        self,
        *,
        order: str = "forward",
        run_ahead: bool = False,
        seed: int = 0,
        workers: int = 0,
        max_grid: tuple[int, int, int] = (0, 0, 0),
    ) -> None:
        """Set how the following launches run (the defaults are restored by ``configure()``).

        order: the priority of a block's threads — ``forward`` (thread 0 first), ``reverse``,
        or ``random`` (seeded per block, and reshuffled every round when round-robin).
        run_ahead: False — round-robin: every runnable thread runs to its next barrier or
        warp operation, in ``order``, then the next round starts; True — always resume the
        first runnable thread in ``order``, so that it and its warp race ahead of the others
        as far as the barriers allow (this exposes a thread that reads shared memory late,
        after faster warps have overwritten it). A race-free kernel gives bitwise the same
        results under every setting.
        workers: OS threads that run blocks (0: one per hardware thread).
        max_grid: clamp each grid dimension (0: none), to exercise the grid-stride loops of a
        kernel written for any grid size; a kernel that assumes its full grid will fail.
        """
        self.lib.cuda_emu_configure(ORDERS[order], seed, int(run_ahead), workers, *max_grid)

    @contextlib.contextmanager
    def settings(self, **kwargs) -> Iterator[None]:
        """``configure(**kwargs)`` for the duration of a ``with`` block, then the defaults."""
        self.configure(**kwargs)
        try:
            yield
        finally:
            self.configure()

    def last_error(self) -> str:
        """Why the latest launch failed ("" if it did not)."""
        return self.lib.cuda_emu_last_error().decode()

    def counters(self) -> dict[str, int]:
        """Launches, blocks and threads run since the library was loaded."""
        out = (ctypes.c_uint64 * 3)()
        self.lib.cuda_emu_counters(out)
        return {"launches": out[0], "blocks": out[1], "threads": out[2]}


def load_library(sources: Sequence[str | os.PathLike], **kwargs) -> EmulatedLibrary:
    """:func:`build_library` then load the result."""
    return EmulatedLibrary(build_library(sources, **kwargs))
