"""Repository-wide pytest setup (tests/ and bench/).

The repository root holds `kernels/` (installed as `rlkern.kernels`). `python -m pytest` puts the
root on sys.path, where that folder would shadow Hugging Face's `kernels` package, which
transformers imports (and then fails). rlkern itself is imported from its installation, so the
root is dropped from sys.path before any test module imports transformers.
"""

from __future__ import annotations

import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT]
if getattr(sys.modules.get("kernels"), "__file__", "").startswith(str(_ROOT)):
    del sys.modules["kernels"]
