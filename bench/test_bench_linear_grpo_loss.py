"""pytest-benchmark suite over the ``linear_grpo_loss`` case (see bench/suite.py).

Run with ``pytest bench/ --benchmark-only``.
"""

import torch

from suite import make_suite

inputs, references, test_linear_grpo_loss = make_suite("linear_grpo_loss", torch.bfloat16)
