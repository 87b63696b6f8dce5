"""pytest-benchmark suite over the ``advantages`` case (see bench/suite.py).

Run with ``pytest bench/ --benchmark-only``; verl's rows are skipped when verl is not installed.
"""

import torch

from suite import make_suite

inputs, references, test_advantages = make_suite("advantages", torch.float32)
