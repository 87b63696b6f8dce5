"""The documented differences between Liger-Kernel 0.8.5 and rlkern's drop-in
(``rlkern.integrations.liger_compat``, whose docstring lists them): the tests of Liger's file
that they make fail, marked ``xfail(strict=True)`` here so that Liger's file stays as Liger
wrote it and a difference that disappears is reported."""

from __future__ import annotations

import os

import pytest
import torch

# Without a GPU, Liger's own Triton kernels (test_triton_grpo_loss_matches_reference) run in
# Triton's interpreter, switched on before they are imported, as in rlkern's suite.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

#: ``test_correctness`` has 1,536 parameter combinations (~13 min on 2 cores). The suite runs
#: every other test, every case marked below, and every ``SAMPLE_EVERY``-th of the others (a
#: fixed, spread selection: the parameters vary fastest in the last positions);
#: ``RLKERN_LIGER_UPSTREAM=full`` runs all of them.
SAMPLE_EVERY = 8

# Parameter ids of Liger's test_correctness with luspo at the sequence level whose per-token
# loss is (B, T) (a KL term or vLLM's token ratio): Liger 0.8.5 does not mask padded tokens
# there, the drop-in masks them as TRL does.
_LUSPO_UNMASKED = {
    'None-sequence-luspo-True-True-True-0.1-0.2-0.2-1.0-True-1.0-dtype0-0.1-0.5-8-128-1024-4096',
    'None-sequence-luspo-True-True-True-0.1-0.2-0.2-1.0-True-1.0-dtype1-2e-05-0.001-8-128-1024-4096',
    'None-sequence-luspo-True-True-True-0.1-0.2-0.2-1.0-True-1.0-dtype1-2e-05-0.001-3-47-31-123',
    'None-sequence-luspo-True-True-True-0.1-0.2-0.2-1.0-False-1.0-dtype1-2e-05-0.001-8-128-1024-4096',
    'None-sequence-luspo-True-True-True-0.1-0.2-0.2-1.0-False-1.0-dtype1-2e-05-0.001-3-47-31-123',
    'None-sequence-luspo-True-False-False-0.1-0.2-0.2-1.0-True-1.0-dtype0-0.1-0.5-8-128-1024-4096',
    'None-sequence-luspo-True-False-False-0.1-0.2-0.2-1.0-True-1.0-dtype1-2e-05-0.001-8-128-1024-4096',
    'None-sequence-luspo-True-False-False-0.1-0.2-0.2-1.0-True-1.0-dtype1-2e-05-0.001-3-47-31-123',
    'None-sequence-luspo-True-False-False-0.1-0.2-0.2-1.0-False-1.0-dtype0-0.1-0.5-8-128-1024-4096',
    'None-sequence-luspo-True-False-False-0.1-0.2-0.2-1.0-False-1.0-dtype1-2e-05-0.001-8-128-1024-4096',
    'None-sequence-luspo-True-False-False-0.1-0.2-0.2-1.0-False-1.0-dtype1-2e-05-0.001-3-47-31-123',
    'None-sequence-luspo-False-False-True-0.1-0.2-0.2-1.0-True-1.0-dtype0-0.1-0.5-8-128-1024-4096',
    'None-sequence-luspo-False-False-True-0.1-0.2-0.2-1.0-True-1.0-dtype0-0.1-0.5-3-47-31-123',
    '2.0-sequence-luspo-True-True-True-0.1-0.2-0.2-1.0-True-1.0-dtype0-0.1-0.5-8-128-1024-4096',
    '2.0-sequence-luspo-True-True-True-0.1-0.2-0.2-1.0-True-1.0-dtype1-2e-05-0.001-8-128-1024-4096',
    '2.0-sequence-luspo-True-True-True-0.1-0.2-0.2-1.0-True-1.0-dtype1-2e-05-0.001-3-47-31-123',
    '2.0-sequence-luspo-True-True-True-0.1-0.2-0.2-1.0-False-1.0-dtype1-2e-05-0.001-8-128-1024-4096',
    '2.0-sequence-luspo-True-True-True-0.1-0.2-0.2-1.0-False-1.0-dtype1-2e-05-0.001-3-47-31-123',
    '2.0-sequence-luspo-True-False-False-0.1-0.2-0.2-1.0-True-1.0-dtype0-0.1-0.5-8-128-1024-4096',
    '2.0-sequence-luspo-True-False-False-0.1-0.2-0.2-1.0-True-1.0-dtype1-2e-05-0.001-8-128-1024-4096',
    '2.0-sequence-luspo-True-False-False-0.1-0.2-0.2-1.0-True-1.0-dtype1-2e-05-0.001-3-47-31-123',
    '2.0-sequence-luspo-True-False-False-0.1-0.2-0.2-1.0-False-1.0-dtype0-0.1-0.5-8-128-1024-4096',
    '2.0-sequence-luspo-True-False-False-0.1-0.2-0.2-1.0-False-1.0-dtype1-2e-05-0.001-8-128-1024-4096',
    '2.0-sequence-luspo-True-False-False-0.1-0.2-0.2-1.0-False-1.0-dtype1-2e-05-0.001-3-47-31-123',
    '2.0-sequence-luspo-False-False-True-0.1-0.2-0.2-1.0-True-1.0-dtype0-0.1-0.5-8-128-1024-4096',
    '2.0-sequence-luspo-False-False-True-0.1-0.2-0.2-1.0-True-1.0-dtype0-0.1-0.5-3-47-31-123',
}
# test name (without parameters) → (a predicate on the parameter id, the reason)
XFAIL: dict[str, tuple] = {
    "test_correctness": (_LUSPO_UNMASKED.__contains__,
                         "luspo: the drop-in masks padded tokens as TRL does; Liger 0.8.5 keeps "
                         "them when the per-token loss is (B, T) (documented difference)"),
}


def pytest_collection_modifyitems(config, items):
    full = os.environ.get("RLKERN_LIGER_UPSTREAM", "") == "full"
    kept, dropped, seen = [], [], 0
    for item in items:
        name, _, params = item.name.partition("[")
        rule = XFAIL.get(name)
        marked = rule is not None and rule[0](params.rstrip("]"))
        if marked:
            item.add_marker(pytest.mark.xfail(strict=True, reason=rule[1]))
        if name == "test_correctness" and not marked and not full:
            seen += 1
            if seen % SAMPLE_EVERY:
                dropped.append(item)
                continue
        kept.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


def pytest_runtest_logreport(report):
    """Print the reason of every skip of Liger's file (its own ``pytest.skip`` calls, kept as
    Liger wrote them), so that the log of this process says why each case did not run."""
    if report.skipped and report.when in ("setup", "call"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        print(f"\nskipped {report.nodeid}: {reason}")
