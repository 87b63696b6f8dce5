"""pytest-benchmark suite over the ``gdpo`` case (see bench/suite.py): verl's gdpo against
rlkern's.

Run with ``pytest bench/ --benchmark-only``.
"""

import torch

from suite import make_suite

inputs, references, test_gdpo = make_suite("gdpo", torch.float32)
