"""pytest-benchmark suite over the ``token_baseline`` case (see bench/suite.py): verl's
optimal_token_baseline and tir_optimal_token_baseline against rlkern's.

Run with ``pytest bench/ --benchmark-only``.
"""

import torch

from suite import make_suite

inputs, references, test_token_baseline = make_suite("token_baseline", torch.float32)
