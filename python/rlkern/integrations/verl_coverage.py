"""Which of verl's registry entries rlkern covers, and why not the rest.

verl looks advantage estimators and policy losses up by name (``ADV_ESTIMATOR_REGISTRY``,
``POLICY_LOSS_REGISTRY`` of ``verl.trainer.ppo.core_algos``). rlkern registers ``rlkern_<name>``
for the names in :data:`rlkern.integrations.verl.ADV_ESTIMATORS` /
:data:`~rlkern.integrations.verl.POLICY_LOSSES`; every other name of verl 0.9.1 is listed here
with the reason. ``tests/test_integration_verl.py`` enumerates verl's registries at run time
and fails for a name in neither place (a new verl release shows up as a failing test), and
for a name listed here that rlkern does cover (the list must shrink as coverage grows).
:func:`coverage_markdown` renders the table of ``docs/integrations/verl.md`` (between its
``coverage`` markers; a test keeps the doc in step).
"""

from __future__ import annotations

from rlkern.integrations.verl import ADV_ESTIMATORS, POLICY_LOSSES

__all__ = ["NOT_COVERED_ESTIMATORS", "NOT_COVERED_LOSSES", "coverage_markdown"]

#: verl 0.9.1 advantage estimators without an ``rlkern_`` counterpart yet → why.
NOT_COVERED_ESTIMATORS: dict[str, str] = {}

#: verl 0.9.1 policy losses without an ``rlkern_`` counterpart yet → why.
NOT_COVERED_LOSSES: dict[str, str] = {
}


def _strip(name: str) -> str:
    return name.removeprefix("rlkern_")


def covered_estimators() -> list[str]:
    """verl names with an ``rlkern_`` estimator."""
    return sorted(_strip(n) for n in ADV_ESTIMATORS)


def covered_losses() -> list[str]:
    """verl names with an ``rlkern_`` policy loss."""
    return sorted(_strip(n) for n in POLICY_LOSSES)


def coverage_markdown() -> str:
    """The coverage table of docs/integrations/verl.md: one row per verl name."""
    lines = ["| verl registry | name | rlkern | note |", "|---|---|---|---|"]
    for registry, covered, missing in (
            ("ADV_ESTIMATOR_REGISTRY", covered_estimators(), NOT_COVERED_ESTIMATORS),
            ("POLICY_LOSS_REGISTRY", covered_losses(), NOT_COVERED_LOSSES)):
        for name in sorted({*covered, *missing}):
            if name in covered:
                lines.append(f"| {registry} | `{name}` | `rlkern_{name}` | |")
            else:
                lines.append(f"| {registry} | `{name}` | — | {missing[name]} |")
    return "\n".join(lines) + "\n"
