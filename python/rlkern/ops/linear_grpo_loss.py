"""The end-to-end fused GRPO loss: hidden states and LM head in, loss and gradients out, in one
chunked pass that never holds the ``(N, V)`` logits.

``linear_grpo_loss(h, W, y, mask, A)`` equals ``policy_loss(linear_logprobs(h, W, y), old, A,
mask)`` (ALGORITHMS.md §1 fused linear form, §3 losses) but needs three matmuls instead of
five: per chunk of rows, :func:`rlkern.ops.linear_logprobs.run_fused` forms the full logits rows
(one matmul) and their log-probabilities, :func:`rlkern.ops.policy_loss.policy_loss_chunk` turns
them into ``∂loss/∂logp`` right there, the epilogue makes that ``∂loss/∂logits`` in place, and
two matmuls give the chunk's ``∂h`` and its share of ``∂W``. The gradients are kept for the
backward, which only scales them by the upstream gradient (1 for a loss that is backpropagated
directly, in which case it costs nothing: the saved tensors become the gradients).

Registered op: ``rlkern::linear_grpo_loss_fwd`` (loss, metrics and the saved gradients); the
config travels as an int list and a float list (:meth:`PolicyLossConfig.to_args`), constants to
``torch.compile``, and the optional per-token inputs as one list by slot of
``layout("policy_loss").inputs``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from rlkern.config.dtypes import acc_dtype, bool_mask
from rlkern.config.layout import layout
from rlkern.config.policy_loss import PolicyLossConfig
from rlkern.ops.linear_logprobs import (
    LinearTiling,
    _check_backend,
    _check_linear_inputs,
    _group,
    _resolve_backend,
    _softcap_arg,
    _validate_group_rows,
    linear_logprobs,
    run_fused,
)
from rlkern.ops.linear_truncated import check_filters_allowed, filters_given
from rlkern.ops.policy_loss import (
    PolicyLossOutput,
    finish_metrics,
    metric_names,
    policy_loss,
    policy_loss_chunk,
)
from rlkern.ops.policy_loss.inputs import normaliser

__all__ = ["LinearGRPOLoss", "linear_grpo_loss"]

_SEQ_LEVEL_LOSSES = ("gspo", "gmpo", "gvpo", "vespo")


def _has(inputs: list[Tensor | None], slot: str) -> bool:
    return inputs[int(layout("policy_loss").inputs[slot])] is not None


def _needs_whole_rows(cfg: PolicyLossConfig, has_rollout: bool) -> bool:
    """Losses with a per-sequence reduction cannot see a sequence split across chunks."""
    sequence_rollout = has_rollout and (cfg.rollout_correction or "").startswith("sequence")
    return (cfg.policy_loss in _SEQ_LEVEL_LOSSES or cfg.importance_sampling_level == "sequence"
            or sequence_rollout)


def _chunk_rows(cfg: PolicyLossConfig, T: int, vocab: int, chunk_size: int | None,
                whole_rows: bool, n: int) -> int:
    """Rows of hidden per fused chunk: whole sequences (whole groups for gvpo) when they fit in
    the default chunk or the loss needs them, in chunks of equal size; otherwise pieces of
    sequences."""
    unit = T * (cfg.group_size if cfg.policy_loss == "gvpo" else 1)
    rows = LinearTiling.fused_rows(vocab, chunk_size)
    if rows >= unit and chunk_size is None:
        return LinearTiling.fused_rows(vocab, None, n=n, unit=unit)
    if rows >= unit or whole_rows:
        return max(1, rows // unit) * unit
    return rows


class _Batch:
    """The ``(B, T)`` inputs of the loss, and how to cut a flat row slice into (row, column)
    pieces that :func:`policy_loss_chunk` accepts."""

    def __init__(self, mask: Tensor, advantages: Tensor, old: Tensor | None,
                 inputs: list[Tensor | None]) -> None:
        self.mask, self.adv, self.old, self.inputs = mask, advantages, old, inputs
        self.B, self.T = mask.shape
        self.lens = mask.sum(1, dtype=torch.float64)

    def pieces(self, sl: slice) -> list[tuple[slice, slice, int]]:
        """``(rows, cols, offset)``: consecutive rectangles covering flat positions ``sl``;
        ``offset`` is the first one's position within ``sl``."""
        T, out, pos = self.T, [], sl.start
        while pos < sl.stop:
            r, c = divmod(pos, T)
            if c == 0 and sl.stop - pos >= T:
                n_rows = (sl.stop - pos) // T
                out.append((slice(r, r + n_rows), slice(0, T), pos - sl.start))
                pos += n_rows * T
            else:
                c1 = min(T, c + sl.stop - pos)
                out.append((slice(r, r + 1), slice(c, c1), pos - sl.start))
                pos += c1 - c
        return out

    def cut(self, t: Tensor | None, rows: slice, cols: slice) -> Tensor | None:
        if t is None:
            return None
        return t[rows] if t.dim() == 1 else t[rows, cols]

    def optional(self, rows: slice, cols: slice) -> dict[str, Tensor]:
        """The piece's optional inputs, as :func:`policy_loss_chunk`'s keyword arguments."""
        return {slot.name: self.cut(self.inputs[slot], rows, cols)
                for slot in layout("policy_loss").inputs if self.inputs[slot] is not None}


def _loss_fn(batch: _Batch, cfg: PolicyLossConfig, num_tokens: Tensor, num_seqs: Tensor,
             want_entropy: bool, backend: str):
    """The ``grad_fn`` of :func:`run_fused` and the running totals it fills in."""
    losses: list[Tensor] = []
    stats: list[Tensor] = []

    def grad_fn(lp: Tensor, ent: Tensor | None, sl: slice):
        g_lp = torch.zeros_like(lp)
        g_ent = torch.zeros_like(lp) if want_entropy else None
        for rows, cols, off in batch.pieces(sl):
            b, w = rows.stop - rows.start, cols.stop - cols.start
            n = b * w
            lp_piece = lp[off:off + n].view(b, w)
            old = batch.cut(batch.old, rows, cols)
            optional = batch.optional(rows, cols)
            if ent is not None:
                optional["entropy"] = ent[off:off + n].view(b, w)
            out = policy_loss_chunk(
                lp_piece, lp_piece if old is None else old, batch.cut(batch.adv, rows, cols),
                batch.mask[rows, cols], config=cfg, num_tokens=num_tokens, num_seqs=num_seqs,
                seq_lens=batch.lens[rows], backend=backend, **optional)
            losses.append(out.loss)
            stats.append(out.row_stats)
            g_lp[off:off + n] = out.grad_logprobs.reshape(-1)
            if g_ent is not None and out.grad_entropy is not None:
                g_ent[off:off + n] = out.grad_entropy.reshape(-1)
        return g_lp, g_ent

    return grad_fn, losses, stats


@torch.library.custom_op("rlkern::linear_grpo_loss_fwd", mutates_args=())
def linear_grpo_loss_fwd(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None,
    mask: Tensor,
    advantages: Tensor,
    old_logprobs: Tensor | None,
    inputs: list[Tensor | None],
    normalisers: Tensor,
    config_ints: list[int],
    config_floats: list[float],
    temperature: float,
    ignore_index: int,
    with_entropy: bool,
    chunk_size: int,
    group_name: str,
    backend: str,
    softcap: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(loss, metric values, ∂h, ∂W, ∂b)``; see :func:`linear_grpo_loss`. ``inputs``: the
    policy loss's optional inputs by slot; ``normalisers``: ``(num_tokens, num_seqs)`` float64;
    ``config_*``: :meth:`PolicyLossConfig.to_args`."""
    cfg = PolicyLossConfig.from_args(config_ints, config_floats)
    group = _group(group_name)
    _check_backend(backend, group)
    labels = labels.to(torch.int64).contiguous()
    _validate_group_rows(hidden, weight, labels, ignore_index, group)
    batch = _Batch(mask, advantages, old_logprobs, inputs)
    # The per-chunk loss runs on the chunk's device: the "cpu"/"torch" choice carries over,
    # Triton GEMMs (CUDA or the interpreter) pair with the device's default loss kernels.
    loss_backend = backend if backend in ("cpu", "torch") else "auto"
    grad_fn, losses, stats = _loss_fn(batch, cfg, normalisers[0], normalisers[1], with_entropy,
                                      loss_backend)
    _, gh, gw, gb = run_fused(hidden, weight, labels, bias, temperature, ignore_index,
                              with_entropy, chunk_size, grad_fn, group, backend, softcap)
    acc = acc_dtype(hidden.dtype)
    loss = torch.stack(losses).sum().to(acc) if losses else torch.zeros((), dtype=acc)
    row_stats = (torch.cat(stats, 1) if stats
                 else torch.zeros(len(layout("policy_loss").row_stats), 0, dtype=acc))
    metrics = finish_metrics(row_stats, with_kl=_has(inputs, "ref_logprobs"),
                             with_entropy=with_entropy,
                             with_rollout=_has(inputs, "rollout_logprobs"),
                             vespo=cfg.policy_loss == "vespo", dtype=acc)
    values = torch.stack(list(metrics.values())) if metrics else torch.zeros(0, dtype=acc)
    return loss, values, gh, gw, gb if gb is not None else hidden.new_empty((0,))


@linear_grpo_loss_fwd.register_fake
def _(hidden, weight, labels, bias, mask, advantages, old_logprobs, inputs, normalisers,
      config_ints, config_floats, temperature, ignore_index, with_entropy, chunk_size,
      group_name, backend, softcap=0.0):
    acc = acc_dtype(hidden.dtype)
    vespo = PolicyLossConfig.from_args(config_ints, config_floats).policy_loss == "vespo"
    k = len(metric_names(with_kl=_has(inputs, "ref_logprobs"), with_entropy=with_entropy,
                         with_rollout=_has(inputs, "rollout_logprobs"), vespo=vespo))
    gb = torch.empty_like(bias) if bias is not None else hidden.new_empty((0,))
    return (hidden.new_empty((), dtype=acc), hidden.new_empty((k,), dtype=acc),
            torch.empty_like(hidden), torch.empty_like(weight), gb)


def _is_one(grad: Tensor) -> bool:
    """Whether the upstream gradient is known to be exactly 1 without a device sync or a data
    dependence in a traced graph (then the multiply, a full pass over ∂W, is skipped)."""
    if torch.compiler.is_compiling() or grad.device.type != "cpu":
        return False
    try:
        return float(grad) == 1.0
    except RuntimeError:  # a fake / functional tensor while tracing: no value to look at
        return False


def _setup_context(ctx, inputs, output):
    _, _, gh, gw, gb = output
    ctx.save_for_backward(gh, gw, gb)
    # The gradient outputs are never differentiated through; without this autograd would
    # fill a zero (V, H) tensor as their "incoming gradient" on every backward.
    ctx.set_materialize_grads(False)
    ctx.has_bias = inputs[3] is not None


def _backward(ctx, grad_loss, grad_metrics, grad_gh, grad_gw, grad_gb):
    gh, gw, gb = ctx.saved_tensors
    if grad_loss is None:  # only other outputs were differentiated (gradcheck does this)
        return (None,) * len(ctx.needs_input_grad)
    if not _is_one(grad_loss):
        gh, gw, gb = (t * grad_loss.to(t.dtype) for t in (gh, gw, gb))
    # hidden, weight, labels, bias; the other inputs are not differentiated
    grads = (gh, gw, None, gb if ctx.has_bias else None)
    # one entry per argument the caller passed (a defaulted softcap may be absent)
    return grads + (None,) * (len(ctx.needs_input_grad) - len(grads))


torch.library.register_autograd("rlkern::linear_grpo_loss_fwd", _backward,
                                setup_context=_setup_context)


def _float_rows(t: Tensor | None, name: str, B: int, T: int, acc: torch.dtype,
                device: torch.device, allow_row: bool = False) -> Tensor | None:
    if t is None:
        return None
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but hidden on {device}")
    if not (t.dtype.is_floating_point or (allow_row and t.dtype in (torch.int32, torch.int64))):
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    shapes = [(B, T)] + ([(B,), (B, 1)] if allow_row else [])
    if tuple(t.shape) not in shapes:
        want = " or ".join(str(s) for s in shapes)
        raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
    t = t.detach().to(acc)
    return (t if tuple(t.shape) == (B, T) else t.reshape(B)).contiguous()


def _count(value: float | Tensor | None, default: Tensor, name: str,
           device: torch.device) -> Tensor:
    """A global normaliser as a float64 0-dim tensor on ``device`` (checked as
    :func:`rlkern.policy_loss` checks it), ``default`` when not given."""
    value = normaliser(value, name, device)
    if value is None:
        return default.to(device=device, dtype=torch.float64)
    return torch.as_tensor(value, dtype=torch.float64, device=device).detach()


def linear_grpo_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    mask: Tensor,
    advantages: Tensor,
    *,
    bias: Tensor | None = None,
    old_logprobs: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    rollout_logprobs: Tensor | None = None,
    token_weights: Tensor | None = None,
    config: PolicyLossConfig | None = None,
    temperature: float = 1.0,
    num_tokens: float | Tensor | None = None,
    num_seqs: float | Tensor | None = None,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    process_group: torch.distributed.ProcessGroup | None = None,
    backend: str = "auto",
    softcap: float | None = None,
    top_k: int | Tensor | None = None,
    top_p: float | Tensor | None = None,
    min_p: float | Tensor | None = None,
    filter_order: str = "top_k_first",
    lora: tuple[Tensor, Tensor, float] | None = None,
    **overrides: Any,
) -> PolicyLossOutput:
    r"""The policy loss of :func:`rlkern.policy_loss` computed straight from hidden states.

    Same value, gradients and metrics as::

        logp = rlkern.linear_logprobs(hidden, weight, labels, bias=bias,
                                      temperature=temperature, return_entropy=...)
        rlkern.policy_loss(logp.logprobs, old_logprobs, advantages, mask, config=config, ...)

    (``old_logprobs=None``: on-policy, ``old = sg[logp]``, ratio 1), but in one chunked pass:
    each chunk of rows forms its full logits rows (``x = h Wᵀ + b``, divided by the
    temperature), reduces them to ``logp`` (and the entropy ``H`` when the config has an entropy
    bonus), applies the loss's per-token derivative in the epilogue
    (``∂ℓ/∂x = g_lp·(onehot(y) − p)/τ − g_H·p·(log p + H)/τ``) and accumulates
    ``∂h = (∂ℓ/∂x) W`` and ``∂W += (∂ℓ/∂x)ᵀ h``: three matmuls (``6·N·H·V`` FLOPs), no
    ``(N, V)`` tensor, peak extra memory one chunk of logits (at most about 2^28 values by default).
    The backward multiplies the stored gradients by the upstream gradient (nothing to do when
    it is 1, as for a loss backpropagated directly). The token ↔ row
    layout: flat row ``i·T + t`` of ``hidden`` is token ``t`` of response ``i``.

    Chunks hold whole responses when they fit (or when the loss needs per-response sums:
    gspo, gmpo, gvpo, ``importance_sampling_level="sequence"``, sequence rollout
    correction — then a chunk is at least one response, or one group for gvpo); for
    token-level losses longer responses are split across chunks exactly.

    Args:
        hidden: ``(B, T, H)`` or ``(B·T, H)`` bf16 / fp16 / fp32 / fp64 last hidden states of
            the response tokens (the position that predicts each label).
        weight: ``(V, H)`` LM head, same dtype (with ``process_group``: this rank's shard).
        labels: ``(B, T)`` int32 / int64 token ids (``ignore_index`` allowed where masked).
        mask: ``(B, T)`` bool / int / float, nonzero = valid response token.
        advantages: ``(B,)`` or ``(B, T)``.
        bias: optional ``(V,)`` LM-head bias.
        old_logprobs / ref_logprobs / rollout_logprobs / token_weights: optional ``(B, T)``
            float inputs of :func:`rlkern.policy_loss` (not differentiated).
        config: a :class:`rlkern.PolicyLossConfig` (default ``PolicyLossConfig()``);
            ``**overrides`` replace its fields.
        temperature: logits are divided by it before the softmax.
        num_tokens / num_seqs: global normalisers (token-mean / the sequence-mean modes);
            default: this batch's valid tokens / its responses (all rows with
            ``count_empty_seqs`` or for gmpo / gvpo, else the rows with a valid token).
            Checked as :func:`rlkern.policy_loss` checks them (a tensor ≤ 0: ValueError, or
            NaN results with checks off).
        ignore_index: label of rows that are skipped entirely (their ``logp`` is 0).
        chunk_size: rows per chunk (default: about 2^28 logits).
        softcap: logit soft-capping ``z = c·tanh(x/c)`` before the temperature (Gemma 2), as
            in :func:`rlkern.linear_logprobs`; ``None``: none.
        process_group: vocabulary-parallel group, as in :func:`rlkern.linear_logprobs`.
        backend: ``"auto"``, ``"cpu"``, ``"triton"`` or ``"torch"`` (logits materialised: the
            reference), as in :func:`rlkern.linear_logprobs_with_grad`.
        top_k / top_p / min_p / filter_order: the sampler's filters (truncated support): the
            log-probs (and entropy) are those of the truncated distribution, as
            :func:`rlkern.linear_logprobs` computes them with the same options; the loss is then
            exactly the composition above (``linear_logprobs`` with the filters on checkpointed
            chunks of whole rows, then :func:`rlkern.policy_loss` with every option, all its
            metrics), not the one-pass epilogue. Masked tokens are not scored; a valid token
            outside the kept set has log-prob −inf (ratio 0, no gradient).
        lora: ``(A, B, s)`` of a LoRA-adapted head, as in :func:`rlkern.linear_logprobs`
            (logits ``h Wᵀ + s·(h Aᵀ) Bᵀ + b``, ``W + s·B·A`` never formed; gradients for
            ``A`` and ``B``); computed as the same composition as the filters.

    Returns:
        :class:`rlkern.PolicyLossOutput` ``(loss, metrics)``: ``loss`` a 0-dim float32 tensor
        (float64 for float64 inputs) differentiable wrt ``hidden``, ``weight`` and ``bias``;
        ``metrics`` the 0-dim tensors of :func:`rlkern.policy_loss` that do not need the loss
        parts (``clipfrac``, ``clipfrac_low``/``_high``, ``dualclip_frac``, ``approx_kl``,
        ``ratio_mean``/``_min``/``_max``, plus ``kl``, ``entropy_mean``,
        ``rollout_weight_mean`` when those terms are present).

    Not supported: ``top_entropy_quantile < 1`` (its threshold is a quantile over every
    token's entropy, unknown until the pass ends: compute the entropies with
    :func:`rlkern.linear_logprobs` under ``torch.no_grad()`` and use :func:`rlkern.policy_loss`)
    and an entropy bonus normalised by local counts together with an explicit ``num_tokens``.

    Example::

        >>> out = rlkern.linear_grpo_loss(h, model.lm_head.weight, ids, mask, adv,
        ...                               old_logprobs=old, config=rlkern.PolicyLossConfig.trl())
        >>> out.loss.backward()
    """
    if config is None:
        config = PolicyLossConfig()
    elif not isinstance(config, PolicyLossConfig):
        raise TypeError(f"config must be a PolicyLossConfig, got {type(config).__name__}")
    cfg = config.replace(**overrides)
    for name, t in (("mask", mask), ("advantages", advantages)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if mask.dim() != 2:
        raise ValueError(f"mask must have shape (B, T), got {tuple(mask.shape)}")
    B, T = mask.shape
    if not isinstance(labels, Tensor) or tuple(labels.shape) != (B, T):
        shape = tuple(labels.shape) if isinstance(labels, Tensor) else labels
        raise ValueError(f"labels must have shape (B, T) = {(B, T)} like mask, got {shape}")
    if isinstance(hidden, Tensor) and hidden.dim() == 2:
        if hidden.shape[0] != B * T:
            raise ValueError(f"hidden of shape (N, H) needs N = B·T = {B * T} rows, got "
                             f"{tuple(hidden.shape)}")
        hidden = hidden.view(B, T, hidden.shape[1])
    _check_linear_inputs(hidden, weight, labels, bias, temperature, chunk_size,
                         softcap=softcap)
    if filters_given(top_k, top_p, min_p) or lora is not None:
        check_filters_allowed(process_group)
        return _truncated_loss(hidden, weight, labels, mask, advantages, bias=bias,
                               old_logprobs=old_logprobs, ref_logprobs=ref_logprobs,
                               rollout_logprobs=rollout_logprobs, token_weights=token_weights,
                               cfg=cfg, temperature=temperature, num_tokens=num_tokens,
                               num_seqs=num_seqs, ignore_index=ignore_index,
                               chunk_size=chunk_size, backend=backend, softcap=softcap,
                               filters=dict(top_k=top_k, top_p=top_p, min_p=min_p,
                                            filter_order=filter_order, lora=lora))
    if cfg.top_entropy_quantile < 1.0:
        raise ValueError("linear_grpo_loss: top_entropy_quantile < 1 needs the entropy of every "
                         "token before the loss; compute entropies with linear_logprobs under "
                         "no_grad and use policy_loss")
    acc = acc_dtype(hidden.dtype)
    m = bool_mask(mask)
    dev = hidden.device
    if mask.device != dev:
        raise ValueError(f"mask is on {mask.device} but hidden on {dev}")
    adv = _float_rows(advantages, "advantages", B, T, acc, dev, allow_row=True)
    old = _float_rows(old_logprobs, "old_logprobs", B, T, acc, dev)
    ref = _float_rows(ref_logprobs, "ref_logprobs", B, T, acc, dev)
    rollout = _float_rows(rollout_logprobs, "rollout_logprobs", B, T, acc, dev)
    tw = _float_rows(token_weights, "token_weights", B, T, acc, dev)
    if cfg.kl_coef != 0.0 and ref is None:
        raise ValueError("linear_grpo_loss: the config has kl_coef != 0 but ref_logprobs is "
                         "None")
    with_entropy = cfg.entropy_coef != 0.0
    if with_entropy and not cfg.entropy_global_norm:
        if num_tokens is not None or num_seqs is not None:
            raise ValueError("linear_grpo_loss: an entropy bonus normalised by local counts "
                             "(entropy_global_norm=False) cannot share explicit global "
                             "num_tokens / num_seqs with the policy term")
        cfg = cfg.replace(entropy_global_norm=True)  # this batch's counts are the local ones
    if cfg.policy_loss == "gvpo" and (cfg.group_size is None or B % cfg.group_size):
        raise ValueError(f"gvpo needs group_size dividing B = {B}, got {cfg.group_size}")
    if T and cfg.loss_agg_mode == "seq-mean-token-sum-norm" and cfg.max_len is None:
        cfg = cfg.replace(max_len=T)  # a piece of a row must still divide by the padded width
    lens = m.sum(1)
    if cfg.policy_loss in ("gmpo", "gvpo") or cfg.count_empty_seqs:
        seqs_default = torch.tensor(float(max(B, 1)), dtype=torch.float64)
    else:
        seqs_default = (lens > 0).sum().clamp(min=1).to(torch.float64)
    nt = _count(num_tokens, lens.sum().clamp(min=1), "num_tokens", hidden.device)
    ns = _count(num_seqs, seqs_default, "num_seqs", hidden.device)
    resolved = _resolve_backend(backend, hidden.device)
    rows = _chunk_rows(cfg, T, weight.shape[0], chunk_size,
                       _needs_whole_rows(cfg, rollout is not None), B * T)
    group_name = "" if process_group is None else process_group.group_name
    given = {"ref_logprobs": ref, "rollout_logprobs": rollout, "token_weights": tw}
    inputs = [given.get(slot.name) for slot in layout("policy_loss").inputs]
    loss, values, _, _, _ = torch.ops.rlkern.linear_grpo_loss_fwd(
        hidden.reshape(B * T, hidden.shape[-1]), weight, labels.reshape(-1), bias, m, adv, old,
        inputs, torch.stack([nt, ns]), *cfg.to_args(), float(temperature), int(ignore_index),
        with_entropy, rows, group_name, resolved, _softcap_arg(softcap))
    names = metric_names(with_kl=ref is not None, with_entropy=with_entropy,
                         with_rollout=rollout is not None, vespo=cfg.policy_loss == "vespo")
    return PolicyLossOutput(loss, dict(zip(names, values.detach().unbind(0), strict=True)))


class LinearGRPOLoss(torch.nn.Module):
    """:func:`linear_grpo_loss` as a module, called with Liger-Kernel's
    ``LigerFusedLinearGRPOLoss.forward`` arguments in Liger's order.

    ``forward(_input, lin_weight, selected_token_ids, attention_mask, advantages, bias=None,
    ref_per_token_logps=None, old_per_token_logps=None) -> (loss, metrics)``: ``_input`` is
    ``(B, T, H)`` (or ``(B·T, H)``), ``selected_token_ids`` / ``attention_mask`` ``(B, T)``,
    ``advantages`` ``(B,)``; ``metrics`` is :func:`linear_grpo_loss`'s dict. The loss options
    live in ``config`` (default :meth:`PolicyLossConfig.trl` with TRL's ``dapo``);
    ``rlkern.integrations.liger_compat`` has the drop-in with Liger's constructor and outputs.
    """

    def __init__(self, config: PolicyLossConfig | None = None, *, temperature: float = 1.0,
                 chunk_size: int | None = None, backend: str = "auto",
                 softcap: float | None = None) -> None:
        super().__init__()
        self.config = PolicyLossConfig.trl() if config is None else config
        self.temperature = temperature
        self.softcap = softcap
        self.chunk_size = chunk_size
        self.backend = backend

    def forward(self, _input: Tensor, lin_weight: Tensor, selected_token_ids: Tensor,
                attention_mask: Tensor, advantages: Tensor, bias: Tensor | None = None,
                ref_per_token_logps: Tensor | None = None,
                old_per_token_logps: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        out = linear_grpo_loss(
            _input, lin_weight, selected_token_ids, attention_mask, advantages, bias=bias,
            old_logprobs=old_per_token_logps, ref_logprobs=ref_per_token_logps,
            config=self.config, temperature=self.temperature, chunk_size=self.chunk_size,
            backend=self.backend, softcap=self.softcap)
        return out.loss, out.metrics

    def extra_repr(self) -> str:
        return f"config={self.config}, temperature={self.temperature}"


def _truncated_loss(hidden: Tensor, weight: Tensor, labels: Tensor, mask: Tensor,
                    advantages: Tensor, *, bias: Tensor | None, old_logprobs: Tensor | None,
                    ref_logprobs: Tensor | None, rollout_logprobs: Tensor | None,
                    token_weights: Tensor | None, cfg: PolicyLossConfig, temperature: float,
                    num_tokens: float | Tensor | None, num_seqs: float | Tensor | None,
                    ignore_index: int, chunk_size: int | None, backend: str,
                    softcap: float | None, filters: dict[str, Any]) -> PolicyLossOutput:
    """:func:`linear_grpo_loss` under the sampler's filters and / or with a LoRA head:
    ``linear_logprobs`` with them (masked tokens not scored), then :func:`rlkern.policy_loss`."""
    keep = mask if mask.dtype == torch.bool else mask.bool()
    scored = labels.masked_fill(~keep.to(labels.device), ignore_index)
    need_entropy = cfg.entropy_coef != 0.0 or cfg.top_entropy_quantile < 1.0
    out = linear_logprobs(hidden, weight, scored, bias=bias, temperature=temperature,
                          return_entropy=need_entropy, ignore_index=ignore_index,
                          chunk_size=chunk_size, backend=backend, softcap=softcap, **filters)
    loss_backend = backend if backend in ("cpu", "torch") else "auto"
    return policy_loss(out.logprobs, old_logprobs, advantages, mask, config=cfg,
                       ref_logprobs=ref_logprobs, rollout_logprobs=rollout_logprobs,
                       token_weights=token_weights, entropy=out.entropy, num_tokens=num_tokens,
                       num_seqs=num_seqs, backend=loss_backend)
