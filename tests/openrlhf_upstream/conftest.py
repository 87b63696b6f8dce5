"""OpenRLHF 0.11.2's own CPU tests of the code rlkern replaces, run against rlkern's drop-ins.

``tests/test_openrlhf_upstream.py`` takes two of OpenRLHF's test files and the modules they
load (from the OpenRLHF 0.11.2 wheel: OpenRLHF publishes no source distribution) and lays them
out as in OpenRLHF's tree, except for two modules, which it renames ``utils_upstream.py`` and
``loss_upstream.py`` and replaces with ``models_utils.py`` and ``models_loss.py`` of this
folder: OpenRLHF's modules with rlkern's ``log_probs_from_logits``, ``compute_entropy`` and
``PolicyLoss`` (:mod:`rlkern.integrations.openrlhf`) under OpenRLHF's names. OpenRLHF's test
files load those modules by file path, so every call they make to these names reaches rlkern;
the rest (``aggregate_loss``, ``masked_mean``, the actor) stays OpenRLHF's.

OpenRLHF's ``models/utils.py`` imports DeepSpeed at import time; where DeepSpeed is not
installed this conftest puts a stand-in module in its place before the test files load it
(OpenRLHF's own actor test does the same for DeepSpeed, flash-attn and peft). The drop-ins
never call DeepSpeed.
"""

from __future__ import annotations

import functools
import importlib.machinery
import importlib.util
import json
import os
import sys
from unittest.mock import MagicMock

import rlkern.integrations.openrlhf as _drop_ins

if importlib.util.find_spec("deepspeed") is None:
    _stub = MagicMock()
    _stub.__spec__ = importlib.machinery.ModuleSpec("deepspeed", None)
    sys.modules["deepspeed"] = _stub


# Counts of the calls OpenRLHF's tests make to rlkern's drop-ins, written at the end of the
# session to the file named by RLKERN_UPSTREAM_CALLS (tests/test_openrlhf_upstream.py checks
# that each drop-in ran). The wrappers go in before the swapped modules import the names.
_CALLS = {"log_probs_from_logits": 0, "compute_entropy": 0, "PolicyLoss.forward": 0}


def _counted(name, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _CALLS[name] += 1
        return fn(*args, **kwargs)

    return wrapper


_drop_ins.log_probs_from_logits = _counted("log_probs_from_logits",
                                           _drop_ins.log_probs_from_logits)
_drop_ins.compute_entropy = _counted("compute_entropy", _drop_ins.compute_entropy)
_drop_ins.PolicyLoss.forward = _counted("PolicyLoss.forward", _drop_ins.PolicyLoss.forward)


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("RLKERN_UPSTREAM_CALLS")
    if path:
        with open(path, "w") as f:
            json.dump(_CALLS, f)
