"""The layout tables of the op families, as the C++ headers define them (``rlkern._C.LAYOUTS``).

``layout("policy_loss").row_stats.pg_sum`` is the index of the ``pg_sum`` row of the policy-loss
``row_stats``; ``len(layout("policy_loss").row_stats)`` its number of rows. The numbering exists
only in the headers (``csrc/include/rlkern/layout.h``): Python and the Triton launchers read it
from here and never restate a number.
"""

from __future__ import annotations

import enum
import functools
from types import SimpleNamespace

__all__ = ["layout"]


@functools.cache
def layout(family: str) -> SimpleNamespace:
    """The tables of ``family`` as ``IntEnum`` classes (attribute = entry name, value = index)."""
    from rlkern import _C

    try:
        tables = _C.LAYOUTS[family]
    except KeyError:
        known = ", ".join(sorted(_C.LAYOUTS)) or "none"
        raise KeyError(f"no layout for op family {family!r} (known: {known})") from None
    return SimpleNamespace(**{
        name: enum.IntEnum(f"{family}.{name}", [(entry, i) for i, entry in enumerate(entries)])
        for name, entries in tables.items()
    })
