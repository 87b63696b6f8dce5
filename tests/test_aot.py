"""Ahead-of-time compilation of the Triton kernels for sm_80 / sm_90 (no GPU needed).

Every spec of every kernel module's ``AOT_SPECS`` must compile for both targets, and the
default configurations must not spill registers on sm_90. ``rlkern aot-report`` must run.
The compilation happens once (in a subprocess without TRITON_INTERPRET, see rlkern.aot) and
is shared by the tests of this file.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("triton")

import rlkern.cli
from rlkern import aot

TARGETS = (80, 90)


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    missing = [cc for cc in TARGETS if aot.find_ptxas(cc) is None]
    if missing:
        pytest.skip(f"ptxas not found for sm_{missing[0]} (neither Triton's bundled one nor "
                    "one on PATH): cannot assemble the PTX to read register usage")
    return aot.compile_all(TARGETS)


def _kernel_modules():
    import rlkern.kernels.logprobs as logprobs

    return [logprobs]


def test_specs_are_the_launcher_defaults():
    """The AOT specs come from the same heuristic as the launchers, for bf16/fp16/fp32 at
    V = 151936 (and a small V), and pass the temperature at runtime (DESIGN rule 7)."""
    from rlkern.kernels.logprobs import AOT_SPECS, launch_config

    for dtype, size in (("bf16", 2), ("fp16", 2), ("fp32", 4)):
        cfg = launch_config(151936, size)
        specs = [s for s in AOT_SPECS if s["name"].startswith(f"{dtype} V=151936 ")]
        names = {s["fn"].__name__ for s in specs}
        assert names == {"_logprobs_fwd_kernel", "_logprobs_bwd_kernel"}, dtype
        for spec in specs:
            assert spec["constexprs"]["BLOCK_V"] == cfg.block_v
            assert spec["num_warps"] == cfg.num_warps
            assert spec["signature"]["logits_ptr"] == f"*{dtype}"
            assert spec["signature"]["inv_temperature"] == "fp32"
    assert launch_config(151936, 2) == (4096, 16, 8, 8)


def test_every_spec_compiles(rows):
    expected = sum(len(m.AOT_SPECS) for m in _kernel_modules()) * len(TARGETS)
    compiled = [r for r in rows if r.get("module") == "logprobs"]
    assert len(compiled) == expected
    errors = [f"{r['kernel']} {r['config']} {r['target']}: {r['error']}" for r in rows
              if r.get("error")]
    assert not errors, "\n".join(errors)
    for r in rows:
        assert r["registers"] and r["registers"] > 0, r
        assert r["shared_bytes"] is not None, r


def test_no_register_spills_on_sm90(rows):
    spilled = [f"{r['config']}: {r['spill_stores']} B stores, {r['spill_loads']} B loads"
               for r in rows if r["target"] == "sm_90"
               and (r["spill_stores"] or r["spill_loads"])]
    assert not spilled, "\n".join(spilled)


def test_parse_ptxas_log():
    log = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'k_a' for 'sm_90a'
ptxas info    : Function properties for k_a
    0 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 32 bytes smem, 400 bytes cmem[0]
ptxas info    : Compiling entry function 'k_b' for 'sm_90a'
ptxas info    : Function properties for k_b
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 255 registers, 400 bytes cmem[0]
"""
    assert aot.parse_ptxas_log(log) == {
        "k_a": {"spill_stores": 8, "spill_loads": 12, "registers": 40},
        "k_b": {"spill_stores": 0, "spill_loads": 0, "registers": 255},
    }


def test_report_cli(rows, tmp_path: Path, monkeypatch, capsys):
    """``rlkern aot-report`` prints both tables and writes JSON. The Triton results come from
    the module's (cached) compilation; the nvcc side is exercised by test_cuda_compile.py, so
    here it is stubbed: once with a row, once with a reason for its absence."""
    cuda_row = {"file": "csrc/cuda/logprobs.cu", "kernel": "logprobs_fwd_kernel", "arch": 90,
                "registers": 40, "spill_stores": 0, "spill_loads": 0, "shared_bytes": 320}
    monkeypatch.setattr(aot, "cuda_results", lambda archs: ([cuda_row], None))
    out = tmp_path / "aot.json"
    assert rlkern.cli.main(["aot-report", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "_logprobs_fwd_kernel" in printed and "csrc/cuda/logprobs.cu" in printed
    report = json.loads(out.read_text())
    assert len(report["triton"]) == len(rows) and report["cuda"] == [cuda_row]

    monkeypatch.setattr(aot, "cuda_results", lambda archs: ([], "CUDA kernels not reported: x"))
    assert rlkern.cli.main(["aot-report"]) == 0
    assert "CUDA kernels not reported: x" in capsys.readouterr().out
