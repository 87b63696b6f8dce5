"""rlkern.integrations._swap.FunctionSwap on a made-up package (no trainer needed)."""

from __future__ import annotations

import sys
import types

import pytest

from rlkern.integrations._swap import FunctionSwap


def _original():
    return "original"


def _own():
    return "own"


@pytest.fixture
def package(monkeypatch):
    """``fakepkg.utils`` defines ``f``; ``fakepkg.a`` imported it by name; ``fakepkg.b`` has
    its own ``f``; ``otherpkg.c`` imported it too but is another package."""
    modules = {name: types.ModuleType(name)
               for name in ("fakepkg", "fakepkg.utils", "fakepkg.a", "fakepkg.b", "otherpkg.c")}
    modules["fakepkg.utils"].f = _original
    modules["fakepkg.a"].f = _original
    modules["fakepkg.b"].f = _own
    modules["otherpkg.c"].f = _original
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return modules


def test_swaps_the_defining_module_and_by_name_importers_only(package):
    def drop_in():
        return "drop-in"

    swap = FunctionSwap("fakepkg.utils", {"f": drop_in, "missing": drop_in})
    assert not swap.applied
    replaced = swap.apply()
    assert replaced == ["fakepkg.utils.f", "fakepkg.a.f"]
    assert package["fakepkg.utils"].f is drop_in and package["fakepkg.a"].f is drop_in
    assert package["fakepkg.b"].f is _own  # its own function of that name
    assert package["otherpkg.c"].f is _original  # another package
    assert not hasattr(package["fakepkg.utils"], "missing")
    assert swap.apply() == replaced and swap.applied  # idempotent

    # a module loaded after the swap that imported the original by name (before the swap)
    late = types.ModuleType("fakepkg.late")
    late.f = _original
    sys.modules["fakepkg.late"] = late
    try:
        assert swap.apply() == [*replaced, "fakepkg.late.f"]
        swap.undo()
    finally:
        del sys.modules["fakepkg.late"]
    assert late.f is _original
    assert package["fakepkg.utils"].f is _original and package["fakepkg.a"].f is _original
    assert not swap.applied


def test_undo_leaves_a_later_replacement_alone(package):
    def drop_in():
        return "drop-in"

    def someone_elses():
        return "someone else's"

    swap = FunctionSwap("fakepkg.utils", {"f": drop_in})
    swap.apply()
    package["fakepkg.a"].f = someone_elses
    swap.undo()
    assert package["fakepkg.utils"].f is _original
    assert package["fakepkg.a"].f is someone_elses


def test_a_drop_in_is_never_taken_for_an_original(package):
    """Two swaps of the same name (e.g. the integration module imported twice): the second
    sees a drop-in, not TRL's function, and replaces nothing; undoing the first restores the
    original."""
    def first():
        return "first"

    def second():
        return "second"

    one = FunctionSwap("fakepkg.utils", {"f": first})
    two = FunctionSwap("fakepkg.utils", {"f": second})
    one.apply()
    assert two.apply() == []
    assert package["fakepkg.utils"].f is first
    two.undo()
    one.undo()
    assert package["fakepkg.utils"].f is _original
