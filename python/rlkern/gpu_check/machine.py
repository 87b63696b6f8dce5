"""The machine under test: its environment and its memory bandwidth (step a of the check).

:func:`environment` records the GPU (name, compute capability, memory), CUDA and driver
versions, torch / triton / rlkern, and whether ``rlkern._C`` carries the CUDA kernels (the
``rlkern::*`` custom ops with a CUDA implementation registered), and which peer packages are
installed (:func:`peers`).

:func:`bandwidth` gives the peak memory bandwidth that the timing step divides bytes by: the
vendor's peak HBM figure from :data:`PEAK_HBM_BYTES_PER_S`, matched by GPU name, where the GPU
is listed; otherwise the measured device-to-device copy rate (a copy reads and writes each
byte once: 2 × bytes / time). Both are recorded, with which one is used.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import os
import platform
import shutil
import statistics
import subprocess
import time
from typing import Any

import torch

from rlkern.bench.report import cpu_model

#: Vendor peak memory bandwidth, bytes/s, by a substring of ``torch.cuda.get_device_name``;
#: the first match wins, so more specific names come first.
PEAK_HBM_BYTES_PER_S: tuple[tuple[str, float], ...] = (
    ("GH200", 4.0e12),
    ("H200", 4.8e12),
    ("H100 NVL", 3.9e12),
    ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),  # SXM5
    ("H800", 3.35e12),
    ("B200", 8.0e12),
    ("A100-SXM4-80GB", 2.039e12),
    ("A100 80GB PCIe", 1.935e12),
    ("A100", 1.555e12),  # 40 GB, SXM4 and PCIe
    ("A800", 2.039e12),
    ("L40S", 864e9),
    ("L40", 864e9),
    ("L4", 300e9),
    ("A10G", 600e9),
    ("A10", 600e9),
    ("RTX 4090", 1.008e12),
    ("V100", 900e9),
    ("T4", 320e9),
)


def peak_from_table(name: str) -> tuple[str, float] | None:
    """(table entry, bytes/s) of the first :data:`PEAK_HBM_BYTES_PER_S` entry in ``name``."""
    for key, value in PEAK_HBM_BYTES_PER_S:
        if key in name:
            return key, value
    return None


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _driver() -> str | None:
    """The NVIDIA driver version from ``nvidia-smi``, or ``None`` without it."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else None


#: Peer packages looked for (import name → distribution names to read the version from); the
#: check reports them and never installs them.
PEERS: dict[str, tuple[str, ...]] = {
    "trl": ("trl",), "verl": ("verl",), "liger_kernel": ("liger-kernel", "liger_kernel"),
    "flashinfer": ("flashinfer-python", "flashinfer"), "transformers": ("transformers",),
}


def peers() -> dict[str, str | None]:
    """Version of each :data:`PEERS` package that can be found (``"installed"`` when its
    version is unknown), ``None`` for the missing ones. Nothing is imported."""
    import importlib.util

    found: dict[str, str | None] = {}
    for module, dists in PEERS.items():
        if importlib.util.find_spec(module) is None:
            found[module] = None
            continue
        found[module] = next((v for d in dists if (v := _version(d))), "installed")
    return found


def ops_registered(dispatch_key: str = "CUDA") -> list[str]:
    """Sorted names of the ``rlkern::*`` ops of ``rlkern._C`` with a kernel registered for
    ``dispatch_key`` (``"CUDA"``: the CUDA kernels; ``"CPU"``: the C++ CPU kernels), read from
    the dispatcher (``torch.ops.rlkern`` lists only the ops already looked up)."""
    from rlkern import backends

    if not backends.has_cpp():
        return []
    return sorted(n for n in torch._C._dispatch_get_registrations_for_dispatch_key(dispatch_key)
                  if n.startswith("rlkern::"))


def environment(device: torch.device) -> dict[str, Any]:
    """Everything that says what was tested where (see the module doc)."""
    import rlkern
    from rlkern import backends

    env: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "rlkern": rlkern.__version__,
        "rlkern_C_built": backends.has_cpp(),
        "rlkern_C_with_cuda": backends.has_cuda_kernels(),
        "cuda_ops_registered": ops_registered("CUDA"),
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "driver": _driver(),
        "peers": peers(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, compute_capability=f"{props.major}.{props.minor}",
                   gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   gpu_count=torch.cuda.device_count())
    return env


def measured_copy_rate(device: torch.device, nbytes: int, repeats: int = 5) -> float:
    """Bytes/s of a copy between two ``nbytes`` buffers on ``device``: 2·nbytes / median time
    (each byte is read once and written once)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch and any lazy initialisation, untimed
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        dst.copy_(src)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * nbytes / statistics.median(times)


def bandwidth(device: torch.device, env: dict[str, Any], copy_bytes: int) -> dict[str, Any]:
    """The bandwidth the floors use, ``bytes_per_s``, and where it comes from (``source``)."""
    measured = measured_copy_rate(device, copy_bytes)
    out: dict[str, Any] = {"measured_copy_bytes_per_s": measured, "copy_bytes": copy_bytes}
    listed = peak_from_table(env.get("gpu", "")) if device.type == "cuda" else None
    if listed is not None:
        out.update(bytes_per_s=listed[1],
                   source=f"vendor peak HBM bandwidth of the {listed[0]} (table)")
    else:
        what = "device-to-device" if device.type == "cuda" else "CPU memory (dry-run stand-in)"
        out.update(bytes_per_s=measured, source=f"measured {what} copy, 2 × bytes / time")
    return out
