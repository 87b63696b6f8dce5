"""Reference for the fused linear form: materialise ``x = h Wᵀ (+ b)``, then §1 on ``x``.

ALGORITHMS.md §1 "Fused linear form": the outputs and gradients equal those of
``token_logprobs(hidden @ weight.T + bias, labels)``; ``∂/∂h = (∂/∂x) W`` and
``∂/∂W = (∂/∂x)ᵀ h``, ``∂/∂b = Σ_rows ∂/∂x``.
"""

from __future__ import annotations

import torch

from rlkern.reference.logprobs import token_logprobs_reference


def linear_logprobs_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    softcap: float | None = None,
) -> dict[str, torch.Tensor]:
    """``token_logprobs_reference`` of the materialised logits (``hidden`` ``(..., H)``,
    ``weight`` ``(V, H)``, ``bias`` ``(V,)``); the logits are formed in the inputs' dtype by
    ``F.linear``, exactly as the trainer's own ``lm_head`` would.

    ``softcap`` c: the logits are ``z = c·tanh(x/c)`` of the head's output ``x`` (Gemma 2's
    ``final_logit_softcapping``, applied before the temperature), formed in float64 here; the
    outputs keep the accumulation dtype of the inputs (float32; float64 for float64)."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    if softcap is None:
        return token_logprobs_reference(logits, labels, temperature=temperature,
                                        ignore_index=ignore_index)
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    capped = softcap * torch.tanh(logits.to(torch.float64) / softcap)
    out = token_logprobs_reference(capped, labels, temperature=temperature,
                                   ignore_index=ignore_index)
    return {k: v.to(acc) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
            for k, v in out.items()}
