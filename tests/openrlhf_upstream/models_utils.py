"""``openrlhf/models/utils.py`` with rlkern's ``log_probs_from_logits`` and ``compute_entropy``
(placed there by tests/test_openrlhf_upstream.py; OpenRLHF's module is ``utils_upstream.py``)."""

# ruff: noqa: I001 (the order is the point: rlkern's names replace the star-imported ones)
from .utils_upstream import *  # noqa: F403

from rlkern.integrations.openrlhf import compute_entropy, log_probs_from_logits  # noqa: F401
