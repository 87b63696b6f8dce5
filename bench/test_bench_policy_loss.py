"""pytest-benchmark suite over the ``policy_loss`` case (see bench/suite.py).

Run with ``pytest bench/ --benchmark-only``.
"""

import torch

from suite import make_suite

# The case makes fp32 inputs whatever the dtype.
inputs, references, test_policy_loss = make_suite("policy_loss", torch.float32)
