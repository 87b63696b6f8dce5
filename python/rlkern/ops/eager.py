"""Plain eager calls: when a registered op's Python body may run without the dispatcher.

A ``torch.library.custom_op`` has a fixed cost a call before its body runs (the Python
dispatcher, the autograd and ADInplaceOrView keys, the alias checks on its outputs), of the
order of the kernel itself at the small sizes of the group-advantage ops. The op is there for what
the dispatcher sees: ``torch.compile``'s tracing, fake and meta tensors, ``vmap``, dispatch
modes (``FlopCounterMode``, ``FakeTensorMode``), autograd. Where none of them is at work and
the op is not differentiable, calling its body is the same computation with the same bits,
so the public functions do that (:func:`plain_eager` says when).

The non-differentiable ops are registered with :func:`custom_op` (``torch.library.custom_op``
that also keeps the body) and called through :func:`call`, which takes the body in plain
eager mode and the registered op otherwise. A differentiable op registered the same way (the
policy loss's forward) takes its body only where no graph is built (``call(...,
no_graph=True)`` with grad mode off). Where a graph is built, :func:`autograd_function`
makes a ``torch.autograd.Function`` of a differentiable op's body and its registered autograd
rule (token_logprobs' forward, plain and truncated), whose backward can again call the
backward op's body (:func:`call` with ``no_graph=not torch.is_grad_enabled()``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

__all__ = ["autograd_function", "call", "custom_op", "plain_eager"]

#: Registered op name ("rlkern::gae") → its Python body.
BODIES: dict[str, Callable[..., Any]] = {}
#: Registered op name → the positions of the arguments it writes (its schema's ``(a!)``).
MUTATED: dict[str, tuple[int, ...]] = {}


def plain_eager(*tensors: Tensor | None, no_graph: bool = False) -> bool:
    """Whether a non-differentiable registered op may run its Python body directly here.

    True only in eager mode (not traced by ``torch.compile`` or ``torch.jit``), with no torch
    function mode (``with torch.device(...)``), no dispatch mode and no functorch transform
    (``vmap``, ``grad``) active, and every tensor in ``tensors`` (``None`` skipped) a plain
    ``torch.Tensor``, not a subclass (``FakeTensor``, ``DTensor``), on the CPU, that does not
    require grad (the body then builds no autograd graph, as the op builds none). With
    ``no_graph`` (the caller knows no graph is built: grad mode is off), tensors that require
    grad qualify too, which lets a differentiable op's body serve its no-grad calls.
    """
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    if torch._C._is_torch_function_mode_enabled() or is_in_torch_dispatch_mode():
        return False
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return False
    # ``is_cpu``, not ``device.type``: the latter builds a device object (~0.3 µs a tensor).
    return all(t is None or (type(t) is Tensor and t.is_cpu and (no_graph or not t.requires_grad))
               for t in tensors)


def custom_op(name: str, **kwargs: Any) -> Callable[[Callable[..., Any]], Any]:
    """``torch.library.custom_op(name, **kwargs)``, keeping the decorated function as its body
    for :func:`call` and :func:`autograd_function` (and which arguments it writes)."""

    def register(body: Callable[..., Any]) -> Any:
        BODIES[name] = body
        op = torch.library.custom_op(name, **kwargs)(body)
        namespace, op_name = name.split("::")
        schema = getattr(getattr(torch.ops, namespace), op_name).default._schema
        MUTATED[name] = tuple(i for i, a in enumerate(schema.arguments)
                              if a.alias_info is not None and a.alias_info.is_write)
        return op

    return register


def _tensors(args: tuple[Any, ...]) -> list[Tensor]:
    """The tensors among ``args``, those inside list / tuple arguments (``Tensor[]``,
    ``Tensor?[]``) too. A schema's list is all numbers or all (optional) tensors, so a list
    whose first element is a number (``int[]``, ``float[]``: the advantage ops' flags and
    hyperparameters) is skipped without visiting the rest."""
    out: list[Tensor] = []
    for a in args:
        if isinstance(a, Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)) and a and not isinstance(a[0], (int, float)):
            out.extend(t for t in a if isinstance(t, Tensor))
    return out


def call(name: str, *args: Any, no_graph: bool = False) -> Any:
    """The op ``name`` (registered by :func:`custom_op`) on ``args``: its body, called
    directly, when :func:`plain_eager` holds for the tensor arguments (with ``no_graph``,
    :func:`plain_eager`'s); the registered op (``torch.ops.rlkern.<op>``) otherwise. A body
    that writes arguments bumps their version counters, as the registered op does (autograd
    then refuses a backward that would read them as saved)."""
    if plain_eager(*_tensors(args), no_graph=no_graph):
        out = BODIES[name](*args)
        for i in MUTATED[name]:
            if args[i] is not None:
                torch.autograd.graph.increment_version(args[i])
        return out
    namespace, op = name.split("::")
    return getattr(getattr(torch.ops, namespace), op)(*args)


def autograd_function(name: str, setup_context: Callable[..., None],
                      backward: Callable[..., Any]) -> type[torch.autograd.Function]:
    """A ``torch.autograd.Function`` that runs the body of the differentiable op ``name``
    (registered by :func:`custom_op`) and the autograd rule registered for it
    (``setup_context`` / ``backward`` as given to ``torch.library.register_autograd``): the
    op's computation and gradient without the dispatcher's and torch.library's Python glue,
    for :func:`plain_eager` calls that build a graph. ``apply`` takes the op's arguments."""
    body = BODIES[name]

    def forward(ctx: Any, *inputs: Any) -> Any:
        out = body(*inputs)
        setup_context(ctx, inputs, out)
        return out

    def backward_(ctx: Any, *grads: Any) -> Any:
        return backward(ctx, *grads)

    return type(f"Eager_{name.split('::')[1]}", (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(backward_),
                 "__doc__": f"``{name}``'s body and autograd rule (rlkern.ops.eager)."})
