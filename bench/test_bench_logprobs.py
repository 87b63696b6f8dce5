"""pytest-benchmark suite over the ``logprobs`` case (see bench/suite.py).

Run with ``pytest bench/ --benchmark-only``.
"""

import torch

from suite import make_suite

inputs, references, test_logprobs = make_suite("logprobs", torch.bfloat16)
