"""Autograd inside a registered op's implementation.

The torch backend of the policy-loss ops is the float64-capable reference
(:mod:`rlkern.reference.policy_loss`) differentiated by autograd, and the fused callers'
coefficients are the gradient of the O(B) aggregation; both run inside ``torch.library``
custom ops, whose implementations the dispatcher calls with the autograd keys excluded (so
that the op's own registered backward is the only one). :func:`gradients` switches them back
on for its own small graph.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["gradients"]


def gradients(fn: Callable[..., Tensor], inputs: Sequence[Tensor], grad_output: Tensor,
              ) -> list[Tensor]:
    """``∂⟨fn(*inputs), grad_output⟩ / ∂inputs`` (zeros where ``fn`` does not depend on an
    input), by autograd, also where the dispatcher has switched autograd off."""
    guard = torch._C._SetExcludeDispatchKeyGuard(torch._C.DispatchKey.AutogradFunctionality,
                                                 False)
    with guard, torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in inputs]
        out = fn(*leaves)
        if not out.requires_grad:
            return [torch.zeros_like(t) for t in inputs]
        grads = torch.autograd.grad(out, leaves, grad_outputs=grad_output.to(out.dtype),
                                    allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads, strict=True)]
