"""The clipped-surrogate family of policy losses, fused: one kernel pass forward, one backward.

Public entry points: :func:`policy_loss`, :func:`kl_penalty`, and for fused callers (the
fused linear GRPO loss) :func:`policy_loss_chunk` / :func:`finish_metrics`.

How it is split (ALGORITHMS.md §3; csrc/include/rlkern/policy_loss.h has the per-token math):

* ``rlkern::policy_loss_fwd`` — one pass over each sequence (row) computing the per-token
  loss terms and reducing them at once to per-row partial sums ``row_stats (20, B)``
  (float64): Σ m·ℓ, Σ m·kl, Σ m·H, Σ m·(logp − old), lengths, clip counts, ratio
  statistics, ... Sequence-level variants (gspo, gmpo, gvpo, sequence rollout correction)
  reduce their per-sequence sums inside the same kernel first.
* The aggregation (token-mean, seq-mean-*, sum; gvpo's group centring; the coefficients;
  the metrics) is a handful of torch ops on the ``(B,)`` columns: O(B) work, differentiable.
* ``rlkern::policy_loss_bwd`` — autograd hands it the gradient of the loss wrt the four
  differentiable statistics ``row_sums (4, B)`` (one coefficient per row and statistic); one
  pass over each row recomputes what it needs and writes ∂loss/∂logprobs (and ∂/∂entropy).
  Nothing per token is saved by the forward.

The compiled backends register ``policy_loss_fwd_out`` / ``policy_loss_bwd_out`` (C++, filling
caller-provided outputs); ``kl_penalty_fwd`` / ``kl_penalty_bwd`` likewise.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

from rlkern import backends
from rlkern.ops.logprobs import checks_enabled
from rlkern.ops.policy_loss_config import PolicyLossConfig, canonical_kl_estimator

__all__ = [
    "FLAG_FIELDS",
    "HPARAM_FIELDS",
    "ROW_STATS",
    "PolicyLossChunk",
    "PolicyLossOutput",
    "finish_metrics",
    "kernel_args",
    "kl_penalty",
    "policy_loss",
    "policy_loss_chunk",
]

# ---------------------------------------------------------------------------------------------
# The one spec of the kernels' arguments (mirrors struct Flags / struct HParams / enum RowStat
# of csrc/include/rlkern/policy_loss.h; tests/test_policy_loss_ops.py checks the header).

FLAG_FIELDS = ("loss_kind", "ratio_mode", "kl_kind", "kl_straight_through",
               "kl_bias_correction", "rollout_level", "rollout_mask")
HPARAM_FIELDS = ("clip_lo", "clip_hi", "dual_clip_c", "delta", "log_ratio_clamp",
                 "seq_log_ratio_max", "sapo_tau_pos", "sapo_tau_neg", "kl_log_clamp",
                 "kl_value_clamp", "rollout_log_clamp", "rollout_min", "rollout_max")
ROW_STATS = ("len", "pg_sum", "kl_sum", "ent_sum", "lp_sum", "ent_count", "seq_log_ratio",
             "seq_weight", "adv_sum", "clip", "clip_low", "clip_high", "dual_clip",
             "neg_log_ratio", "ratio_sum", "ratio_min", "ratio_max", "entropy_valid",
             "rollout_w_sum", "non_finite")
_S = {name: i for i, name in enumerate(ROW_STATS)}
NUM_ROW_STATS = len(ROW_STATS)
#: The differentiable columns, in the order of the backward's ``grad_rows`` (enum RowGrad).
GRAD_COLUMNS = (_S["pg_sum"], _S["kl_sum"], _S["ent_sum"], _S["lp_sum"])
assert GRAD_COLUMNS == (1, 2, 3, 4)  # row_sums = row_stats[1:5]

LOSS_KINDS = {"ppo": 0, "gspo": 0, "cispo": 1, "sapo": 2, "reinforce": 3, "gmpo": 4, "gvpo": 5}
RATIO_TOKEN, RATIO_SEQ_DETACHED, RATIO_SEQ_FULL = 0, 1, 2
KL_KINDS = {"none": 0, "k1": 1, "k2": 2, "k3": 3, "abs": 4}
ROLLOUT_LEVELS = {"none": 0, "token": 1, "sequence": 2}


def _inf(value: float | None, default: float = math.inf) -> float:
    return default if value is None else float(value)


def kernel_args(config: PolicyLossConfig, *, with_kl: bool,
                with_rollout: bool) -> tuple[list[int], list[float]]:
    """The kernels' ``flags`` and ``hparams`` for ``config`` (order: FLAG_FIELDS,
    HPARAM_FIELDS). ``with_kl`` / ``with_rollout``: whether those add-ons are active."""
    cfg = config
    kind = cfg.policy_loss
    if kind == "gspo":
        ratio_mode = RATIO_SEQ_DETACHED
    elif cfg.importance_sampling_level == "sequence":
        ratio_mode = RATIO_SEQ_FULL
    else:
        ratio_mode = RATIO_TOKEN
    kl_kind, straight = canonical_kl_estimator(cfg.kl_estimator) if with_kl else ("none", False)
    level, mask_mode = "none", False
    if with_rollout and cfg.rollout_correction is not None:
        level, mode = cfg.rollout_correction.split("_")
        mask_mode = mode == "mask"
    lo, hi = cfg.clip_bounds()
    flags = {
        "loss_kind": LOSS_KINDS[kind],
        "ratio_mode": ratio_mode,
        "kl_kind": KL_KINDS[kl_kind],
        "kl_straight_through": int(straight),
        "kl_bias_correction": int(with_kl and cfg.kl_bias_correction),
        "rollout_level": ROLLOUT_LEVELS[level],
        "rollout_mask": int(mask_mode),
    }
    hparams = {
        "clip_lo": lo,
        "clip_hi": hi,
        "dual_clip_c": _inf(cfg.clip_ratio_c),
        "delta": _inf(cfg.delta),
        "log_ratio_clamp": _inf(cfg.log_ratio_clamp),
        "seq_log_ratio_max": _inf(cfg.seq_log_ratio_max),
        "sapo_tau_pos": cfg.sapo_tau_pos,
        "sapo_tau_neg": cfg.sapo_tau_neg,
        "kl_log_clamp": _inf(cfg.kl_log_clamp),
        "kl_value_clamp": _inf(cfg.kl_value_clamp),
        "rollout_log_clamp": _inf(cfg.rollout_log_clamp),
        "rollout_min": _inf(cfg.rollout_min, -math.inf),
        "rollout_max": _inf(cfg.rollout_max),
    }
    return [int(flags[k]) for k in FLAG_FIELDS], [float(hparams[k]) for k in HPARAM_FIELDS]


# ---------------------------------------------------------------------------------------------
# The torch backend: the kernels' per-token terms and their partial derivatives written with
# torch ops (policy_loss.h, vectorised over the batch), token for token the same semantics as
# the C++ / Triton / CUDA kernels. It is also the readable statement of what the kernels do.


def _torch_terms(lp, old, adv, mask, ref, rollout, ent, tw, thr, flags, hp) -> dict[str, Any]:
    f = dict(zip(FLAG_FIELDS, flags, strict=True))
    h = dict(zip(HPARAM_FIELDS, hp, strict=True))
    dt = lp.dtype
    B, T = mask.shape
    m = mask
    mf = m.to(dt)
    z = lambda t: torch.where(m, t, 0.0)
    lp, old = z(lp), z(old)
    A = z(adv if adv.dim() == 2 else adv[:, None].expand(B, T))
    delta = lp - old
    lens = mf.sum(-1)
    lens1 = lens.clamp(min=1.0)
    lp_sum = (delta * mf).sum(-1)
    kind = f["loss_kind"]
    lo, hi = h["clip_lo"], h["clip_hi"]
    zeros = torch.zeros_like(mf)
    t: dict[str, Any] = {"mf": mf, "lens": lens, "lp_sum": lp_sum, "A": A,
                         "ratio_mode": f["ratio_mode"], "kind": kind,
                         "has_rollout": bool(f["rollout_level"])}

    # rollout correction (stop-gradient weights)
    w = torch.ones_like(mf)
    seq_w = torch.ones(B, dtype=dt, device=lp.device)
    if f["rollout_level"]:
        d = torch.nan_to_num(z(old - rollout), nan=0.0)
        seq_level = f["rollout_level"] == ROLLOUT_LEVELS["sequence"]
        if seq_level:
            d = (d * mf).sum(-1)
        C = h["rollout_log_clamp"]
        wr = torch.exp(d.clamp(-C, C))
        rmin, rmax = h["rollout_min"], h["rollout_max"]
        inside = (wr >= rmin) & (wr <= rmax)
        wr = torch.where(inside, wr, 0.0) if f["rollout_mask"] else wr.clamp(rmin, rmax)
        if seq_level:
            seq_w = wr
            wr = wr[:, None].expand(B, T)
        w = z(wr)
    em = torch.ones_like(mf) if thr is None else z((z(ent) >= thr).to(dt))
    mult = w * em * (1.0 if tw is None else z(tw))
    t.update(w=w, em=em, mult=mult)

    if kind == LOSS_KINDS["gmpo"]:
        sgn = torch.sign(A)
        dcl = delta.clamp(lo, hi)
        a, b = sgn * delta, sgn * dcl
        dc = sgn * torch.minimum(a, b)
        d_dc = torch.where((a < b) | ((delta >= lo) & (delta <= hi)), sgn * sgn, 0.0)
        seq_r = (dc * mf).sum(-1) / lens1
        abar = (A * mf).sum(-1) / lens1
        rho_i = torch.exp(seq_r)
        if f["rollout_level"]:
            seq_w = torch.exp((torch.log(w + 1e-10) * mf).sum(-1) / lens1)
        pg_row = -abar * rho_i * seq_w
        t["gmpo_d"] = (pg_row / lens1)[:, None] * d_dc  # ∂pg_row/∂logp_t
        clipped = (delta != dcl).to(dt)
        clip_low, clip_high, dual = clipped * (A < 0), clipped * (A > 0), zeros
        rho = rho_i[:, None].expand(B, T)
        pass_r = torch.zeros_like(m)
        d_r = d_logp = zeros
    else:
        if f["ratio_mode"] == RATIO_TOKEN:
            C = h["log_ratio_clamp"]
            r = delta.clamp(-C, C)
            pass_r = (delta >= -C) & (delta <= C)
            seq_r = torch.zeros(B, dtype=dt, device=lp.device)
        else:
            mean = lp_sum / lens1
            seq_r = mean.clamp(max=h["seq_log_ratio_max"])
            pass_r = (mean <= h["seq_log_ratio_max"])[:, None].expand(B, T)
            r = seq_r[:, None].expand(B, T)
        rho = torch.exp(r)
        d_r = d_logp = clipped = dual = zeros
        if kind == LOSS_KINDS["ppo"]:
            dlt, c = h["delta"], h["dual_clip_c"]
            rho_d = torch.where(rho > dlt, dlt, rho)
            g1 = torch.where(rho <= dlt, rho, 0.0)
            inside = (rho >= lo) & (rho <= hi)
            g2 = torch.where(inside, rho, 0.0)
            l1, l2 = -A * rho_d, -A * rho.clamp(lo, hi)
            loss = torch.where(l1 >= l2, l1, l2)
            d_r = torch.where(l1 > l2, -A * g1, torch.where(l1 < l2, -A * g2, -0.5 * A * (g1 + g2)))
            l3 = -A * c
            neg = A < 0
            dual_b = neg & (loss > l3)
            d_r = torch.where(neg, torch.where(loss > l3, 0.0,
                                               torch.where(loss == l3, 0.5 * d_r, d_r)), d_r)
            loss = torch.where(dual_b, l3, loss)
            clipped, dual = (l2 > l1).to(dt), dual_b.to(dt)
        elif kind == LOSS_KINDS["cispo"]:
            coef = -rho.clamp(lo, hi) * A
            loss, d_logp = coef * lp, coef
            clipped = ((rho < lo) | (rho > hi)).to(dt)
        elif kind == LOSS_KINDS["sapo"]:
            tau = torch.where(A > 0, torch.full_like(A, h["sapo_tau_pos"]),
                              torch.full_like(A, h["sapo_tau_neg"]))
            sig = 1.0 / (1.0 + torch.exp(-(tau * (rho - 1.0))))
            loss = -(sig * (4.0 / tau)) * A
            d_r = -4.0 * A * sig * (1.0 - sig) * rho
        elif kind == LOSS_KINDS["reinforce"]:
            loss, d_logp = -A * lp, -A
        else:  # gvpo: the policy term is formed from lp_sum by the aggregation
            loss = zeros
        has_clip = kind in (LOSS_KINDS["ppo"], LOSS_KINDS["cispo"])
        clip_low = ((rho < lo) & (A < 0) & has_clip).to(dt)
        clip_high = ((rho > hi) & (A > 0) & has_clip).to(dt)
        pg_row = (loss * mult * mf).sum(-1)
    t.update(pg_row=pg_row, seq_r=seq_r, seq_w=seq_w, rho=rho, pass_r=pass_r, d_r=d_r,
             d_logp=d_logp, clipped=clipped, clip_low=clip_low, clip_high=clip_high, dual=dual,
             neg_lr=-delta.clamp(-h["log_ratio_clamp"], h["log_ratio_clamp"]))

    kv, dkv, kv_r = zeros, zeros, zeros
    if f["kl_kind"]:
        ref = z(ref)
        x = lp - ref
        k = f["kl_kind"]
        if k == KL_KINDS["k1"]:
            v, dv = x, torch.ones_like(x)
        elif k == KL_KINDS["k2"]:
            v, dv = 0.5 * (x * x), x
        elif k == KL_KINDS["abs"]:
            v, dv = x.abs(), torch.sign(x)
        else:
            y = ref - lp
            Ck, Cv = h["kl_log_clamp"], h["kl_value_clamp"]
            yc = y.clamp(-Ck, Ck)
            e = torch.exp(yc)
            v0 = e - yc - 1.0
            v = v0.clamp(-Cv, Cv)
            dv = torch.where((y >= -Ck) & (y <= Ck) & (v0 >= -Cv) & (v0 <= Cv), 1.0 - e, 0.0)
        if f["kl_straight_through"]:
            dv = x
        if f["kl_bias_correction"]:
            kv, dkv, kv_r = v * rho, dv * rho, v * rho
        else:
            kv, dkv = v, dv
    t.update(kv=kv, dkv=dkv, kv_r=kv_r)
    t["ent"] = None if ent is None else z(ent)

    # NaN policy: a non-finite input at a valid token makes its row's input sums non-finite.
    check = lp_sum + (A * mf).sum(-1)
    for x in (ref if f["kl_kind"] else None, t["ent"], tw):
        if x is not None:
            check = check + (z(x) * mf).sum(-1)
    t["bad"] = ~torch.isfinite(check)
    return t


def _row_stats_torch(*args) -> Tensor:
    t = _torch_terms(*args)
    mf, B = t["mf"], t["mf"].shape[0]
    rsum = lambda x: (x * mf).sum(-1)
    rho = t["rho"]
    zero_rows = torch.zeros(B, dtype=mf.dtype, device=mf.device)
    ent = t["ent"]
    stats = {
        "len": t["lens"], "pg_sum": t["pg_row"], "kl_sum": rsum(t["kv"]),
        "ent_sum": zero_rows if ent is None else rsum(ent * t["em"]), "lp_sum": t["lp_sum"],
        "ent_count": zero_rows if ent is None else rsum(t["em"]), "seq_log_ratio": t["seq_r"],
        "seq_weight": t["seq_w"], "adv_sum": rsum(t["A"]), "clip": rsum(t["clipped"]),
        "clip_low": rsum(t["clip_low"]), "clip_high": rsum(t["clip_high"]),
        "dual_clip": rsum(t["dual"]), "neg_log_ratio": rsum(t["neg_lr"]),
        "ratio_sum": rsum(rho),
        "ratio_min": torch.where(mf > 0, rho, math.inf).amin(-1) if mf.shape[1] else zero_rows
        + math.inf,
        "ratio_max": torch.where(mf > 0, rho, -math.inf).amax(-1) if mf.shape[1] else zero_rows
        - math.inf,
        "entropy_valid": zero_rows if ent is None else rsum(ent),
        "rollout_w_sum": rsum(t["w"]) if t["has_rollout"] else zero_rows,
        "non_finite": t["bad"].to(mf.dtype),
    }
    return torch.stack([stats[k].to(torch.float64) for k in ROW_STATS], dim=0)


def _grads_torch(lp, old, adv, mask, ref, rollout, ent, tw, thr, grad_rows, flags, hp):
    t = _torch_terms(lp, old, adv, mask, ref, rollout, ent, tw, thr, flags, hp)
    g = grad_rows.to(lp.dtype)
    g_pg, g_kl, g_ent, g_lp = (g[i][:, None] for i in range(4))
    mf = t["mf"]
    direct = g_kl * t["dkv"] + g_lp
    if t["kind"] == LOSS_KINDS["gmpo"]:
        grad = mf * (direct + g_pg * t["gmpo_d"])
    else:
        direct = direct + g_pg * t["mult"] * t["d_logp"]
        gr = g_pg * t["mult"] * t["d_r"] + g_kl * t["kv_r"]
        passes = t["pass_r"].to(lp.dtype)
        if t["ratio_mode"] == RATIO_SEQ_FULL:
            G = (gr * mf).sum(-1, keepdim=True)
            grad = mf * (direct + passes * G / t["lens"].clamp(min=1.0)[:, None])
        else:
            grad = mf * (direct + gr * passes)
    grad_ent = None if ent is None else g_ent * t["em"] * mf
    return grad, grad_ent


# ---------------------------------------------------------------------------------------------
# Backend dispatch (each fills caller-provided outputs)


def _fwd_out(backend, lp, old, adv, mask, ref, rollout, ent, tw, thr, flags, hp, row_stats):
    if backend in ("cpu", "cuda"):
        if backend == "cuda" and not backends.has_cuda_kernels():
            raise backends.BackendUnavailableError(
                "backend='cuda' needs rlkern._C built with the CUDA kernels")
        backends.cpp_ops().policy_loss_fwd_out(lp, old, adv, mask, ref, rollout, ent, tw, thr,
                                               flags, hp, row_stats)
    elif backend == "triton":
        kernels = backends.triton_module("policy_loss", lp.device)
        hp_t = torch.tensor(hp, dtype=lp.dtype, device=lp.device)
        kernels.policy_loss_fwd(lp, old, adv, mask, ref, rollout, ent, tw, thr, flags, hp_t,
                                row_stats)
    else:
        row_stats.copy_(_row_stats_torch(lp, old, adv, mask, ref, rollout, ent, tw, thr, flags,
                                         hp))


def _bwd_out(backend, lp, old, adv, mask, ref, rollout, ent, tw, thr, row_stats, grad_rows,
             flags, hp, grad_lp, grad_ent):
    if backend in ("cpu", "cuda"):
        backends.cpp_ops().policy_loss_bwd_out(lp, old, adv, mask, ref, rollout, ent, tw, thr,
                                               row_stats, grad_rows, flags, hp, grad_lp,
                                               grad_ent)
    elif backend == "triton":
        kernels = backends.triton_module("policy_loss", lp.device)
        hp_t = torch.tensor(hp, dtype=lp.dtype, device=lp.device)
        kernels.policy_loss_bwd(lp, old, adv, mask, ref, rollout, ent, tw, thr, row_stats,
                                grad_rows, flags, hp_t, grad_lp, grad_ent)
    else:
        g, ge = _grads_torch(lp, old, adv, mask, ref, rollout, ent, tw, thr, grad_rows, flags, hp)
        grad_lp.copy_(g)
        if grad_ent is not None:
            grad_ent.copy_(ge)


def _raise_non_finite(lp, old, adv, mask, ref, ent, tw) -> None:
    B, T = mask.shape
    named = [("logprobs", lp), ("old_logprobs", old), ("advantages", adv),
             ("ref_logprobs", ref), ("entropy", ent), ("token_weights", tw)]
    for name, t in named:
        if t is None:
            continue
        full = t if t.dim() == 2 else t[:, None].expand(B, T)
        bad = ~torch.isfinite(full) & mask
        if bool(bad.any()):
            b, t_ = (int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"{name}: non-finite value {float(full[b, t_])} at valid token (row {b}, "
                f"position {t_}). NaN/Inf policy: inputs at tokens with mask = 1 must be "
                "finite (masked positions are never read; rollout_logprobs may be NaN, which "
                "counts as no correction). Disable the check with rlkern.set_checks(False).")


# ---------------------------------------------------------------------------------------------
# Registered functional ops


@torch.library.custom_op("rlkern::policy_loss_fwd", mutates_args=())
def policy_loss_fwd(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    ref_logprobs: Tensor | None,
    rollout_logprobs: Tensor | None,
    entropy: Tensor | None,
    token_weights: Tensor | None,
    entropy_threshold: Tensor | None,
    flags: list[int],
    hparams: list[float],
    backend: str,
) -> tuple[Tensor, Tensor]:
    """→ ``(row_sums (4, B), row_stats (20, B))`` float64, statistic-major. ``row_sums`` are
    the differentiable statistics (pg_sum, kl_sum, ent_sum, lp_sum), a copy of rows 1–4 of
    ``row_stats``; keeping them apart keeps autograd's bookkeeping at 4·B elements."""
    B = mask.shape[0]
    row_stats = torch.empty(NUM_ROW_STATS, B, dtype=torch.float64, device=logprobs.device)
    if B == 0:
        return row_stats[1:5].clone(), row_stats
    _fwd_out(backend, logprobs, old_logprobs, advantages, mask, ref_logprobs, rollout_logprobs,
             entropy, token_weights, entropy_threshold, flags, hparams, row_stats)
    if checks_enabled() and bool(row_stats[_S["non_finite"]].sum() > 0):
        _raise_non_finite(logprobs, old_logprobs, advantages, mask,
                          ref_logprobs if flags[2] else None, entropy, token_weights)
    return row_stats[1:5].clone(), row_stats


@policy_loss_fwd.register_fake
def _(logprobs, old_logprobs, advantages, mask, ref_logprobs, rollout_logprobs, entropy,
      token_weights, entropy_threshold, flags, hparams, backend):
    B = mask.shape[0]
    return (logprobs.new_empty((len(GRAD_COLUMNS), B), dtype=torch.float64),
            logprobs.new_empty((NUM_ROW_STATS, B), dtype=torch.float64))


@torch.library.custom_op("rlkern::policy_loss_bwd", mutates_args=())
def policy_loss_bwd(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    ref_logprobs: Tensor | None,
    rollout_logprobs: Tensor | None,
    entropy: Tensor | None,
    token_weights: Tensor | None,
    entropy_threshold: Tensor | None,
    row_stats: Tensor,
    grad_rows: Tensor,
    flags: list[int],
    hparams: list[float],
    entropy_grad: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    grad_lp = torch.empty_like(logprobs, memory_format=torch.contiguous_format)
    grad_ent = (torch.empty_like(entropy, memory_format=torch.contiguous_format)
                if entropy_grad and entropy is not None else None)
    if mask.numel():
        _bwd_out(backend, logprobs, old_logprobs, advantages, mask, ref_logprobs,
                 rollout_logprobs, entropy, token_weights, entropy_threshold, row_stats,
                 grad_rows.contiguous(), flags, hparams, grad_lp, grad_ent)
    else:
        grad_lp.zero_()
    return grad_lp, (grad_ent if grad_ent is not None else logprobs.new_empty(0))


@policy_loss_bwd.register_fake
def _(logprobs, old_logprobs, advantages, mask, ref_logprobs, rollout_logprobs, entropy,
      token_weights, entropy_threshold, row_stats, grad_rows, flags, hparams, entropy_grad,
      backend):
    grad_lp = torch.empty_like(logprobs, memory_format=torch.contiguous_format)
    if entropy_grad and entropy is not None:
        return grad_lp, torch.empty_like(entropy, memory_format=torch.contiguous_format)
    return grad_lp, logprobs.new_empty(0)


def _setup_context(ctx, inputs, output):
    (lp, old, adv, mask, ref, rollout, ent, tw, thr, flags, hp, backend) = inputs
    _, row_stats = output
    ctx.mark_non_differentiable(row_stats)
    # No zero-filled gradient for row_stats: a (20, B) fill is a parallel region, whose
    # start-up can cost more than the tiny work on a busy machine.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(lp, old, adv, mask, ref, rollout, ent, tw, thr, row_stats)
    ctx.options = (list(flags), list(hp), backend)


def _backward(ctx, grad_row_sums, grad_row_stats):
    lp, old, adv, mask, ref, rollout, ent, tw, thr, row_stats = ctx.saved_tensors
    flags, hp, backend = ctx.options
    entropy_grad = ent is not None and ctx.needs_input_grad[6]
    if grad_row_sums is None:
        grad_row_sums = torch.zeros(len(GRAD_COLUMNS), mask.shape[0], dtype=torch.float64,
                                    device=lp.device)
    grad_rows = grad_row_sums.to(torch.float64).contiguous()
    grad_lp, grad_ent = torch.ops.rlkern.policy_loss_bwd(
        lp, old, adv, mask, ref, rollout, ent, tw, thr, row_stats, grad_rows, flags, hp,
        entropy_grad, backend)
    return (grad_lp, None, None, None, None, None, grad_ent if entropy_grad else None, None,
            None, None, None, None)


torch.library.register_autograd("rlkern::policy_loss_fwd", _backward,
                                setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# KL estimator op


@torch.library.custom_op("rlkern::kl_penalty_fwd", mutates_args=())
def kl_penalty_fwd(logprobs: Tensor, ref_logprobs: Tensor, kind: int, straight_through: bool,
                   log_clamp: float, value_clamp: float, backend: str) -> Tensor:
    out = torch.empty_like(logprobs, memory_format=torch.contiguous_format)
    _kl_out(backend, logprobs, ref_logprobs, None, kind, straight_through, log_clamp,
            value_clamp, out)
    return out


@kl_penalty_fwd.register_fake
def _(logprobs, ref_logprobs, kind, straight_through, log_clamp, value_clamp, backend):
    return torch.empty_like(logprobs, memory_format=torch.contiguous_format)


@torch.library.custom_op("rlkern::kl_penalty_bwd", mutates_args=())
def kl_penalty_bwd(logprobs: Tensor, ref_logprobs: Tensor, grad: Tensor, kind: int,
                   straight_through: bool, log_clamp: float, value_clamp: float,
                   backend: str) -> Tensor:
    out = torch.empty_like(logprobs, memory_format=torch.contiguous_format)
    _kl_out(backend, logprobs, ref_logprobs, grad.contiguous(), kind, straight_through,
            log_clamp, value_clamp, out)
    return out


@kl_penalty_bwd.register_fake
def _(logprobs, ref_logprobs, grad, kind, straight_through, log_clamp, value_clamp, backend):
    return torch.empty_like(logprobs, memory_format=torch.contiguous_format)


def _kl_torch(lp, ref, kind, straight, log_clamp, value_clamp):
    x = lp - ref
    if kind == KL_KINDS["k1"]:
        return x
    if kind == KL_KINDS["k2"]:
        return 0.5 * (x * x)
    if kind == KL_KINDS["abs"]:
        return x.abs()
    y = (ref - lp).clamp(-log_clamp, log_clamp)
    return (torch.exp(y) - y - 1).clamp(-value_clamp, value_clamp)


def _kl_grad_torch(lp, ref, kind, straight, log_clamp, value_clamp):
    x = lp - ref
    if straight or kind == KL_KINDS["k2"]:
        return x
    if kind == KL_KINDS["k1"]:
        return torch.ones_like(x)
    if kind == KL_KINDS["abs"]:
        return torch.sign(x)
    y = ref - lp
    yc = y.clamp(-log_clamp, log_clamp)
    e = torch.exp(yc)
    v0 = e - yc - 1
    ok = (y >= -log_clamp) & (y <= log_clamp) & (v0 >= -value_clamp) & (v0 <= value_clamp)
    return torch.where(ok, 1 - e, 0.0)


def _kl_out(backend, lp, ref, grad, kind, straight, log_clamp, value_clamp, out):
    if lp.numel() == 0:
        return
    if backend in ("cpu", "cuda"):
        if grad is None:
            backends.cpp_ops().kl_penalty_fwd_out(lp, ref, kind, straight, log_clamp,
                                                  value_clamp, out)
        else:
            backends.cpp_ops().kl_penalty_bwd_out(lp, ref, grad, kind, straight, log_clamp,
                                                  value_clamp, out)
    elif backend == "triton":
        kernels = backends.triton_module("policy_loss", lp.device)
        clamps = torch.tensor([log_clamp, value_clamp], dtype=lp.dtype, device=lp.device)
        kernels.kl_penalty(lp, ref, grad, out, clamps, kind=kind, straight_through=straight)
    elif grad is None:
        out.copy_(_kl_torch(lp, ref, kind, straight, log_clamp, value_clamp))
    else:
        out.copy_(grad * _kl_grad_torch(lp, ref, kind, straight, log_clamp, value_clamp))


def _kl_setup(ctx, inputs, output):
    lp, ref, kind, straight, log_clamp, value_clamp, backend = inputs
    ctx.save_for_backward(lp, ref)
    ctx.options = (kind, straight, log_clamp, value_clamp, backend)


def _kl_backward(ctx, grad):
    lp, ref = ctx.saved_tensors
    g = torch.ops.rlkern.kl_penalty_bwd(lp, ref, grad, *ctx.options)
    # Every estimator is a function of logp − ref: ∂/∂ref = −∂/∂logp.
    return g, (-g if ctx.needs_input_grad[1] else None), None, None, None, None, None


torch.library.register_autograd("rlkern::kl_penalty_fwd", _kl_backward, setup_context=_kl_setup)


# ---------------------------------------------------------------------------------------------
# Input checking and preparation


class PolicyLossOutput(NamedTuple):
    """Outputs of :func:`policy_loss`.

    * ``loss`` — 0-dim, float32 (float64 for float64 log-probabilities); differentiable wrt
      ``logprobs`` and ``entropy``.
    * ``metrics`` — dict of 0-dim tensors (no host synchronisation): ``pg_loss``,
      ``clipfrac``, ``clipfrac_low``, ``clipfrac_high``, ``dualclip_frac``, ``approx_kl``,
      ``ratio_mean``, ``ratio_min``, ``ratio_max``; with a KL term ``kl_loss`` and ``kl``; with
      ``entropy`` ``entropy_loss`` and ``entropy_mean``; with a rollout correction
      ``rollout_weight_mean``. Means are over the valid tokens.
    """

    loss: Tensor
    metrics: dict[str, Tensor]


class _Prepared(NamedTuple):
    lp: Tensor
    old: Tensor
    adv: Tensor
    mask: Tensor
    ref: Tensor | None
    rollout: Tensor | None
    ent: Tensor | None
    tw: Tensor | None
    thr: Tensor | None
    cfg: PolicyLossConfig
    flags: list[int]
    hparams: list[float]
    backend: str
    out_dtype: torch.dtype


def _tensor(t: Any, name: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def _float_input(t: Any, name: str, shape: tuple[int, ...], device: torch.device,
                 dtype: torch.dtype) -> Tensor:
    t = _tensor(t, name)
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape} (like logprobs), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but logprobs on {device}")
    t = t.to(dtype)
    return t if t.dim() < 2 or t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _normaliser(value: Any, name: str, device: torch.device) -> Tensor | float | None:
    if value is None:
        return None
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a 1-element tensor, got shape "
                             f"{tuple(value.shape)}")
        return value.reshape(()).to(device=device, dtype=torch.float64)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number or a tensor, got {type(value).__name__}")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    return float(value)


def _prepare(logprobs, old_logprobs, advantages, mask, config, ref_logprobs, rollout_logprobs,
             entropy, token_weights, entropy_threshold, backend, overrides) -> _Prepared:
    if config is None:
        config = PolicyLossConfig()
    elif not isinstance(config, PolicyLossConfig):
        raise TypeError(f"config must be a PolicyLossConfig, got {type(config).__name__}")
    cfg = config.replace(**overrides)
    lp = _tensor(logprobs, "logprobs")
    if not lp.dtype.is_floating_point:
        raise TypeError(f"logprobs must be a floating-point tensor, got {lp.dtype}")
    if lp.dim() != 2:
        raise ValueError(f"logprobs must have shape (B, T), got {tuple(lp.shape)}")
    B, T = lp.shape
    dev = lp.device
    dt = torch.float64 if lp.dtype == torch.float64 else torch.float32
    out_dtype = dt
    lp = _float_input(lp, "logprobs", (B, T), dev, dt)
    old = _float_input(old_logprobs, "old_logprobs", (B, T), dev, dt)
    m = _tensor(mask, "mask")
    if tuple(m.shape) != (B, T):
        raise ValueError(f"mask must have shape (B, T) = {(B, T)}, got {tuple(m.shape)}")
    if m.device != dev:
        raise ValueError(f"mask is on {m.device} but logprobs on {dev}")
    m = (m if m.dtype == torch.bool else m != 0).contiguous()
    adv = _tensor(advantages, "advantages")
    if not (adv.dtype.is_floating_point or adv.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"advantages must be a float tensor, got {adv.dtype}")
    if tuple(adv.shape) in ((B,), (B, 1)):
        adv = adv.reshape(B).to(dt).contiguous()
    elif tuple(adv.shape) == (B, T):
        adv = _float_input(adv, "advantages", (B, T), dev, dt)
    else:
        raise ValueError(f"advantages must have shape (B,) = ({B},) or (B, T) = {(B, T)}, got "
                         f"{tuple(adv.shape)}")
    if adv.device != dev:
        raise ValueError(f"advantages are on {adv.device} but logprobs on {dev}")
    opt = lambda t, name: None if t is None else _float_input(t, name, (B, T), dev, dt)
    ref = opt(ref_logprobs, "ref_logprobs")
    rollout = opt(rollout_logprobs, "rollout_logprobs")
    ent = opt(entropy, "entropy")
    tw = opt(token_weights, "token_weights")

    kind = cfg.policy_loss
    with_kl = cfg.kl_coef != 0.0
    if with_kl and ref is None:
        raise ValueError(f"kl_coef = {cfg.kl_coef} needs ref_logprobs (or set kl_coef=0)")
    if rollout is not None and cfg.rollout_correction is None:
        raise ValueError("rollout_logprobs given but config.rollout_correction is None: choose "
                         "'token_truncate', 'token_mask', 'sequence_truncate' or 'sequence_mask'")
    if cfg.entropy_coef != 0.0 and ent is None:
        raise ValueError(f"entropy_coef = {cfg.entropy_coef} needs the per-token entropy "
                         "(entropy=...)")
    if cfg.top_entropy_quantile < 1.0 and ent is None:
        raise ValueError("top_entropy_quantile < 1 needs the per-token entropy (entropy=...)")
    if kind in ("gmpo", "gvpo") and tw is not None:
        raise ValueError(f"token_weights do not apply to the sequence-level loss {kind!r}")
    if kind == "gvpo":
        if adv.dim() != 1:
            raise ValueError("gvpo takes one score per response: advantages of shape (B,)")
        if B % cfg.group_size:
            raise ValueError(f"gvpo: B = {B} rows is not a multiple of group_size = "
                             f"{cfg.group_size} (groups are contiguous rows)")
        if rollout is not None:
            raise ValueError("gvpo does not take a rollout correction")
    thr = None
    if cfg.top_entropy_quantile < 1.0:
        if entropy_threshold is None:
            thr = entropy_quantile_threshold(ent, m, cfg.top_entropy_quantile)
        else:
            thr = torch.as_tensor(entropy_threshold, dtype=dt, device=dev).reshape(())
    flags, hparams = kernel_args(cfg, with_kl=with_kl, with_rollout=rollout is not None)
    resolved = backends.resolve_backend(backend, dev)
    return _Prepared(lp, old, adv, m, ref if with_kl else None, rollout, ent, tw, thr, cfg,
                     flags, hparams, resolved, out_dtype)


def entropy_quantile_threshold(entropy: Tensor, mask: Tensor, q: float) -> Tensor:
    """The (1 − q) quantile of the valid tokens' entropies as a 0-dim tensor: torch.quantile's
    linear interpolation in float32, as TRL's ``get_high_entropy_mask`` computes it, but with
    no host sync and no data-dependent shape (one sort of the masked values). +inf when no
    token is valid."""
    flat = torch.where(mask, entropy.detach(), math.inf).reshape(-1).to(torch.float32)
    values = torch.sort(flat).values
    n = mask.sum()
    last = (n - 1).clamp(min=0)
    if values.numel() == 0:
        return torch.full((), math.inf, dtype=entropy.dtype, device=entropy.device)
    pos = last.to(torch.float32) * torch.tensor(1.0 - q, dtype=torch.float32)
    lo = pos.long().reshape(1)  # torch.quantile truncates the rank
    hi = pos.ceil().long().reshape(1)
    # gather, not values[lo]: a tensor index would be a data-dependent .item() under compile
    thr = torch.lerp(values.gather(0, lo), values.gather(0, hi),
                     (pos - lo.to(torch.float32)).reshape(1)).reshape(())
    return torch.where(n > 0, thr, math.inf).to(entropy.dtype)


# ---------------------------------------------------------------------------------------------
# Aggregation (O(B) torch ops on the per-row sums; autograd differentiates it)


def _agg_weights(counts: Tensor, mode: str, *, num_tokens, num_seqs, count_empty: bool,
                 max_len: int | None, width: int) -> Tensor:
    """Per-row weights ``c`` with ``agg(sums) = Σ_i c_i · sums_i``: every aggregation mode is
    linear in the per-row sums, so its gradient needs no autograd (fused callers run inside a
    registered op, where autograd is switched off)."""
    ones = torch.ones_like(counts)
    if mode == "token-mean":
        return ones / (counts.sum().clamp(min=1.0) if num_tokens is None else num_tokens)
    if mode in ("sum", "token-sum"):
        return ones
    if num_seqs is not None:
        d = num_seqs
    elif count_empty:
        d = float(max(counts.shape[0], 1))
    else:
        d = (counts > 0).sum().clamp(min=1).to(counts.dtype)
    if mode == "seq-mean-token-mean":
        return torch.where(counts > 0, 1.0 / counts.clamp(min=1.0), 0.0) / d
    if mode == "seq-mean-token-sum":
        return ones / d
    return ones / d / (width if max_len is None else max_len)


def _seq_denominator(cfg: PolicyLossConfig, B: int, num_seqs) -> Any:
    if cfg.loss_agg_mode in ("sum", "token-sum"):
        return 1.0
    return float(max(B, 1)) if num_seqs is None else num_seqs


def _gvpo_residual(lp_sum: Tensor, scores: Tensor, cfg: PolicyLossConfig) -> Tensor:
    """GVPO's ``e = (R − R̄_g) − (s − s̄_g)`` per response, ``R = β·Σ_t m·Δ``, shape (B/g, g)."""
    reward = cfg.gvpo_beta * lp_sum.view(-1, cfg.group_size)
    s = scores.to(lp_sum).view(-1, cfg.group_size)
    return (reward - reward.mean(-1, keepdim=True)) - (s - s.mean(-1, keepdim=True))


def _term_weights(row_stats: Tensor, cfg: PolicyLossConfig, width: int, num_tokens, num_seqs,
                  *, with_entropy: bool, seq_lens: Tensor | None = None
                  ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Per-row weights of the policy, KL and entropy sums in their aggregates (None: the term
    is absent; the policy weight is None for gvpo, which is quadratic)."""
    lens = row_stats[_S["len"]] if seq_lens is None else seq_lens.to(row_stats)
    common = dict(num_tokens=num_tokens, num_seqs=num_seqs, count_empty=cfg.count_empty_seqs,
                  max_len=cfg.max_len, width=width)
    B = row_stats.shape[1]
    if cfg.policy_loss == "gmpo":
        w_pg = torch.ones_like(lens) / _seq_denominator(cfg, B, num_seqs)
    elif cfg.policy_loss == "gvpo":
        w_pg = None
    else:
        w_pg = _agg_weights(lens, cfg.loss_agg_mode, **common)
    w_kl = _agg_weights(lens, cfg.kl_agg(), **common) if cfg.kl_coef != 0.0 else None
    w_ent = None
    if with_entropy:
        ent_common = dict(common)
        if not cfg.entropy_global_norm:
            ent_common.update(num_tokens=None, num_seqs=None)
        counts = row_stats[_S["ent_count"]]
        if seq_lens is not None and cfg.top_entropy_quantile == 1.0:
            counts = lens
        w_ent = _agg_weights(counts, cfg.entropy_agg(), **ent_common)
    return w_pg, w_kl, w_ent


def _aggregate(row_sums: Tensor, row_stats: Tensor, cfg: PolicyLossConfig, width: int,
               scores: Tensor, num_tokens, num_seqs, *, with_entropy: bool,
               seq_lens: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Total loss (float64, differentiable wrt ``row_sums``) and its parts."""
    pg_sum, kl_sum, ent_sum, lp_sum = row_sums.unbind(0)
    w_pg, w_kl, w_ent = _term_weights(row_stats, cfg, width, num_tokens, num_seqs,
                                      with_entropy=with_entropy, seq_lens=seq_lens)
    if w_pg is None:  # gvpo
        e = _gvpo_residual(lp_sum, scores, cfg)
        pg = (0.5 * e.square()).sum() / (cfg.group_size - 1) / _seq_denominator(
            cfg, row_stats.shape[1], num_seqs)
    else:
        pg = (w_pg * pg_sum).sum()
    parts = {"pg_loss": pg}
    total = pg
    if w_kl is not None:
        parts["kl_loss"] = (w_kl * kl_sum).sum()
        total = total + cfg.kl_coef * parts["kl_loss"]
    if w_ent is not None:
        parts["entropy_loss"] = (w_ent * ent_sum).sum()
        if cfg.entropy_coef != 0.0:
            total = total - cfg.entropy_coef * parts["entropy_loss"]
    return total * cfg.loss_scale, parts


def _aggregate_grad(row_sums: Tensor, row_stats: Tensor, cfg: PolicyLossConfig, width: int,
                    scores: Tensor, num_tokens, num_seqs, *, with_entropy: bool,
                    seq_lens: Tensor | None = None) -> Tensor:
    """``∂ _aggregate / ∂ row_sums``, shape (4, B), in closed form."""
    w_pg, w_kl, w_ent = _term_weights(row_stats, cfg, width, num_tokens, num_seqs,
                                      with_entropy=with_entropy, seq_lens=seq_lens)
    grad = torch.zeros_like(row_sums)
    if w_pg is None:  # gvpo: ∂(½ Σ e²)/∂lp_sum_i = β (e_i − ē_g), through both group means
        e = _gvpo_residual(row_sums[3], scores, cfg)
        denom = (cfg.group_size - 1) * _seq_denominator(cfg, row_stats.shape[1], num_seqs)
        grad[3] = (cfg.gvpo_beta * (e - e.mean(-1, keepdim=True))).reshape(-1) / denom
    else:
        grad[0] = w_pg
    if w_kl is not None:
        grad[1] = cfg.kl_coef * w_kl
    if w_ent is not None and cfg.entropy_coef != 0.0:
        grad[2] = -cfg.entropy_coef * w_ent
    return grad * cfg.loss_scale


def finish_metrics(row_stats: Tensor, parts: dict[str, Tensor] | None = None, *,
                   with_kl: bool = False, with_entropy: bool = False,
                   with_rollout: bool = False, dtype: torch.dtype = torch.float32
                   ) -> dict[str, Tensor]:
    """Metrics (0-dim tensors) from the per-row statistics ``(20, B)`` of one or several chunks
    (concatenated along dim 1), and optionally the aggregated loss parts."""
    rs = row_stats.detach()
    col = lambda name: rs[_S[name]]
    n_valid = col("len").sum()
    n = n_valid.clamp(min=1.0)
    out: dict[str, Tensor] = {}
    if parts is not None:
        out["pg_loss"] = parts["pg_loss"].detach()
        if with_kl and "kl_loss" in parts:
            out["kl_loss"] = parts["kl_loss"].detach()
        if with_entropy:
            out["entropy_loss"] = parts["entropy_loss"].detach()
    nan = torch.tensor(math.nan, dtype=rs.dtype, device=rs.device)
    out.update(
        clipfrac=col("clip").sum() / n,
        clipfrac_low=col("clip_low").sum() / n,
        clipfrac_high=col("clip_high").sum() / n,
        dualclip_frac=col("dual_clip").sum() / n,
        approx_kl=col("neg_log_ratio").sum() / n,
        ratio_mean=col("ratio_sum").sum() / n,
        ratio_min=torch.where(n_valid > 0, col("ratio_min").min(), nan) if rs.shape[1] else nan,
        ratio_max=torch.where(n_valid > 0, col("ratio_max").max(), nan) if rs.shape[1] else nan,
    )
    if with_kl:
        out["kl"] = col("kl_sum").sum() / n
    if with_entropy:
        out["entropy_mean"] = col("entropy_valid").sum() / n
    if with_rollout:
        out["rollout_weight_mean"] = col("rollout_w_sum").sum() / n
    return {k: v.to(dtype) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------
# Public API


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    config: PolicyLossConfig | None = None,
    ref_logprobs: Tensor | None = None,
    rollout_logprobs: Tensor | None = None,
    entropy: Tensor | None = None,
    token_weights: Tensor | None = None,
    num_tokens: float | Tensor | None = None,
    num_seqs: float | Tensor | None = None,
    entropy_threshold: float | Tensor | None = None,
    backend: str = "auto",
    **overrides: Any,
) -> PolicyLossOutput:
    r"""Policy loss of the clipped-surrogate family (ALGORITHMS.md §3), fused.

    Per token, with ``Δ = logp − old`` and ``ρ = exp(r)`` (``r = clamp(Δ, ±20)``, or the
    sequence log-ratio ``mean_t Δ`` for gspo / ``importance_sampling_level="sequence"``)::

        ppo        ℓ = max(−A·min(ρ, δ), −A·clip(ρ, 1−ε_low, 1+ε_high));  A<0: min(ℓ, −A·c)
        cispo      ℓ = −sg[clip(ρ, lo, hi)]·A·logp
        sapo       ℓ = −σ(τ(ρ−1))·(4/τ)·A,  τ = τ_pos if A > 0 else τ_neg
        reinforce  ℓ = −A·logp
        gmpo       ℓ_i = −Ā_i·exp(Σ_t m·Δc / len_i)   (per sequence; Δc the sign-aware clip)
        gvpo       ℓ_i = ½[(R_i − R̄_g) − (s_i − s̄_g)]² / (n_g − 1),  R_i = β·Σ_t m·Δ

    The policy term is ``agg(ℓ · w_rollout · 1[H ≥ q-quantile] · token_weights)``; the loss is
    ``loss_scale · (policy + β·agg(kl) − c_H·agg(entropy))`` with the aggregation of
    ``config.loss_agg_mode`` (token-mean, seq-mean-token-mean, seq-mean-token-sum,
    seq-mean-token-sum-norm, sum). :meth:`PolicyLossConfig.verl` / :meth:`PolicyLossConfig.trl`
    reproduce verl's ``compute_policy_loss_*`` + ``agg_loss`` and TRL's GRPOTrainer loss.

    Args:
        logprobs: ``(B, T)`` float log-probabilities of the sampled tokens under the current
            policy (differentiable). float32 math (float64 for float64 input).
        old_logprobs: ``(B, T)`` under the policy that generated / was last synced.
        advantages: ``(B,)`` (one per response) or ``(B, T)``; for gvpo the ``(B,)`` scores.
        mask: ``(B, T)`` bool (or 0/1) — valid response tokens. Masked values are never read.
        config: a :class:`PolicyLossConfig` (default: PPO, ε = 0.2, token-mean).
        ref_logprobs: ``(B, T)`` reference log-probabilities (KL term when ``kl_coef != 0``).
        rollout_logprobs: ``(B, T)`` rollout-engine log-probabilities (rollout correction).
        entropy: ``(B, T)`` per-token entropy (entropy bonus, entropy mask; differentiable).
        token_weights: ``(B, T)`` per-token weights of the policy term (not differentiated).
        num_tokens: global token count for token-mean (data parallel; verl's
            ``batch_num_tokens``, TRL's dapo normaliser). Default: the local count.
        num_seqs: global sequence count for the seq-mean modes (verl's ``global_batch_size``).
        entropy_threshold: the entropy-mask threshold, when computed elsewhere (chunks).
        backend: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"triton"`` or ``"torch"``.
        **overrides: any :class:`PolicyLossConfig` field, e.g. ``clip_ratio_high=0.28``.

    Returns:
        :class:`PolicyLossOutput` ``(loss, metrics)``.

    Raises:
        TypeError / ValueError: wrong types, shape or device mismatches, unknown names (the
        message lists the valid ones), ``clip_ratio_c <= 1``, negative epsilons, missing
        inputs for an enabled add-on, and (while checks are on, :func:`rlkern.set_checks`)
        a non-finite input at a valid token.

    Example::

        >>> cfg = rlkern.PolicyLossConfig.verl(policy_loss="vanilla", clip_ratio_high=0.28)
        >>> out = rlkern.policy_loss(logp, old_logp, adv, mask, config=cfg)
        >>> out.loss.backward(); out.metrics["clipfrac"]
    """
    p = _prepare(logprobs, old_logprobs, advantages, mask, config, ref_logprobs,
                 rollout_logprobs, entropy, token_weights, entropy_threshold, backend, overrides)
    dev = p.lp.device
    nt = _normaliser(num_tokens, "num_tokens", dev)
    ns = _normaliser(num_seqs, "num_seqs", dev)
    row_sums, row_stats = torch.ops.rlkern.policy_loss_fwd(
        p.lp, p.old, p.adv, p.mask, p.ref, p.rollout, p.ent, p.tw, p.thr, p.flags, p.hparams,
        p.backend)
    loss, parts = _aggregate(row_sums, row_stats, p.cfg, p.mask.shape[1], p.adv, nt, ns,
                             with_entropy=p.ent is not None)
    metrics = finish_metrics(row_stats, parts, with_kl=p.ref is not None,
                             with_entropy=p.ent is not None,
                             with_rollout=p.rollout is not None, dtype=p.out_dtype)
    return PolicyLossOutput(loss.to(p.out_dtype), metrics)


class PolicyLossChunk(NamedTuple):
    """Outputs of :func:`policy_loss_chunk` for one chunk of rows.

    ``loss``: the chunk's share of the total loss (the shares add up to it); ``grad_logprobs``
    (and ``grad_entropy``): ∂total/∂ of the chunk's inputs, already multiplied by
    ``grad_scale``; ``row_stats``: the per-row sums, for :func:`finish_metrics` over all chunks.
    """

    loss: Tensor
    grad_logprobs: Tensor
    grad_entropy: Tensor | None
    row_stats: Tensor


def policy_loss_chunk(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    config: PolicyLossConfig | None = None,
    num_tokens: float | Tensor | None = None,
    num_seqs: float | Tensor | None = None,
    seq_lens: Tensor | None = None,
    entropy_threshold: float | Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    rollout_logprobs: Tensor | None = None,
    entropy: Tensor | None = None,
    token_weights: Tensor | None = None,
    grad_scale: float | Tensor = 1.0,
    backend: str = "auto",
    **overrides: Any,
) -> PolicyLossChunk:
    """The per-token derivative of :func:`policy_loss` for one chunk of rows, without autograd.

    For fused callers that produce log-probabilities chunk by chunk and need ∂loss/∂logprobs
    (and ∂loss/∂entropy) right away (``rlkern.linear_logprobs_with_grad``'s ``grad_fn``).
    Each chunk runs the forward and the backward kernel once. The global normalisers must be
    known up front and are required here:

    * ``num_tokens`` for token-mean (the total valid tokens of the whole batch);
    * ``num_seqs`` for the seq-mean modes, gmpo and gvpo (the number of sequences the total
      is averaged over: verl counts rows with a valid token, TRL all rows);
    * ``entropy_threshold`` for ``top_entropy_quantile < 1`` (a quantile over all tokens).

    Chunk boundaries: token-level losses (ppo, cispo, sapo, reinforce with token ratios and
    token rollout correction) in token-mean or sum mode accept any chunking, even one that
    splits a sequence (pass a ``(1, n)`` piece). The seq-mean-token-mean mode needs each
    row's full length: pass ``seq_lens`` when a piece is not a whole row. Sequence-level
    variants (gspo, ``importance_sampling_level="sequence"``, gmpo, gvpo, sequence rollout
    correction) need per-sequence sums of all of a row's tokens: a chunk must hold whole
    sequences (and gvpo whole groups).
    """
    p = _prepare(logprobs, old_logprobs, advantages, mask, config, ref_logprobs,
                 rollout_logprobs, entropy, token_weights, entropy_threshold, backend, overrides)
    cfg = p.cfg
    seq_level_pg = cfg.policy_loss in ("gmpo", "gvpo")
    modes = set() if seq_level_pg else {cfg.loss_agg_mode}
    if cfg.kl_coef:
        modes.add(cfg.kl_agg())
    if cfg.entropy_coef and p.ent is not None:
        if not cfg.entropy_global_norm:
            raise ValueError("policy_loss_chunk: an entropy bonus normalised by local counts "
                             "(entropy_global_norm=False) cannot be split into chunks; set "
                             "entropy_global_norm=True and pass the global counts")
        if cfg.top_entropy_quantile < 1.0:
            raise ValueError("policy_loss_chunk: an entropy bonus restricted by the entropy "
                             "mask is normalised by the count of the tokens it acts on, which "
                             "spans chunks; use entropy_coef=0 here and add the bonus outside")
        modes.add(cfg.entropy_agg())
    if "token-mean" in modes and num_tokens is None:
        raise ValueError("policy_loss_chunk: token-mean needs num_tokens (the total count of "
                         "valid tokens over all chunks)")
    needs_seqs = any(m.startswith("seq-mean") for m in modes) or (
        seq_level_pg and cfg.loss_agg_mode not in ("sum", "token-sum"))
    if needs_seqs and num_seqs is None:
        raise ValueError("policy_loss_chunk: this aggregation needs num_seqs (the number of "
                         "sequences the loss is averaged over, over all chunks)")
    if cfg.top_entropy_quantile < 1.0 and entropy_threshold is None:
        raise ValueError("policy_loss_chunk: top_entropy_quantile < 1 needs entropy_threshold "
                         "(the quantile over all chunks' valid tokens)")
    dev = p.lp.device
    nt = _normaliser(num_tokens, "num_tokens", dev)
    ns = _normaliser(num_seqs, "num_seqs", dev)
    row_sums, row_stats = torch.ops.rlkern.policy_loss_fwd(
        p.lp, p.old, p.adv, p.mask, p.ref, p.rollout, p.ent, p.tw, p.thr, p.flags, p.hparams,
        p.backend)
    args = (row_stats, cfg, p.mask.shape[1], p.adv, nt, ns)
    loss, _ = _aggregate(row_sums, *args, with_entropy=p.ent is not None, seq_lens=seq_lens)
    grad_rows = (_aggregate_grad(row_sums, *args, with_entropy=p.ent is not None,
                                 seq_lens=seq_lens) * grad_scale).contiguous()
    want_ent = p.ent is not None and cfg.entropy_coef != 0.0
    grad_lp, grad_ent = torch.ops.rlkern.policy_loss_bwd(
        p.lp, p.old, p.adv, p.mask, p.ref, p.rollout, p.ent, p.tw, p.thr, row_stats, grad_rows,
        p.flags, p.hparams, want_ent, p.backend)
    return PolicyLossChunk(loss.detach().to(p.out_dtype), grad_lp,
                           grad_ent if want_ent else None, row_stats)


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, *, estimator: str = "k3",
               log_clamp: float | None = 20.0, value_clamp: float | None = 10.0,
               backend: str = "auto") -> Tensor:
    """Per-token KL estimate between the policy and a reference (Schulman, "Approximating KL
    divergence", 2020), differentiable wrt both inputs.

    With ``x = logp − ref``: ``k1 = x``; ``k2 = x²/2``; ``abs = |x|``;
    ``k3 = eʸ − y − 1``, ``y = clamp(ref − logp, ±log_clamp)``, clamped to ±``value_clamp``
    (verl's ``low_var_kl``; TRL's is unclamped: ``log_clamp=None, value_clamp=None``).
    A trailing ``+`` (``"k3+"``) gives the value of the estimator with the gradient of k2
    (verl's straight-through). verl's names ``kl``, ``mse``, ``low_var_kl`` are accepted.

    Args:
        logprobs, ref_logprobs: float tensors of the same shape; float32 math (float64 stays).
        estimator: one of :data:`rlkern.ops.policy_loss_config.KL_ESTIMATORS`.

    Returns:
        The per-token values, same shape, float32 (float64 for float64 input).
    """
    kind, straight = canonical_kl_estimator(estimator)
    lp = _tensor(logprobs, "logprobs")
    if not lp.dtype.is_floating_point:
        raise TypeError(f"logprobs must be a floating-point tensor, got {lp.dtype}")
    dt = torch.float64 if lp.dtype == torch.float64 else torch.float32
    ref = _float_input(ref_logprobs, "ref_logprobs", tuple(lp.shape), lp.device, dt)
    lp = lp.to(dt).contiguous()
    ref = ref.contiguous()
    for name, value in (("log_clamp", log_clamp), ("value_clamp", value_clamp)):
        if value is not None and not value >= 0:
            raise ValueError(f"{name} must be >= 0 or None, got {value}")
    resolved = backends.resolve_backend(backend, lp.device)
    return torch.ops.rlkern.kl_penalty_fwd(lp, ref, KL_KINDS[kind], straight, _inf(log_clamp),
                                           _inf(value_clamp), resolved)
