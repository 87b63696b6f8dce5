"""pytest-benchmark suite over the ``gae`` case (see bench/suite.py): verl's gae,
reinforce_plus_plus and remax against rlkern's.

Run with ``pytest bench/ --benchmark-only``.
"""

import torch

from suite import make_suite

inputs, references, test_gae = make_suite("gae", torch.float32)
