"""Hypothesis builders of adversarial calls, one per public op.

Each builder draws the shapes (empty dims included), the dtype, the value kind and memory
layout of each input (``values.py``), the options, and occasionally a foreign device (``meta``)
or a tensor where a number is expected, and returns a :class:`harness.Call`. Shapes stay tiny:
every call runs on three backends, one of them the Triton interpreter.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from hypothesis import strategies as st

import rlkern
from adversarial.harness import Call
from adversarial.values import KINDS, LAYOUTS, fill, lay_out

DTYPES = (torch.float32, torch.bfloat16, torch.float64)

BUILDERS: dict[str, Callable[[st.DataObject], Call]] = {}


def builder(name: str) -> Callable:
    def register(fn: Callable[[st.DataObject], Call]) -> Callable[[st.DataObject], Call]:
        BUILDERS[name] = fn
        return fn
    return register


def advantage_call(name: str, fn: Callable[..., Any], args: tuple[Any, ...],
                   kwargs: dict[str, Any], **fields: Any) -> Call:
    """A call of an advantage / return op: not differentiable (its outputs must not require
    grad even when the first argument, the rewards or scores, does)."""
    return Call(name, fn, args, kwargs, grad_wrt=("0",), nondiff=True, **fields)


def _gen(data: st.DataObject) -> torch.Generator:
    return torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))


def _adv_start(data: st.DataObject) -> tuple[torch.Generator, torch.dtype]:
    """The seeded generator and the score dtype an advantage-family builder starts from."""
    return _gen(data), data.draw(st.sampled_from(ADV_DTYPES), label="dtype")


def _float(data: st.DataObject, gen: torch.Generator, shape: tuple[int, ...],
           dtype: torch.dtype, label: str, *, scale: float = 1.0,
           kinds: tuple[str, ...] = KINDS, layouts: tuple[str, ...] = LAYOUTS) -> torch.Tensor:
    kind = data.draw(st.sampled_from(kinds), label=f"{label}.kind")
    layout = data.draw(st.sampled_from(layouts), label=f"{label}.layout")
    return lay_out(fill(kind, shape, dtype, gen, scale), layout)


def _maybe_meta(data: st.DataObject, t: torch.Tensor | None, label: str) -> torch.Tensor | None:
    """Rarely move an input to the meta device: every backend must refuse it the same way."""
    if t is not None and data.draw(st.integers(0, 19), label=f"{label}.meta") == 0:
        return t.to("meta")
    return t


def _mask(gen: torch.Generator, shape: tuple[int, ...], data: st.DataObject) -> torch.Tensor:
    density = data.draw(st.sampled_from((0.0, 0.5, 1.0)), label="mask.density")
    return torch.rand(shape, generator=gen) < density if density < 1 else \
        torch.ones(shape, dtype=torch.bool)


def _unchecked(fn: Callable) -> Callable:
    """``fn`` with the data-dependent checks off (rlkern.set_checks(False)) during the call:
    what the ops promise for inputs the checks would refuse (documented per op)."""
    def call(*args, **kwargs):
        was = rlkern.ops.logprobs.checks_enabled()
        rlkern.set_checks(False)
        try:
            return fn(*args, **kwargs)
        finally:
            rlkern.set_checks(was)
    call.unchecked = True
    return call


def _maybe_unchecked(data: st.DataObject, fn: Callable) -> Callable:
    return _unchecked(fn) if data.draw(st.integers(0, 3), label="checks_off") == 0 else fn


def _count(data: st.DataObject, default: float, label: str) -> float | torch.Tensor | None:
    """num_tokens / num_seqs: absent, a number, or a tensor (0 and negatives included)."""
    choice = data.draw(st.sampled_from(("none", "number", "tensor", "zero", "negative")),
                       label=label)
    return {"none": None, "number": float(default), "tensor": torch.tensor(float(default)),
            "zero": torch.tensor(0.0), "negative": torch.tensor(-3.0)}[choice]


def _poisoned(fn: Callable, count: float | torch.Tensor | None) -> bool:
    """A tensor count ≤ 0 with checks off: the ops answer NaN (documented), not an error."""
    return (getattr(fn, "unchecked", False) and isinstance(count, torch.Tensor)
            and not bool(count > 0))


@builder("token_logprobs")
def token_logprobs(data: st.DataObject) -> Call:
    gen = _gen(data)
    dtype = data.draw(st.sampled_from((*DTYPES, torch.float16)), label="dtype")
    n = data.draw(st.integers(0, 5), label="N")
    v = data.draw(st.sampled_from((1, 2, 7, 33)), label="V")
    logits = _float(data, gen, (n, v), dtype, "logits", scale=3.0)
    labels = torch.randint(0, v, (n,), generator=gen)
    ignore_index = data.draw(st.sampled_from((-100, 0)), label="ignore_index")
    if n and data.draw(st.booleans(), label="ignored"):
        labels[0] = ignore_index
    if n > 1 and data.draw(st.booleans(), label="as_3d"):
        # TRL's logits[:, :-1, :]: a (B, L, V) view with a row stride that skips a position.
        full = torch.cat([logits, logits[-1:]]).reshape(1, n + 1, v)
        logits, labels = full[:, :-1, :], labels.reshape(1, n)
    inplace = data.draw(st.booleans(), label="inplace_backward")
    temperature = data.draw(st.sampled_from((1.0, 0.7, 1e-10, 1e300)), label="temperature")
    labels = _maybe_meta(data, labels, "labels")
    return Call("token_logprobs", _maybe_unchecked(data, rlkern.token_logprobs), (logits, labels),
                dict(temperature=temperature, return_entropy=True,
                     return_stats=data.draw(st.booleans(), label="stats"),
                     inplace_backward=inplace, ignore_index=ignore_index),
                grad_wrt=("0",), dtype=dtype,
                # lse = max x / T + log s is unbounded, and the gradient (up to 1/T) is stored
                # in the logits' dtype: beyond its range either rounds to ±inf on every
                # backend (finite rows keep finite logprobs and entropy).
                overflow_ok=_lse_may_overflow(logits, temperature)
                or 1.0 / temperature > torch.finfo(dtype).max / 2)


def _lse_may_overflow(x: torch.Tensor, temperature: float, acc: torch.dtype | None = None) -> bool:
    """Whether max |x| / T of these logits nears the end of the accumulation dtype's range."""
    finite = x[torch.isfinite(x)] if x.numel() else x
    peak = float(finite.double().abs().max()) if finite.numel() else 0.0
    acc = acc or (torch.float64 if x.dtype == torch.float64 else torch.float32)
    return peak / temperature > torch.finfo(acc).max / 2


#: The fused linear ops in 16 bits: the CPU path forms each logits tile in the inputs' dtype,
#: as F.linear (and so the torch backend) does, while Triton keeps the fp32 accumulator
#: (docs/linear_logprobs.md). The backends then differ by one rounding of the logits
#: (2^-9 relative) propagated to every output, beyond the fp32 tolerance of AGREE_TOL; and
#: huge logits whose top two are within that rounding may be tied on one backend and not on
#: the other, so 16-bit draws keep the logits moderate.
LINEAR_16BIT_TOL = (2.0**-6, 2.0**-6)


def _linear_inputs(data: st.DataObject, gen: torch.Generator, dtype: torch.dtype, n: int):
    h = data.draw(st.sampled_from((0, 1, 4, 8)), label="H")
    v = data.draw(st.sampled_from((1, 5, 19)), label="V")
    hidden = _float(data, gen, (n, h), dtype, "hidden", scale=0.5,
                    kinds=("normal", "constant", "tiny", "with_nan", "huge"))
    weight = _float(data, gen, (v, h), dtype, "weight", scale=0.5,
                    kinds=("normal", "constant", "tiny", "huge"))
    bias = None
    if data.draw(st.booleans(), label="has_bias"):
        bias = _float(data, gen, (v,), dtype, "bias",
                      kinds=("normal", "with_neg_inf", "constant"), layouts=("contiguous",))
    labels = torch.randint(0, v, (n,), generator=gen)
    return hidden, weight, bias, labels


def _linear_lp_inputs(data: st.DataObject, gen: torch.Generator, dtype: torch.dtype, n: int,
                      temperature: float = 1.0):
    """The inputs of the fused linear logprobs ops (``_linear_inputs`` with their own edges:
    a constant −1e10 bias, ignored rows, no huge values in 16 bits).

    Each backend forms the logits with its own GEMM, hence its own summation order. Where the
    scaled logits are huge (|x| / T beyond 1/ε: huge operands, T = 1e-10) a one-ulp difference
    between two logits decides their softmax, so logits that are tied in exact arithmetic (all
    vocabulary rows of W equal: a constant or stride-0 weight) come out tied on one backend and
    not on another — the rounding of the matmul, not of the epilogue. Such draws keep W's
    rows distinct (ties of a bias, added exactly, stay: H = 0 draws them)."""
    h = data.draw(st.sampled_from((0, 1, 4, 8)), label="H")
    v = data.draw(st.sampled_from((1, 5, 19)), label="V")
    wide = dtype in (torch.float32, torch.float64)
    huge = ("huge",) if wide else ()
    hidden_kind = data.draw(st.sampled_from(("normal", "constant", "tiny", "with_nan", *huge)),
                            label="hidden.kind")
    hidden = lay_out(fill(hidden_kind, (n, h), dtype, gen, 0.5),
                     data.draw(st.sampled_from(LAYOUTS), label="hidden.layout"))
    weight_kind = data.draw(st.sampled_from(("normal", "constant", "tiny", *huge)),
                            label="weight.kind")
    sharp = "huge" in (hidden_kind, weight_kind) or temperature < 1e-6
    if sharp and weight_kind == "constant":
        weight_kind = "normal"
    layouts = ("contiguous", "transposed") if sharp else LAYOUTS
    weight = lay_out(fill(weight_kind, (v, h), dtype, gen, 0.5),
                     data.draw(st.sampled_from(layouts), label="weight.layout"))
    bias = None
    if data.draw(st.booleans(), label="has_bias"):
        bias = _float(data, gen, (v,), dtype, "bias",
                      kinds=("normal", "with_neg_inf", "constant", "big_constant"),
                      layouts=("contiguous",))
    labels = torch.randint(0, v, (n,), generator=gen)
    if n and data.draw(st.booleans(), label="ignored"):
        labels[-1] = -100
    return hidden, weight, bias, labels


def _linear_overflow(hidden, weight, bias, temperature: float) -> bool:
    """Whether lse (max x / T) of the materialised logits can leave the float range."""
    b = None if bias is None else bias.double()
    x = torch.nn.functional.linear(hidden.double(), weight.double(), b)
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    return _lse_may_overflow(x, temperature, acc)


def _linear_tol(dtype: torch.dtype) -> tuple[float, float] | None:
    return LINEAR_16BIT_TOL if dtype in (torch.bfloat16, torch.float16) else None


@builder("linear_logprobs")
def linear_logprobs(data: st.DataObject) -> Call:
    gen = _gen(data)
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    n = data.draw(st.integers(0, 6), label="N")
    temperature = data.draw(st.sampled_from((1.0, 0.5, 1e-10)), label="temperature")
    hidden, weight, bias, labels = _linear_lp_inputs(data, gen, dtype, n, temperature)
    if n and n % 2 == 0 and data.draw(st.booleans(), label="as_3d"):
        hidden, labels = hidden.reshape(2, n // 2, -1), labels.reshape(2, n // 2)
    return Call("linear_logprobs", rlkern.linear_logprobs, (hidden, weight, labels),
                dict(bias=bias, return_entropy=True, temperature=temperature,
                     chunk_size=data.draw(st.sampled_from((None, 1, 2)), label="chunk_size")),
                grad_wrt=("0", "1", "bias"), dtype=dtype, tol=_linear_tol(dtype),
                overflow_ok=_linear_overflow(hidden, weight, bias, temperature))


@builder("linear_logprobs_with_grad")
def linear_logprobs_with_grad(data: st.DataObject) -> Call:
    gen = _gen(data)
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    n = data.draw(st.integers(0, 6), label="N")
    hidden, weight, bias, labels = _linear_lp_inputs(data, gen, dtype, n)
    acc = torch.float32 if dtype != torch.float64 else dtype
    grad_lp = None
    if data.draw(st.integers(0, 4), label="grad_logprobs") > 0:
        grad_lp = _maybe_meta(data, torch.randn(n, generator=gen, dtype=torch.float64).to(acc),
                              "grad_lp")
    grad_ent = None
    if data.draw(st.booleans(), label="grad_entropy"):
        grad_ent = _maybe_meta(data, torch.randn(n, generator=gen, dtype=torch.float64).to(acc),
                               "grad_ent")
    return Call("linear_logprobs_with_grad", rlkern.linear_logprobs_with_grad,
                (hidden, weight, labels),
                dict(grad_logprobs=grad_lp, grad_entropy=grad_ent, bias=bias,
                     return_entropy=grad_ent is not None,
                     chunk_size=data.draw(st.sampled_from((None, 1, 4)), label="chunk_size")),
                dtype=dtype, tol=_linear_tol(dtype),
                overflow_ok=_linear_overflow(hidden, weight, bias, 1.0))


LOSSES = ("ppo", "gspo", "cispo", "sapo", "gmpo", "reinforce", "vespo", "dro", "dppo_tv",
          "dppo_kl", "clip_cov", "kl_cov")
KL = (None, "k1", "k3", "low_var_kl+")


def _loss_inputs(data: st.DataObject, gen: torch.Generator, dtype: torch.dtype, b: int, t: int):
    old = _float(data, gen, (b, t), dtype, "old", scale=0.3,
                 kinds=("normal", "with_nan", "with_neg_inf", "huge", "constant"))
    adv = _float(data, gen, (b,), dtype, "advantages",
                 kinds=("normal", "constant", "with_nan", "huge"), layouts=("contiguous",))
    mask = _mask(gen, (b, t), data)
    return old, adv, mask


@builder("policy_loss")
def policy_loss(data: st.DataObject) -> Call:
    gen = _gen(data)
    dtype = data.draw(st.sampled_from((torch.float32, torch.float64)), label="dtype")
    b, t = data.draw(st.integers(0, 4), label="B"), data.draw(st.integers(0, 5), label="T")
    lp = -_float(data, gen, (b, t), dtype, "logprobs", scale=1.0,
                 kinds=("normal", "constant", "with_neg_inf", "tiny", "huge")).abs()
    old, adv, mask = _loss_inputs(data, gen, dtype, b, t)
    kl = data.draw(st.sampled_from(KL), label="kl")
    ref = (lp.detach() - 0.1).clone() if kl else None
    entropy = torch.rand(b, t, generator=gen, dtype=torch.float64).to(dtype) \
        if data.draw(st.booleans(), label="entropy") else None
    loss = data.draw(st.sampled_from(LOSSES), label="loss")
    config = rlkern.PolicyLossConfig(
        policy_loss=loss, kl_coef=0.1 if kl else 0.0, kl_estimator=kl or "k3",
        dro_beta=0.5 if loss == "dro" else None,
        entropy_coef=0.01 if entropy is not None else 0.0,
        loss_agg_mode=data.draw(st.sampled_from(("token-mean", "seq-mean-token-mean", "sum")),
                                label="agg"))
    count = _count(data, max(1, b * t), "num_tokens")
    # clip_cov / kl_cov: a fixed selection (their own draws would differ between backends)
    cov = (torch.rand(b, t, generator=gen) < 0.3).to(dtype) \
        if loss in ("clip_cov", "kl_cov") else None
    fn = _maybe_unchecked(data, rlkern.policy_loss)
    return Call("policy_loss", fn, (lp, _maybe_meta(data, old, "old"), adv, mask),
                dict(config=config, ref_logprobs=ref, entropy=entropy, num_tokens=count,
                     cov_select=cov),
                grad_wrt=("0", "entropy"), dtype=dtype, overflow_ok=True,
                poisoned=_poisoned(fn, count))


@builder("kl_penalty")
def kl_penalty(data: st.DataObject) -> Call:
    gen = _gen(data)
    dtype = data.draw(st.sampled_from((torch.float32, torch.float64)), label="dtype")
    shape = (data.draw(st.integers(0, 3), label="B"), data.draw(st.integers(0, 6), label="T"))
    lp = _float(data, gen, shape, dtype, "logprobs", kinds=("normal", "with_neg_inf", "huge"))
    ref = _float(data, gen, shape, dtype, "ref", kinds=("normal", "with_neg_inf", "with_nan"))
    est = data.draw(st.sampled_from(("k1", "k2", "k3", "abs", "k3+")), label="estimator")
    return Call("kl_penalty", rlkern.kl_penalty, (lp, ref), dict(estimator=est),
                grad_wrt=("0",), dtype=dtype, overflow_ok=True)


@builder("linear_grpo_loss")
def linear_grpo_loss(data: st.DataObject) -> Call:
    gen = _gen(data)
    dtype = data.draw(st.sampled_from((torch.float32, torch.float64)), label="dtype")
    b, t = data.draw(st.integers(0, 3), label="B"), data.draw(st.integers(0, 4), label="T")
    hidden, weight, bias, labels = _linear_inputs(data, gen, dtype, b * t)
    hidden = hidden.reshape(b, t, -1) if b * t else hidden.new_zeros(b, t, hidden.shape[-1])
    labels = labels.reshape(b, t)
    old, adv, mask = _loss_inputs(data, gen, dtype, b, t)
    old = old.float() if dtype != torch.float64 else old
    old = _maybe_meta(data, old, "old")
    count = _count(data, max(1, b * t), "num_tokens")
    fn = _maybe_unchecked(data, rlkern.linear_grpo_loss)
    return Call("linear_grpo_loss", fn,
                (hidden, weight, labels, mask, adv.float() if dtype != torch.float64 else adv),
                dict(bias=bias, old_logprobs=old,
                     policy_loss=data.draw(st.sampled_from(("ppo", "cispo", "gspo")), label="l"),
                     entropy_coef=data.draw(st.sampled_from((0.0, 0.01)), label="ent"),
                     num_tokens=count),
                grad_wrt=("0", "1", "bias"), dtype=dtype, overflow_ok=True,
                poisoned=_poisoned(fn, count))


# --------------------------------------------------------------------------------------------
# The advantages family. Ids come in every form trainers hand over (small dense ids, sparse
# ids with gaps, negative and near ±2^62, all-distinct ids: singleton groups) or as contiguous
# groups; scores are often rounded so that ties, zero-variance groups and pass@k ties are
# common; every option of each op is drawn.

ADV_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
ADV_ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline", "opo", "gpg",
                  "grpo_passk", "ngrpo", "unlikely", "xrpo")
_SPARSE_IDS = (-(2**62), -7, 0, 5, 2**40, 2**62 - 1)


def _rare_meta(data: st.DataObject, t: torch.Tensor, label: str) -> torch.Tensor:
    """Now and then (an uncommon draw, not the shrink target 0) move ``t`` to meta: every
    backend must refuse it by name."""
    return t.to("meta") if data.draw(st.integers(0, 39), label=f"{label}.meta") == 17 else t


def _group_ids(data: st.DataObject, gen: torch.Generator, n: int) -> torch.Tensor:
    kind = data.draw(st.sampled_from(("dense", "gaps", "singletons", "int32", "stride0")),
                     label="ids")
    if kind == "singletons":
        return torch.randperm(n, generator=gen) * 1000 - 17
    pool = torch.tensor(_SPARSE_IDS) if kind == "gaps" else torch.arange(3)
    ids = pool[torch.randint(0, pool.numel(), (n,), generator=gen)]
    if kind == "int32":
        return ids.to(torch.int32)
    return lay_out(ids, "expanded") if kind == "stride0" else ids  # stride0: one group


def _groups(data: st.DataObject, n: int, gen: torch.Generator | None = None):
    gen = gen or torch.Generator().manual_seed(n)
    if n and data.draw(st.booleans(), label="by_ids"):
        return dict(group_ids=_rare_meta(data, _group_ids(data, gen, n), "group_ids"))
    size = data.draw(st.sampled_from([d for d in (1, 2, 4) if n % d == 0] or [1]), label="G")
    return dict(group_size=size)


#: Kinds whose finite values can overflow a sum or a difference in the output dtype.
_EXTREME = ("huge", "finfo_min")


def _values(data: st.DataObject, gen: torch.Generator, shape: tuple[int, ...],
            dtype: torch.dtype, label: str, kinds: tuple[str, ...],
            layouts: tuple[str, ...] = LAYOUTS, *, rounded: bool = False,
            ) -> tuple[torch.Tensor, bool]:
    """An input of ``kinds`` (sometimes rounded: ties, zero-variance groups, pass@k ties) and
    whether its finite values may overflow the outputs (the harness's ``overflow_ok``: only
    for extreme kinds, so that a NaN from ordinary finite values is never excused)."""
    kind = data.draw(st.sampled_from(kinds), label=f"{label}.kind")
    if kind == "finfo_min" and dtype == torch.float64:
        # float64's extremes overflow the float64 accumulation itself (Σ of two of them), where
        # no result means anything and where inf or NaN lands depends on the order of the
        # operations; the extremes of the narrower dtypes are well inside its range.
        kind = "huge"
    t = fill(kind, shape, dtype, gen)
    if rounded and data.draw(st.booleans(), label=f"{label}.round"):
        t = t.round()
    return lay_out(t, data.draw(st.sampled_from(layouts), label=f"{label}.layout")), \
        kind in _EXTREME


def _token_mask(data: st.DataObject, gen: torch.Generator, shape: tuple[int, ...],
                label: str = "mask", densities: tuple[float, ...] = (1.0, 0.5, 0.0),
                ) -> torch.Tensor:
    """A bool, integer or float 0/1 mask of a drawn density, in any layout."""
    dtype = data.draw(st.sampled_from((torch.bool, torch.float32, torch.int64)),
                      label=f"{label}.dtype")
    density = data.draw(st.sampled_from(densities), label=f"{label}.density")
    mask = (torch.rand(shape, generator=gen) < density).to(dtype)
    return lay_out(mask, data.draw(st.sampled_from(LAYOUTS), label=f"{label}.layout"))


@builder("group_advantages")
def group_advantages(data: st.DataObject) -> Call:
    gen, dtype = _adv_start(data)
    n = data.draw(st.sampled_from((4, 1, 0, 8)), label="N")
    est = data.draw(st.sampled_from(ADV_ESTIMATORS), label="estimator")
    token_level = data.draw(st.booleans(), label="token_level")
    t = data.draw(st.sampled_from((1, 0, 3)), label="T")
    scores, extreme = _values(data, gen, (n, t) if token_level else (n,), dtype, "scores",
                              ("normal", "constant", "with_nan", "huge", "tiny", "with_inf",
                               "finfo_min"), rounded=True)
    batch = est in ("grpo", "unlikely", "xrpo") and data.draw(st.booleans(), label="batch")
    kwargs = dict(estimator=est, eps=data.draw(st.sampled_from((1e-6, 0.0, 1e-4)), label="eps"),
                  std=data.draw(st.sampled_from(("unbiased", "biased", "none")), label="std"),
                  std_scope="batch" if batch else "group",
                  singleton=data.draw(st.sampled_from(("zero", "verl")), label="singleton"),
                  nan_policy=data.draw(st.sampled_from(("raise", "omit")), label="nan"),
                  **_groups(data, n, gen))
    needs_mask = token_level or est in ("unlikely", "xrpo")
    if needs_mask or data.draw(st.booleans(), label="has_mask"):
        kwargs["mask"] = _rare_meta(data, _token_mask(data, gen, (n, t)), "mask")
    if est == "opo":
        lengths = torch.randint(0, 5, (n,), generator=gen).to(
            data.draw(st.sampled_from((torch.float32, torch.int64)), label="lengths.dtype"))
        kwargs["lengths"] = _rare_meta(data, lengths, "lengths")
    if est in ("unlikely", "xrpo"):
        old = -_float(data, gen, (n, t), torch.float32, "old", scale=0.5,
                      kinds=("normal", "with_nan", "with_inf", "with_neg_inf", "constant")).abs()
        kwargs["old_logprobs"] = _maybe_meta(data, old, "old")
        lam = data.draw(st.sampled_from((None, 0.5)), label="lam")
        kwargs.update(lam=0.5 if est == "xrpo" else lam, kappa=0.3 if est == "xrpo" else None)
    if est == "ngrpo":
        kwargs["r_max"] = data.draw(st.sampled_from((1.0, 0.0)), label="r_max")
    return advantage_call("group_advantages", rlkern.group_advantages, (scores,), kwargs,
                          dtype=dtype, overflow_ok=extreme)


@builder("group_stats")
def group_stats(data: st.DataObject) -> Call:
    gen, dtype = _adv_start(data)
    n = data.draw(st.sampled_from((4, 1, 0, 8)), label="N")
    scores, extreme = _values(data, gen, (n,), dtype, "scores",
                              ("normal", "constant", "huge", "tiny", "with_nan", "with_inf",
                               "finfo_min"), ("contiguous", "expanded"), rounded=True)
    ids = _group_ids(data, gen, n)
    est = data.draw(st.sampled_from(("grpo", "dr_grpo", "rloo", "gpg", "ngrpo")),
                    label="estimator")
    options = dict(estimator=est, eps=data.draw(st.sampled_from((1e-6, 0.0)), label="eps"),
                   std=data.draw(st.sampled_from(("unbiased", "biased", "none")), label="std"),
                   std_scope="batch" if est == "grpo" and data.draw(st.booleans(),
                                                                      label="batch") else "group",
                   singleton=data.draw(st.sampled_from(("zero", "verl")), label="singleton"),
                   r_max=data.draw(st.sampled_from((1.0, 0.0)), label="r_max"))
    nan_policy = data.draw(st.sampled_from(("raise", "omit")), label="nan")
    # Statistics of one batch, or of two micro-batches merged (Chan's formula).
    split = data.draw(st.sampled_from((0, 1, n // 2)), label="split")

    def run(scores: torch.Tensor, ids: torch.Tensor, *, backend: str):
        stats = rlkern.GroupStats.from_scores(scores[:split], ids[:split], nan_policy=nan_policy)
        stats = stats.merge(rlkern.GroupStats.from_scores(scores[split:], ids[split:],
                                                          nan_policy=nan_policy))
        return stats.advantages(scores, ids, backend=backend, **options)

    return advantage_call("GroupStats.advantages", run,
                          (scores, _rare_meta(data, ids, "group_ids")), {}, dtype=dtype,
                          overflow_ok=extreme)


_REWARD_KINDS = ("normal", "with_inf", "with_nan", "with_neg_inf", "huge", "constant", "tiny",
                 "finfo_min")


def _token_rewards(data: st.DataObject):
    """``(gen, dtype, shape, rewards, extreme)`` of the scans over (N, T) token rewards."""
    gen, dtype = _adv_start(data)
    shape = (data.draw(st.sampled_from((2, 1, 0, 3)), label="N"),
             data.draw(st.sampled_from((6, 1, 0, 33)), label="T"))
    rewards, extreme = _values(data, gen, shape, dtype, "rewards", _REWARD_KINDS)
    return gen, dtype, shape, rewards, extreme


@builder("discounted_returns")
def discounted_returns(data: st.DataObject) -> Call:
    gen, dtype, shape, rewards, extreme = _token_rewards(data)
    reset = None
    if data.draw(st.booleans(), label="r"):
        reset = _rare_meta(data, _token_mask(data, gen, shape, "reset", (0.3, 0.0, 1.0)),
                           "reset")
    gamma = data.draw(st.sampled_from((1.0, 0.9, 0.0, -0.5, 1.5)), label="gamma")
    return advantage_call("discounted_returns", rlkern.discounted_returns, (rewards,),
                          dict(gamma=gamma, reset=reset), dtype=dtype,
                          overflow_ok=extreme or abs(gamma) > 1)


@builder("gae")
def gae(data: st.DataObject) -> Call:
    gen, dtype, shape, rewards, extreme = _token_rewards(data)
    values = None
    if data.draw(st.booleans(), label="v"):
        values, extreme_v = _values(data, gen, shape, dtype, "values", _REWARD_KINDS)
        values, extreme = _rare_meta(data, values, "values"), extreme or extreme_v
    mask = _rare_meta(data, _token_mask(data, gen, shape, "mask", (0.7, 1.0, 0.0)), "mask")
    gamma = data.draw(st.sampled_from((1.0, 0.99, 0.0, -0.5, 1.5)), label="gamma")
    lam = data.draw(st.sampled_from((0.95, 1.0, 0.0, 2.0)), label="lam")
    return advantage_call("gae", rlkern.gae, (rewards, values, mask), dict(gamma=gamma, lam=lam),
                          dtype=dtype,
                          overflow_ok=extreme or abs(gamma) > 1 or abs(gamma * lam) > 1)


@builder("position_baseline")
def position_baseline(data: st.DataObject) -> Call:
    gen, dtype = _adv_start(data)
    n = data.draw(st.sampled_from((4, 1, 2, 0, 6)), label="N")
    t = data.draw(st.sampled_from((3, 1, 0, 5)), label="T")
    returns, extreme = _values(data, gen, (n, t), dtype, "returns",
                               ("normal", "constant", "huge", "with_nan", "with_inf", "tiny",
                                "finfo_min"), rounded=True)
    mask = _rare_meta(data, _token_mask(data, gen, (n, t)), "mask")
    return advantage_call("position_baseline", rlkern.position_baseline, (returns, mask),
                          _groups(data, n, gen), dtype=dtype, overflow_ok=extreme)


@builder("gtpo_weights")
def gtpo_weights(data: st.DataObject) -> Call:
    gen, dtype = _adv_start(data)
    n = data.draw(st.sampled_from((4, 1, 2, 0, 6)), label="N")
    t = data.draw(st.sampled_from((3, 1, 0, 5)), label="T")
    entropy, extreme = _values(data, gen, (n, t), dtype, "entropy",
                               ("normal", "constant", "tiny", "huge", "with_nan", "with_inf",
                                "finfo_min"))
    entropy = entropy.abs()
    if data.draw(st.booleans(), label="zeros"):  # confident tokens: H = 0 (below eps)
        entropy = torch.where(torch.rand(entropy.shape, generator=gen) < 0.5, 0.0,
                              entropy).to(dtype)
    mask = _rare_meta(data, _token_mask(data, gen, (n, t)), "mask")
    kwargs = dict(_groups(data, n, gen), eps=data.draw(st.sampled_from((1e-6, 0.5)), label="eps"))
    return advantage_call("gtpo_weights", rlkern.gtpo_weights, (entropy, mask), kwargs,
                          dtype=dtype, overflow_ok=extreme)


@builder("gigpo_advantages")
def gigpo_advantages(data: st.DataObject) -> Call:
    gen, dtype = _adv_start(data)
    s = data.draw(st.sampled_from((6, 1, 0, 9)), label="S")
    ep, extreme_ep = _values(data, gen, (s,), dtype, "episode",
                             ("normal", "constant", "huge", "with_nan", "tiny", "finfo_min"),
                             ("contiguous", "expanded"), rounded=True)
    st_ret, extreme_st = _values(data, gen, (s,), dtype, "step",
                                 ("normal", "constant", "with_nan", "with_inf", "huge",
                                  "finfo_min"), ("contiguous", "expanded"), rounded=True)
    keys = _group_ids(data, gen, s) if data.draw(st.booleans(), label="sparse_keys") else \
        torch.randint(0, 2, (s,), generator=gen)
    ids = _group_ids(data, gen, s)
    return advantage_call("gigpo_advantages", rlkern.gigpo_advantages,
                          (ep, st_ret, _rare_meta(data, keys, "keys")),
                          dict(group_ids=_rare_meta(data, ids, "group_ids"),
                               omega=data.draw(st.sampled_from((1.0, 0.0, -0.5)), label="omega"),
                               mode=data.draw(st.sampled_from(("mean_norm", "std_norm")),
                                              label="mode"),
                               step_mode=data.draw(st.sampled_from(("std_norm", "mean_norm")),
                                                   label="step_mode"),
                               eps=data.draw(st.sampled_from((1e-6, 0.0)), label="eps")),
                          dtype=dtype, overflow_ok=extreme_ep or extreme_st)


@builder("empg_modulate")
def empg_modulate(data: st.DataObject) -> Call:
    gen, dtype = _adv_start(data)
    s = data.draw(st.sampled_from((5, 1, 0, 7)), label="S")
    one_d = ("contiguous", "expanded")
    adv, extreme = _values(data, gen, (s,), dtype, "adv",
                           ("normal", "huge", "with_nan", "with_inf", "finfo_min"), one_d)
    h, _ = _values(data, gen, (s,), dtype, "H", ("normal", "constant", "huge", "tiny",
                                                "with_nan"), one_d)
    h_next, _ = _values(data, gen, (s,), dtype, "H_next",
                        ("normal", "with_nan", "constant", "with_inf"), one_d)
    h, h_next = h.abs(), h_next.abs()
    return advantage_call("empg_modulate", rlkern.empg_modulate,
                          (adv, h, _rare_meta(data, h_next, "H_next")),
                          dict(k=data.draw(st.sampled_from((1.0, 0.0, 30.0)), label="k"),
                               k_f=data.draw(st.sampled_from((1.0, 2.0)), label="k_f"),
                               zeta=data.draw(st.sampled_from((0.1, 0.0)), label="zeta")),
                          dtype=dtype, overflow_ok=extreme)


@builder("sample")
def sample(data: st.DataObject) -> Call:
    gen = _gen(data)
    dtype = data.draw(st.sampled_from((*DTYPES, torch.float16)), label="dtype")
    r = data.draw(st.integers(0, 4), label="R")
    v = data.draw(st.sampled_from((1, 2, 9, 40)), label="V")
    logits = _float(data, gen, (r, v), dtype, "logits", scale=2.0,
                    kinds=("normal", "constant", "big_constant", "with_neg_inf", "one_huge",
                           "huge", "finfo_min", "with_nan", "with_inf"),
                    layouts=("contiguous", "expanded"))
    n = r
    indices = None
    if r and data.draw(st.booleans(), label="indices"):
        # Output rows sharing logits rows (a group's first step), in any order.
        n = r + 2
        indices = torch.randint(0, r, (n,), generator=gen)
    temperature = data.draw(st.sampled_from((1.0, 0.3, 1e-10, "per_row")), label="temperature")
    if temperature == "per_row":
        temperature = torch.tensor([0.5, 1.0, 2.0, 1e-10, 0.7, 1.3])[:n].to(torch.float64)
    seeds = _maybe_meta(data, torch.arange(n, dtype=torch.int64), "seeds")
    kwargs = dict(seeds=seeds, steps=torch.zeros(n, dtype=torch.int64), indices=indices,
                  temperature=temperature,
                  top_k=data.draw(st.sampled_from((None, 1, 3)), label="top_k"),
                  top_p=data.draw(st.sampled_from((None, 0.9, 1e-9)), label="top_p"),
                  min_p=data.draw(st.sampled_from((None, 0.1)), label="min_p"),
                  filter_order=data.draw(st.sampled_from(("top_k_first", "joint")),
                                         label="filter_order"),
                  raw_temperature=data.draw(st.booleans(), label="raw_temperature"),
                  return_entropy=True)
    # The sampler computes in float32 whatever the logits' dtype (docs/sampling.md): float64
    # logits are judged with float32's tolerance.
    return Call("sample", _maybe_unchecked(data, rlkern.sample), (logits,), kwargs,
                grad_wrt=("0",),
                dtype=torch.float32 if dtype == torch.float64 else dtype, nondiff=True)


@builder("optimal_token_baseline")
def optimal_token_baseline(data: st.DataObject) -> Call:
    gen, dtype, shape, rewards, extreme = _token_rewards(data)
    n = shape[0]
    mask = _rare_meta(data, _token_mask(data, gen, shape, "mask", (0.7, 1.0, 0.0)), "mask")
    # π < 1 and Σπ² ∈ [π², 1], as a policy gives them: w = (1 − π)²(1 + u) > 0, so that
    # eps = 0 never divides 0 by 0 for finite inputs
    pi = 1 - torch.rand(shape, generator=gen) * 0.95 - 0.01
    logprobs = pi.log().to(dtype)
    spi2 = (pi**2 + (1 - pi) ** 2 * torch.rand(shape, generator=gen)).to(dtype)
    rho = None
    if data.draw(st.booleans(), label="rho"):
        rho, extreme_rho = _values(data, gen, shape, dtype, "rho", ("normal", "with_nan",
                                                                   "huge", "tiny"))
        extreme = extreme or extreme_rho
    kwargs = dict(**_groups(data, n, gen), rollout_is_weights=rho,
                  multi_turn=data.draw(st.booleans(), label="multi_turn"),
                  zero_tail=not data.draw(st.booleans(), label="no_zero_tail"),
                  eps=data.draw(st.sampled_from((1e-8, 0.0)), label="eps"))
    return advantage_call("optimal_token_baseline", rlkern.optimal_token_baseline,
                          (rewards, mask, logprobs, spi2), kwargs, dtype=dtype,
                          overflow_ok=extreme)
