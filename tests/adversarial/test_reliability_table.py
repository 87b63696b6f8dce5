"""docs/reliability.md is what the adversarial suite gives today (it is generated, not written)."""

from __future__ import annotations

from adversarial.table import DOC, render


def test_reliability_doc_is_generated_from_the_suite() -> None:
    expected = render()
    assert DOC.exists(), "docs/reliability.md is missing: run `cd tests && python -m " \
        "adversarial.table`"
    assert DOC.read_text() == expected, (
        "docs/reliability.md is stale: run `cd tests && python -m adversarial.table`")
