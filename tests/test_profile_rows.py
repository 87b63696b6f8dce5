"""bench/profile/rows.sh (the per-row CPU cost table of docs/benchmarks.md) builds against the
sources and runs: every case prints a finite time, and the read comes first as the 1.00x
reference. Two rows, so it takes seconds; the figures themselves are not asserted."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "profile" / "rows.sh"


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to build the profile harness")
def test_rows_profile_builds_and_runs(tmp_path):
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    out = subprocess.run(["bash", str(SCRIPT), "2"], capture_output=True, text=True, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if re.search(r"\d+\.\d+\s+\d", line)]
    names = [re.split(r"\s{2,}", r.strip())[0] for r in rows]
    assert names[0].startswith("read") and len(names) == 14, out.stdout
    assert "fold, block in L1" in names and "2^x + add only, in L1" in names
    assert "fold + entropy, 0.1 % -inf" in names and "sample: no filter, no entropy" in names
    assert "copy (read + write)" in names and "backward (grad_row)" in names
    assert rows[0].split()[-1] == "1.00"
    for r in rows:
        us, gbs, ratio = (float(v) for v in r.split()[-3:])
        assert us > 0 and gbs > 0 and ratio > 0
