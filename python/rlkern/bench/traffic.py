"""Bytes a call moves to and from memory, counted op by op: the numerator of a bandwidth floor.

:func:`count_traffic` runs a call under a ``TorchDispatchMode`` and adds up, for every aten op
it dispatches, the bytes of the tensors the op reads and of those it writes:

* reads — tensor arguments the op does not write (``copy_``'s ``src``, ``amax``'s input);
* writes — arguments the op writes in place (``copy_``'s ``self``) and fresh outputs;
* views (``view``, ``reshape`` of contiguous data) and factories (``empty``) move nothing.

Applied to a case's floor (``read_once`` / ``write_once``) this gives the traffic the floor
stands for; divided by a device's peak bandwidth it is the time no implementation can beat.
A floor made of matmuls is compute-bound, not memory-bound: ``compute_bound`` says so, and a
bandwidth floor is then not meaningful.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# op names without leading / trailing underscores (``_scaled_mm`` → ``scaled_mm``)
_MATMULS = {"mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "scaled_mm"}


@dataclass
class Traffic:
    """Bytes read and written by one call; ``compute_bound`` when it ran a matmul."""

    read: int = 0
    written: int = 0
    compute_bound: bool = False

    @property
    def total(self) -> int:
        """Bytes moved: read + written."""
        return self.read + self.written


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


class _Counter(TorchDispatchMode):
    def __init__(self, traffic: Traffic) -> None:
        super().__init__()
        self.traffic = traffic

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        schema = func._schema
        if func.overloadpacket.__name__.lstrip("_").removesuffix("_") in _MATMULS:
            self.traffic.compute_bound = True
        if any(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns):
            return out  # a view: no data moves
        read = written = 0
        any_input = False
        for i, arg in enumerate(schema.arguments):
            value = args[i] if i < len(args) else kwargs.get(arg.name)
            size = sum(_nbytes(t) for t in _tensors(value))
            any_input = any_input or any(True for _ in _tensors(value))
            if arg.alias_info is not None and arg.alias_info.is_write:
                written += size
            else:
                read += size
        if not any_input:
            return out  # a factory (empty, ...): allocation, no traffic counted
        if not any(r.alias_info is not None for r in schema.returns):
            written += sum(_nbytes(t) for t in _tensors(out))
        self.traffic.read += read
        self.traffic.written += written
        return out


def count_traffic(fn: Callable[[], Any]) -> Traffic:
    """Run ``fn()`` once and return the bytes its aten ops read and wrote (see module doc)."""
    traffic = Traffic()
    with _Counter(traffic):
        fn()
    return traffic
