"""pytest-benchmark suite over the ``gigpo`` case (see bench/suite.py).

Run with ``pytest bench/ --benchmark-only``.
"""

import torch

from suite import make_suite

inputs, references, test_gigpo = make_suite("gigpo", torch.float32)
