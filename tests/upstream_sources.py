"""Another project's own test files, taken from its source distribution when a test runs.

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
from pathlib import Path

import pytest


def fetch_sdist_files(package: str, version: str, members: dict[str, str], dest: Path, *,
                      strip: str = "") -> Path:
    """Extract ``members`` (path inside the sdist's top folder → sha256) of ``package==version``
    into ``dest``, each at its path less the prefix ``strip``, and return ``dest``. Skips the
    calling test, with the reason, when pip cannot download the source distribution; fails on
    a hash mismatch."""
    dest.mkdir(parents=True, exist_ok=True)
    download = dest / "sdist"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", f"{package}=={version}", "--no-deps",
         "--no-binary", ":all:", "--disable-pip-version-check", "-q", "-d", str(download)],
        capture_output=True, text=True, check=False)
    archives = sorted(download.glob("*.tar.gz")) if download.exists() else []
    if proc.returncode != 0 or not archives:
        pytest.skip(f"could not download the {package} {version} source distribution with pip "
                    f"(its own test files come from it): {proc.stderr.strip()[-300:]}")
    with tarfile.open(archives[0]) as tar:
        top = tar.getnames()[0].split("/")[0]
        for member, digest in members.items():
            data = tar.extractfile(f"{top}/{member}").read()
            assert hashlib.sha256(data).hexdigest() == digest, (
                f"{package} {version}'s {member} is not the file whose hash is recorded")
            target = dest / member.removeprefix(strip)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
    return dest
