"""Importing this module registers rlkern in verl: ``rlkern.integrations.verl.register()``;
when ``RLKERN_VERL_PATCH_LOGPROBS=1``, ``patch_torch_functional()``; when
``RLKERN_VERL_PATCH_FUSED=1``, ``rlkern.integrations.verl_fused.patch_fused_kernels()`` (the
actor's ``use_fused_kernels`` path; ``RLKERN_VERL_TRUNCATED_SUPPORT="top_k=50,top_p=0.9"``
gives it the rollout's sampling filters); when ``RLKERN_VERL_REPLACE_ESTIMATORS=1``,
``replace_verl_estimators()`` (rlkern under verl's own ``gae`` / ``remax`` /
``reinforce_plus_plus``).

It exists for verl's ``VERL_USE_EXTERNAL_MODULES`` hook: verl imports the listed modules in
every process that imports verl, including its Ray workers (the trainer and the actor run
there, so a ``register()`` in the launching script alone does not reach them)::

    export VERL_USE_EXTERNAL_MODULES=rlkern.integrations.verl_plugin
"""

from __future__ import annotations

import os

from rlkern.integrations import verl as _verl
from rlkern.integrations import verl_fused as _verl_fused

_verl.register()
if os.environ.get("RLKERN_VERL_PATCH_LOGPROBS", "0") == "1":
    _verl.patch_torch_functional()
if os.environ.get("RLKERN_VERL_PATCH_FUSED", "0") == "1":
    _verl_fused.patch_fused_kernels(
        **_verl_fused.parse_filters(os.environ.get("RLKERN_VERL_TRUNCATED_SUPPORT", "")))
if os.environ.get("RLKERN_VERL_REPLACE_ESTIMATORS", "0") == "1":
    _verl.replace_verl_estimators()
