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

import importlib.machinery
import importlib.util
import sys
from unittest.mock import MagicMock

if importlib.util.find_spec("deepspeed") is None:
    _stub = MagicMock()
    _stub.__spec__ = importlib.machinery.ModuleSpec("deepspeed", None)
    sys.modules["deepspeed"] = _stub
