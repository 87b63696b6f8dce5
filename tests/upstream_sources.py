"""Another project's own test files, taken from its source distribution (or its wheel, for a
project that publishes no sdist) when a test runs.

The files are not kept in this repository: :func:`fetch_sdist_files` downloads the pinned
source distribution with pip (the package index the environment is configured with), extracts
the named members and checks each against its recorded sha256, so what runs is the project's
file as released, byte for byte.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest


def _download(package: str, version: str, dest: Path, *, kind: str) -> Path:
    """Download ``package==version``'s source distribution (``kind="sdist"``) or wheel
    (``"wheel"``) into ``dest`` with pip; skips the calling test, with the reason, when pip
    cannot."""
    binary = ["--no-binary", ":all:"] if kind == "sdist" else ["--only-binary", ":all:"]
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", f"{package}=={version}", "--no-deps", *binary,
         "--disable-pip-version-check", "-q", "-d", str(dest)],
        capture_output=True, text=True, check=False)
    pattern = "*.tar.gz" if kind == "sdist" else "*.whl"
    archives = sorted(dest.glob(pattern)) if dest.exists() else []
    if proc.returncode != 0 or not archives:
        pytest.skip(f"could not download the {package} {version} {kind} with pip (its own test "
                    f"files come from it): {proc.stderr.strip()[-300:]}")
    return archives[0]


def _write_checked(package: str, version: str, member: str, data: bytes, digest: str,
                   target: Path) -> None:
    assert hashlib.sha256(data).hexdigest() == digest, (
        f"{package} {version}'s {member} is not the file whose hash is recorded")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)


def fetch_sdist_files(package: str, version: str, members: dict[str, str], dest: Path, *,
                      strip: str = "") -> Path:
    """Extract ``members`` (path inside the sdist's top folder → sha256) of ``package==version``
    into ``dest``, each at its path less the prefix ``strip``, and return ``dest``. Skips the
    calling test, with the reason, when pip cannot download the source distribution; fails on
    a hash mismatch."""
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(_download(package, version, dest / "sdist", kind="sdist")) as tar:
        top = tar.getnames()[0].split("/")[0]
        for member, digest in members.items():
            data = tar.extractfile(f"{top}/{member}").read()
            _write_checked(package, version, member, data, digest,
                           dest / member.removeprefix(strip))
    return dest


def fetch_wheel_files(package: str, version: str, members: dict[str, str], dest: Path, *,
                      strip: str = "") -> Path:
    """:func:`fetch_sdist_files` for a project that publishes wheels only: ``members`` are
    paths inside the wheel (e.g. ``openrlhf-0.11.2.data/purelib/tests/...``)."""
    dest.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(_download(package, version, dest / "wheel", kind="wheel")) as wheel:
        for member, digest in members.items():
            _write_checked(package, version, member, wheel.read(member), digest,
                           dest / member.removeprefix(strip))
    return dest
