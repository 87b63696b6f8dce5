"""A drop-in for Liger-Kernel's ``LigerFusedLinearGRPOLoss`` built on
:func:`rlkern.linear_grpo_loss`.

Swap the import and nothing else::

    # from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    from rlkern.integrations.liger_compat import LigerFusedLinearGRPOLoss

The constructor takes Liger 0.8.5's arguments, ``forward`` takes Liger's arguments in Liger's
order and returns what Liger returns: ``(loss, metrics)`` with ``metrics`` a tuple holding the
mean KL (only when ``beta != 0``) and the clip ratio, each a 0-dim tensor averaged over the
valid tokens. Liger-Kernel itself is not needed.

The clip metric is Liger's: the fraction of valid tokens with (ratio < 1 − ε_low and A < 0)
or (ratio > 1 + ε_high and A > 0); for cispo only ratio > ε_high with A > 0; 0 for sapo and
vespo. ``importance_sampling_level="sequence"`` with cispo, sapo or vespo raises Liger's
ValueError in ``forward``; ``ref_per_token_logps`` and ``ref_input`` both given warn as Liger
does (the log-probabilities are used). ``vllm_is_ratio`` multiplies the per-token loss, except
for vespo, which folds its logarithm into the sequence weight (as Liger and TRL do).

Differences, on purpose (Liger's own test file, run against this class by
``tests/test_liger_upstream.py``, marks each one ``xfail(strict=True)``): ``compiled`` and
``chunk_size`` are accepted and ignored (rlkern's chunks are sized by logits count, not by
batch rows, and its epilogue is already compiled code); ``loss_type="luspo"`` masks padded
tokens out as TRL does (Liger 0.8.5 does not mask them with token-level importance sampling);
vespo sums the logarithm of ``vllm_is_ratio`` over the valid tokens only (Liger sums it over
every position, padding included; TRL's ratio is 1 at padding, where both agree).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from rlkern.config.policy_loss import PolicyLossConfig
from rlkern.integrations._is_ratio import fold_is_ratio
from rlkern.ops.linear_grpo_loss import linear_grpo_loss
from rlkern.ops.linear_logprobs import linear_logprobs

__all__ = ["LigerFusedLinearGRPOLoss"]


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class LigerFusedLinearGRPOLoss(torch.nn.Module):
    """Liger's fused linear GRPO loss with rlkern's kernels (see the module docstring).

    ``forward(_input (B, T, H), lin_weight (V, H), selected_token_ids (B, T),
    attention_mask (B, T), advantages (B,), bias=None, ref_per_token_logps=None,
    old_per_token_logps=None, ref_input=None, ref_weight=None, ref_bias=None,
    vllm_is_ratio=None, num_items_in_batch=None) -> (loss, (kl?, clip_ratio))``.
    """

    def __init__(
        self,
        beta: float = 0.04,
        compiled: bool = True,
        use_ref_model: bool = True,
        chunk_size: int = 1,
        epsilon_low: float = 0.2,
        epsilon_high: float = 0.2,
        loss_type: str = "dapo",
        max_completion_length: int | None = None,
        importance_sampling_level: str = "token",
        sapo_temperature_pos: float = 1.0,
        sapo_temperature_neg: float = 1.05,
        temperature: float = 1.0,
        delta: float | None = None,
        use_bias_correction_kl: bool = False,
        vespo_k_pos: float = 2.0,
        vespo_lambda_pos: float = 3.0,
        vespo_k_neg: float = 3.0,
        vespo_lambda_neg: float = 2.0,
    ) -> None:
        super().__init__()
        for name, value in (("sapo_temperature_pos", sapo_temperature_pos),
                            ("sapo_temperature_neg", sapo_temperature_neg)):
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if delta is not None and not delta > 0:
            raise ValueError(f"delta must be positive, got {delta}")
        self.beta = float(beta)
        self.importance_sampling_level = importance_sampling_level
        self.use_ref_model = use_ref_model
        self.loss_type = loss_type
        self.max_completion_length = max_completion_length
        self.temperature = temperature
        # Liger refuses the sequence level for these in forward; the config takes token level
        level = "token" if self._sequence_unsupported() else importance_sampling_level
        self.config = PolicyLossConfig.trl(
            loss_type=loss_type, epsilon=epsilon_low, epsilon_high=epsilon_high,
            beta=self.beta, delta=delta, importance_sampling_level=level,
            max_completion_length=max_completion_length,
            sapo_temperature_pos=sapo_temperature_pos, sapo_temperature_neg=sapo_temperature_neg,
            use_bias_correction_kl=use_bias_correction_kl,
            vllm_importance_sampling_correction=False, vespo_k_pos=vespo_k_pos,
            vespo_lambda_pos=vespo_lambda_pos, vespo_k_neg=vespo_k_neg,
            vespo_lambda_neg=vespo_lambda_neg)

    def _sequence_unsupported(self) -> bool:
        return self.importance_sampling_level == "sequence" and self.loss_type in (
            "cispo", "sapo", "vespo")

    def forward(
        self,
        _input: Tensor,
        lin_weight: Tensor,
        selected_token_ids: Tensor,
        attention_mask: Tensor,
        advantages: Tensor,
        bias: Tensor | None = None,
        ref_per_token_logps: Tensor | None = None,
        old_per_token_logps: Tensor | None = None,
        ref_input: Tensor | None = None,
        ref_weight: Tensor | None = None,
        ref_bias: Tensor | None = None,
        vllm_is_ratio: Tensor | None = None,
        num_items_in_batch: int | float | Tensor | None = None,
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        B, T = attention_mask.shape
        if self._sequence_unsupported():  # Liger's check and wording
            raise ValueError(
                f"Sequence-level importance sampling is not supported for "
                f"loss_type='{self.loss_type}'. Use importance_sampling_level='token' instead.")
        if self.use_ref_model and ref_per_token_logps is not None and ref_input is not None:
            warnings.warn("Both ref_per_token_logps and ref_input are provided. Using "
                          "ref_per_token_logps.", stacklevel=2)
        if self.loss_type == "dr_grpo" and self.max_completion_length is None:
            raise ValueError("max_completion_length must be provided for loss_type 'dr_grpo'")
        cfg = self.config
        ref = None
        if self.beta != 0.0:
            if self.use_ref_model and ref_per_token_logps is None and ref_input is None:
                raise ValueError("use_ref_model=True needs ref_per_token_logps or ref_input")
            ref = ref_per_token_logps
            if ref is None and self.use_ref_model:
                with torch.no_grad():
                    ref = linear_logprobs(
                        ref_input, lin_weight if ref_weight is None else ref_weight,
                        selected_token_ids, bias=ref_bias, temperature=self.temperature,
                    ).logprobs.view(B, T)
            if ref is None:  # no reference model: Liger compares the policy with itself
                cfg = cfg.replace(kl_coef=0.0)
        token_weights = rollout = None
        if vllm_is_ratio is not None:
            ratio = vllm_is_ratio if vllm_is_ratio.dim() == 2 else vllm_is_ratio.view(B, 1)
            if self.loss_type == "vespo":  # folded into the sequence weight, not multiplied
                old = old_per_token_logps
                if old is None:  # Liger's old policy is then the policy itself
                    with torch.no_grad():
                        old = linear_logprobs(_input, lin_weight, selected_token_ids, bias=bias,
                                              temperature=self.temperature).logprobs.view(B, T)
                if ratio.shape[1] == 1:  # one ratio per sequence: Liger adds its log once
                    ratio = torch.cat([ratio, ratio.new_ones(B, T - 1)], 1) if T else ratio[:, :0]
                cfg, rollout = fold_is_ratio(cfg, old, ratio)
            else:
                token_weights = ratio.expand(B, T)
        num_tokens = None
        if self.loss_type in ("dapo", "cispo", "vespo"):
            world = _world_size()
            if num_items_in_batch is not None:
                count = torch.as_tensor(num_items_in_batch, dtype=torch.float64)
                num_tokens = (count / world).clamp(min=1.0)
            elif world > 1:
                count = attention_mask.sum().to(torch.float64)
                torch.distributed.all_reduce(count)
                num_tokens = (count / world).clamp(min=1.0)
        out = linear_grpo_loss(
            _input, lin_weight, selected_token_ids, attention_mask, advantages, bias=bias,
            old_logprobs=old_per_token_logps, ref_logprobs=ref, token_weights=token_weights,
            rollout_logprobs=rollout, config=cfg, temperature=self.temperature,
            num_tokens=num_tokens)
        metrics = []
        if self.beta != 0.0:
            kl = out.metrics.get("kl")
            metrics.append(torch.zeros_like(out.loss) if kl is None else kl)
        metrics.append(self._clip_metric(out.metrics))
        return out.loss, tuple(metrics)

    def _clip_metric(self, metrics: dict[str, Tensor]) -> Tensor:
        """Liger's clip fraction from rlkern's: (ratio < lo and A < 0) or (ratio > hi and
        A > 0), which for PPO is exactly when the clipped branch is chosen (``clipfrac``); for
        cispo, whose clip is one-sided, ratio > ε_high with A > 0 (``clipfrac_high``); 0 for
        sapo and vespo, which do not clip."""
        if self.loss_type in ("sapo", "vespo"):
            return torch.zeros_like(metrics["clipfrac"])
        if self.loss_type == "cispo":
            return metrics["clipfrac_high"]
        return metrics["clipfrac"]
