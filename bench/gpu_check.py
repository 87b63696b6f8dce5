"""``python bench/gpu_check.py [--dry-run] [--out DIR]``: the same as ``rlkern gpu-check``
(see :mod:`rlkern.gpu_check`), for a checkout where the ``rlkern`` script is not on PATH."""

from __future__ import annotations

import sys

from rlkern.gpu_check import main

if __name__ == "__main__":
    sys.exit(main())
