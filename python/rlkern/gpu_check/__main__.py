"""``python -m rlkern.gpu_check``: the same as ``rlkern gpu-check``."""

from __future__ import annotations

import sys

from rlkern.gpu_check import main

if __name__ == "__main__":
    sys.exit(main())
