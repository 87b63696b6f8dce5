"""Swapping drop-in functions into a package that imports its helpers by name.

A trainer's helper (verl's ``logprobs_from_logits``, TRL's ``selective_log_softmax``) lives in
one module, but other modules of the package bind it at import time (``from ..utils import
selective_log_softmax``): replacing the attribute of the defining module alone would leave
those bindings calling the original. :class:`FunctionSwap` replaces it in the defining module
and in every loaded module of the package whose attribute of that name *is* the original (a
module that defines its own function of the same name is left alone); modules imported later
read the defining module's (patched) attribute. :meth:`FunctionSwap.undo` restores exactly
what it replaced.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["FunctionSwap"]

# Set on every drop-in, so that a function already swapped in (also by an earlier import of
# the integration module, whose function objects differ) is never taken for an original.
_MARK = "_rlkern_drop_in"


class FunctionSwap:
    """Drop-ins for the functions of one module of one package, swapped in and out by name.

    Args:
        module: the defining module's dotted name (e.g. ``"trl.trainer.utils"``); its package
            is the part before the first dot.
        drop_ins: attribute name → the function that replaces the module's function of that
            name (names the module lacks, e.g. in an older version, are skipped).
    """

    def __init__(self, module: str, drop_ins: dict[str, Callable[..., Any]]) -> None:
        self.module = module
        self.package = module.split(".", 1)[0]
        self.drop_ins = dict(drop_ins)
        for fn in self.drop_ins.values():
            setattr(fn, _MARK, True)
        # (module object, attribute, the original) for every replacement made, in order
        self._replaced: list[tuple[Any, str, Any]] = []

    def apply(self) -> list[str]:
        """Swap the drop-ins in (idempotent); returns every ``module.attribute`` replaced."""
        home = importlib.import_module(self.module)
        done = {(id(m), a) for m, a, _ in self._replaced}
        # the originals: what the defining module held before the first apply
        originals = {a: o for m, a, o in self._replaced if m is home}
        for name in self.drop_ins:
            current = getattr(home, name, None)
            if name not in originals and current is not None and not getattr(current, _MARK, False):
                originals[name] = current
        prefix = self.package + "."
        modules = [home] + [m for n, m in list(sys.modules.items())
                            if m is not None and m is not home and n.startswith(prefix)]
        for module in modules:
            for name, original in originals.items():
                if (id(module), name) in done or getattr(module, name, None) is not original:
                    continue
                self._replaced.append((module, name, original))
                setattr(module, name, self.drop_ins[name])
        return [f"{m.__name__}.{a}" for m, a, _ in self._replaced]

    def undo(self) -> None:
        """Restore the originals wherever :meth:`apply` replaced them (and nothing else: an
        attribute someone changed since is left as it is)."""
        while self._replaced:
            module, name, original = self._replaced.pop()
            if getattr(module, name, None) is self.drop_ins[name]:
                setattr(module, name, original)

    @property
    def applied(self) -> bool:
        """Whether the drop-ins are swapped in (at least in the defining module)."""
        return bool(self._replaced)
