"""``openrlhf/models/loss.py`` with rlkern's ``PolicyLoss`` (placed there by
tests/test_openrlhf_upstream.py; OpenRLHF's module is ``loss_upstream.py``)."""

# ruff: noqa: I001 (the order is the point: rlkern's names replace the star-imported ones)
from .loss_upstream import *  # noqa: F403

from rlkern.integrations.openrlhf import PolicyLoss  # noqa: F401
