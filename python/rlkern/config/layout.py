"""The layout tables of the op families, as the C++ headers define them (``rlkern._C.LAYOUTS``).

``layout("policy_loss").row_stats.pg_sum`` is the index of the ``pg_sum`` row of the policy-loss
``row_stats``; ``len(layout("policy_loss").row_stats)`` its number of rows. The numbering exists
only in the headers (``csrc/include/rlkern/layout.h``): Python and the Triton launchers read it
from here and never restate a number.

The tables are read once, when this module is imported (or, if ``rlkern._C`` could not be
imported then, at the first call), into a plain dict: code traced by ``torch.compile`` then
only looks them up (dynamo can neither build the ``IntEnum`` classes nor see through
``functools.cache``).
"""

from __future__ import annotations

import enum
from types import SimpleNamespace

__all__ = ["entries", "layout"]

_TABLES: dict[str, SimpleNamespace] = {}
#: family → table → {entry name: index}, in index order: plain dicts, for hot paths
_ENTRIES: dict[str, dict[str, dict[str, int]]] = {}


def _load() -> None:
    from rlkern import _C

    for family, tables in _C.LAYOUTS.items():
        _TABLES[family] = SimpleNamespace(**{
            name: enum.IntEnum(f"{family}.{name}", [(entry, i) for i, entry in enumerate(entries)])
            for name, entries in tables.items()
        })
        _ENTRIES[family] = {name: {entry: i for i, entry in enumerate(entries)}
                            for name, entries in tables.items()}


def layout(family: str) -> SimpleNamespace:
    """The tables of ``family`` as ``IntEnum`` classes (attribute = entry name, value = index)."""
    if not _TABLES:
        _load()
    try:
        return _TABLES[family]
    except KeyError:
        known = ", ".join(sorted(_TABLES)) or "none"
        raise KeyError(f"no layout for op family {family!r} (known: {known})") from None


def entries(family: str, table: str) -> dict[str, int]:
    """``{entry name: index}`` of one table, in index order: what ``layout(family).<table>``
    holds, as a plain dict (a lookup or an iteration costs a fraction of the ``IntEnum``'s,
    which matters on a small call's path). Do not modify it."""
    layout(family)  # loads the tables, or raises as layout() does
    return _ENTRIES[family][table]


try:
    _load()
except ImportError:  # rlkern._C is not built: layout() raises the ImportError when called
    pass
