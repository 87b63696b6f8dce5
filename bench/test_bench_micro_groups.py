"""pytest-benchmark suite over the ``micro_groups`` case (see bench/suite.py): a real
``rlkern.generate_groups`` run on a tiny random Llama per schedule, checked to give the same
completions as the length-aware schedule before it is timed.

Run with ``pytest bench/ --benchmark-only``. The scheduling figures (peak KV tokens, decode
steps, the lognormal simulation) are in ``rlkern bench --op micro_groups`` and
``test_bench_sample.py::test_micro_group_schedule``.
"""

import pytest
import torch

pytest.importorskip("transformers", reason="the micro_groups case runs a transformers Llama")

from suite import make_suite

# The tiny model runs in fp32 whatever the dtype.
inputs, references, test_micro_groups = make_suite("micro_groups", torch.float32)
