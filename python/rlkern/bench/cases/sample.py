"""Benchmark case ``sample``: one sampling step of a (N, V) logits tensor, with logprobs.

Modes:

* ``top_k+top_p`` — temperature 0.7, top-k 50, top-p 0.9 (a common RL rollout setting);
* ``plain`` — temperature 0.7 only;
* ``G=8`` — top-k + top-p, 8 draws per row: ``rlkern.sample(num_samples=8)`` (one filtering
  pass per row) against ``rlkern.sample`` drawing 8 times from each row through ``indices``
  (8 filtering passes per row) — that second implementation is named ``8 separate draws``.

Implementations:

* ``rlkern`` — ``rlkern.sample(...)`` (radix-select thresholds, inverse-CDF draw, Philox).
* ``torch sort (HF/vLLM style)`` — the sort-based sampler as HF's logits warpers and vLLM's
  torch fallback are written: fp32 ``z / T``, top-k by ``topk`` + mask, a full descending sort
  + ``cumsum`` for top-p, ``softmax`` + ``multinomial``, ``log_softmax`` + ``gather`` for the
  raw and processed logprobs (restated from the formulas; neither is a dependency).
* ``floor`` — one read of the logits (``logits.view(int16).amax()``).

Samples are random, so outputs are not compared here: exactness is tested statistically in
tests/test_sample.py.

Benchmark case ``micro_groups``: :func:`rlkern.generate_groups` on a tiny randomly initialised
``LlamaForCausalLM`` (transformers, built from a config, no download) under each schedule —
wall time (timed by the harness), peak KV tokens, decode steps and utilisation (the
scheduler's :class:`~rlkern.sampling.SimResult` of the run) — checked to give the same
completions; its summary adds the simulation of a lognormal length distribution at scale
(:func:`micro_group_report`), every schedule on the workload of issue 18 with and without a
KV budget of half the full group's peak — decode steps, peak KV, preemptions, recomputed
tokens (:func:`kv_budget_report`) — and, with ``--plot``, ``micro_groups.png``.
"""

from __future__ import annotations

import importlib
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from rlkern.bench.cases import Case, CaseOptions, Impl, Size, Tolerance, register
from rlkern.bench.kit import Peer, RlkernBackend, peaked_logits, read_once

V_QWEN = 151936
TEMPERATURE, TOP_K, TOP_P = 0.7, 50, 0.9
GROUP = 8  # draws per row of mode G=8


class SampleInputs(NamedTuple):
    logits: Tensor
    seeds: Tensor
    steps: Tensor


def make_inputs(size: Size, dtype: torch.dtype, device: torch.device) -> SampleInputs:
    n, v = size["N"], size["V"]
    logits, _ = peaked_logits(n, v, dtype, device, seed=n * 7 + v)
    return SampleInputs(logits, torch.arange(n, device=device),
                        torch.zeros(n, dtype=torch.int64, device=device))


def torch_sort_sampler(logits: Tensor, temperature: float, top_k: int | None,
                       top_p: float | None) -> dict[str, Tensor]:
    """Sort-based sampling with raw and processed logprobs, as HF/vLLM write it in torch."""
    z = logits.float() / temperature
    raw = torch.log_softmax(z, -1)
    if top_k is not None:
        kth = torch.topk(z, top_k, dim=-1).values[:, -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if top_p is not None:
        sorted_z, idx = torch.sort(z, descending=True, dim=-1)
        probs = sorted_z.softmax(-1)
        before = probs.cumsum(-1) - probs
        sorted_z = sorted_z.masked_fill(before >= top_p, float("-inf"))
        z = torch.empty_like(z).scatter_(-1, idx, sorted_z)
    processed = torch.log_softmax(z, -1)
    tokens = torch.multinomial(processed.exp(), 1)
    return {"tokens": tokens[:, 0], "raw": raw.gather(-1, tokens)[:, 0],
            "processed": processed.gather(-1, tokens)[:, 0]}


@register("sample")
def sample_case(options: CaseOptions) -> Case:
    import rlkern

    backend = RlkernBackend.choose(options)

    def impls(mode: str) -> list[Impl]:
        k, p = (None, None) if mode == "plain" else (TOP_K, TOP_P)
        if mode == f"G={GROUP}":
            return group_impls(k, p)

        def ours(x: SampleInputs):
            rlkern.sample(x.logits, temperature=TEMPERATURE, top_k=k, top_p=p, seeds=x.seeds,
                          steps=x.steps, backend=backend.name)
            return {}

        def peer(x: SampleInputs):
            torch_sort_sampler(x.logits, TEMPERATURE, k, p)
            return {}

        return [Impl.rlkern(ours, note=backend.note),
                Impl("torch sort (HF/vLLM style)", peer),
                Impl.floor(lambda x: read_once(x.logits))]

    def group_impls(k, p) -> list[Impl]:
        def draw(x: SampleInputs, **kw):
            return rlkern.sample(x.logits, temperature=TEMPERATURE, top_k=k, top_p=p,
                                 backend=backend.name, **kw)

        def ours(x: SampleInputs):
            draw(x, seeds=x.seeds, steps=x.steps, num_samples=GROUP)
            return {}

        def separate(x: SampleInputs):
            rows = torch.arange(x.seeds.numel(), device=x.seeds.device)
            draw(x, seeds=x.seeds.repeat_interleave(GROUP), steps=x.steps.repeat_interleave(GROUP),
                 indices=rows.repeat_interleave(GROUP))
            return {}

        return [Impl.rlkern(ours, note=backend.note), Impl(f"{GROUP} separate draws", separate),
                Impl.floor(lambda x: read_once(x.logits))]

    return Case(
        name="sample",
        sizes=[Size({"N": 256, "V": V_QWEN}), Size({"N": 1024, "V": V_QWEN})],
        quick_sizes=[Size({"N": 256, "V": V_QWEN})],
        modes=("top_k+top_p", "plain", f"G={GROUP}"),
        make_inputs=make_inputs,
        implementations=impls,
        tolerances={},
        notes=(*backend.notes,
               "outputs are random draws and are not compared; see tests/test_sample.py",
               "floor: one read of the logits, `logits.view(int16).amax()`"),
        warnings=backend.notes,
        environment=backend.environment,
    )


def micro_group_report(P: int = 64, G: int = 16, m: int | None = None,
                       seed: int = 0) -> dict[str, float]:
    """Scheduling numbers on a lognormal length distribution (μ = 5.5, σ = 0.8 in log tokens,
    clamped to [1, 4096]; prompts of 50–300 tokens), via :func:`rlkern.sampling.simulate`:

    * ``peak_ratio`` — micro groups of ``m`` (default: the schedulers' default micro-group
      size, one micro group at a time) vs the full group of ``G``: peak resident KV tokens;
    * ``step_reduction`` — length-aware vs naive micro groups, same budget (two micro groups'
      worst case, ``2 · (300 + m · L_max)`` tokens; both admit by predicted length): 1 −
      decode steps ratio.
    """
    from rlkern.sampling import simulate
    from rlkern.sampling.scheduler import default_micro_group_size

    m = default_micro_group_size(G) if m is None else m
    g = torch.Generator().manual_seed(seed)
    L = torch.exp(torch.randn(P, G, generator=g) * 0.8 + 5.5).round().long().clamp(1, 4096)
    pl = torch.randint(50, 300, (P,), generator=g)
    full = simulate(L, pl, schedule="full_group", group_size=G)
    micro = simulate(L, pl, schedule="micro_group", group_size=G, micro_group_size=m)
    budget = 2 * (300 + m * int(L.max()))
    naive = simulate(L, pl, schedule="micro_group", group_size=G, micro_group_size=m,
                     kv_budget_tokens=budget)
    la = simulate(L, pl, schedule="length_aware", group_size=G, micro_group_size=m,
                  kv_budget_tokens=budget)
    return {
        "P": P, "G": G, "m": m, "kv_budget_tokens": budget,
        "full_peak_tokens": full.peak_tokens, "micro_peak_tokens": micro.peak_tokens,
        "peak_ratio": micro.peak_tokens / full.peak_tokens,
        "full_decode_steps": full.decode_steps, "micro_decode_steps": micro.decode_steps,
        "naive_decode_steps": naive.decode_steps, "length_aware_decode_steps": la.decode_steps,
        "naive_peak_tokens": naive.peak_tokens, "length_aware_peak_tokens": la.peak_tokens,
        "step_reduction": 1 - la.decode_steps / naive.decode_steps,
        "naive_utilisation": naive.utilisation, "length_aware_utilisation": la.utilisation,
        "naive_kv_utilisation": naive.kv_utilisation,
        "length_aware_kv_utilisation": la.kv_utilisation,
        "naive_preemptions": naive.preemptions, "length_aware_preemptions": la.preemptions,
    }


def kv_budget_report(P: int = 64, G: int = 16, prompt_len: int = 256, max_new: int = 4096,
                     seed: int = 0) -> dict[str, Any]:
    """Every schedule on the workload of issue 18, via :func:`rlkern.sampling.simulate`:
    ``P`` prompts of ``prompt_len`` tokens × ``G`` members, lognormal lengths (μ = 6, σ = 0.8
    in log tokens) capped at ``max_new``; first one unit at a time (no budget, default
    micro-group size), then all under a KV budget of half the full group's peak (admission by
    predicted length, recompute preemption).

    Returns ``{"kv_budget_tokens": B, "unbudgeted": {schedule: SimResult fields},
    "budgeted": {schedule: SimResult fields}, "peak_ratio": micro / full peak without a
    budget, "step_reduction": 1 − length-aware under B / micro groups without a budget}``.
    """
    from dataclasses import asdict

    from rlkern.sampling import SCHEDULES, simulate

    g = torch.Generator().manual_seed(seed)
    L = torch.exp(torch.randn(P, G, generator=g) * 0.8 + 6.0).round().long().clamp(1, max_new)
    pl = [prompt_len] * P
    free = {s: asdict(simulate(L, pl, schedule=s, group_size=G, max_new_tokens=max_new))
            for s in SCHEDULES}
    budget = free["full_group"]["peak_tokens"] // 2
    held = {s: asdict(simulate(L, pl, schedule=s, group_size=G, max_new_tokens=max_new,
                               kv_budget_tokens=budget)) for s in SCHEDULES}
    return {
        "P": P, "G": G, "kv_budget_tokens": budget, "unbudgeted": free, "budgeted": held,
        "peak_ratio": free["micro_group"]["peak_tokens"] / free["full_group"]["peak_tokens"],
        "step_reduction": 1 - (held["length_aware"]["decode_steps"]
                               / free["micro_group"]["decode_steps"]),
    }


# ---------------------------------------------------------------------------------------------
# micro_groups: a real generate_groups run on a tiny model

#: Schedules of the real run, rlkern's default (length-aware) first. micro_group and
#: length_aware share one KV budget (two micro groups' worst case); full_group decodes one
#: group at a time (its unit does not fit that budget).
SCHEDULE_IMPLS = ("length_aware", "micro_group", "full_group")
#: EOS ids of the tiny model: with 8 of 256 ids ending a completion, lengths are roughly
#: geometric (mean ≈ 32 tokens) and capped by max_new_tokens: a long-tailed spread.
TINY_EOS = (3, 17, 40, 64, 99, 128, 200, 251)
_RUN_STATS: dict[tuple[str, str], Any] = {}  # (size label, schedule) → SimResult of the run


class MicroInputs(NamedTuple):
    model: Any
    prompts: list[Tensor]
    G: int
    max_new: int
    label: str


TRANSFORMERS = Peer("transformers", lambda: importlib.import_module("transformers"),
                    hint="pip install transformers")


@cache
def tiny_llama(vocab: int = 256) -> Any:
    """A randomly initialised 2-layer ``LlamaForCausalLM`` (hidden 64, 4 heads, 2 KV heads)."""
    transformers = TRANSFORMERS.get()
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=128)
    return transformers.LlamaForCausalLM(cfg).eval()


def make_micro_inputs(size: Size, dtype: torch.dtype, device: torch.device) -> MicroInputs:
    del dtype, device  # the tiny model runs in fp32 on the CPU: it stands in for the schedule
    g = torch.Generator().manual_seed(size["P"] * 131 + size["G"])
    lengths = torch.randint(8, 33, (size["P"],), generator=g).tolist()
    prompts = [torch.randint(0, 256, (n,), generator=g) for n in lengths]
    return MicroInputs(tiny_llama(), prompts, size["G"], size["T"], size.label())


def _micro_budget_tokens(x: MicroInputs, m: int) -> int:
    return 2 * (max(int(p.numel()) for p in x.prompts) + m * x.max_new)


@register("micro_groups")
def micro_groups_case(options: CaseOptions) -> Case:
    import rlkern
    from rlkern.sampling import kv_bytes_per_token
    from rlkern.sampling.scheduler import default_micro_group_size

    def impls(mode: str) -> list[Impl]:
        del mode

        def run(schedule: str):
            def fn(x: MicroInputs):
                model = x.model
                m = default_micro_group_size(x.G)
                budget = None
                if schedule != "full_group":
                    per_tok = kv_bytes_per_token(model.config, torch.float32)
                    budget = _micro_budget_tokens(x, m) * per_tok
                r = rlkern.generate_groups(model, x.prompts, group_size=x.G,
                                           max_new_tokens=x.max_new, schedule=schedule,
                                           micro_group_size=m, kv_budget_bytes=budget, seed=0,
                                           eos_token_id=list(TINY_EOS))
                _RUN_STATS[(x.label, schedule)] = r.schedule
                return {"lengths": r.lengths.double(),
                        "tokens": torch.tensor([t for c in r.completions for t in c],
                                               dtype=torch.float64)}
            return fn

        return [Impl.rlkern(run(s), name=s) if s == "length_aware" else Impl(s, run(s))
                for s in SCHEDULE_IMPLS]

    def summary(results: list[Any], plot_dir: str | None) -> tuple[str, ...]:
        return micro_groups_summary(results, plot_dir)

    return Case(
        name="micro_groups",
        # Small: every member decodes with a batch-of-one forward, ~2 s per run on 2 cores.
        sizes=[Size({"P": 4, "G": 16, "T": 32})],
        quick_sizes=[Size({"P": 2, "G": 16, "T": 16})],
        modes=("generate",),
        make_inputs=make_micro_inputs,
        implementations=impls,
        # Every schedule must produce the same completions (the sampler's batch invariance).
        tolerances={"lengths": Tolerance(atol=0.5, gate=1e-12),
                    "tokens": Tolerance(atol=0.5, gate=1e-12)},
        notes=("real run: rlkern.generate_groups on a random 2-layer LlamaForCausalLM "
               "(hidden 64, fp32, CPU), G = 16, default micro-group size; micro_group and "
               "length_aware under one KV budget (2 micro groups' worst case), full_group one "
               "group at a time; completions must be identical",),
        summary=summary,
    )


def micro_groups_summary(results: list[Any], plot_dir: str | None) -> tuple[str, ...]:
    """Lines with the real run's scheduler figures and the lognormal simulation; the plot."""
    lines: list[str] = []
    real: dict[str, dict[str, float]] = {}
    for r in results:
        stats = _RUN_STATS.get((",".join(f"{k}={v}" for k, v in r.size.items()), r.impl))
        if stats is None or r.timing is None:
            continue
        real[r.impl] = {"wall_s": r.timing.median, "noisy": float(r.noisy),
                        "peak_tokens": stats.peak_tokens,
                        "decode_steps": stats.decode_steps, "utilisation": stats.utilisation}
        lines.append(f"real run {r.impl}: median {r.timing.median:.3f} s, peak KV "
                     f"{stats.peak_tokens} tokens, {stats.decode_steps} decode steps, "
                     f"utilisation {stats.utilisation:.2f}, {stats.preemptions} preemptions "
                     f"({stats.recomputed_tokens} tokens recomputed)")
    if {"micro_group", "full_group", "length_aware"} <= set(real):
        mg, fg, la = real["micro_group"], real["full_group"], real["length_aware"]
        lines.append(
            f"real run ratios: peak KV micro/full {mg['peak_tokens'] / fg['peak_tokens']:.3f}, "
            f"decode steps length-aware/micro {la['decode_steps'] / mg['decode_steps']:.3f}, "
            "wall time length-aware/micro " + (
                # A noisy median gives no ratio (the rule of rlkern.bench.runner).
                "noisy" if la["noisy"] or mg["noisy"]
                else f"{la['wall_s'] / mg['wall_s']:.3f}"))
    sim = micro_group_report()
    lines.append(
        f"simulation (lognormal μ=5.5 σ=0.8, P={sim['P']}, G={sim['G']}, m={sim['m']}): peak KV "
        f"micro/full {sim['micro_peak_tokens']}/{sim['full_peak_tokens']} = "
        f"{sim['peak_ratio']:.3f} (target ≤ 0.5); decode steps length-aware/naive micro, "
        f"budget {sim['kv_budget_tokens']} tokens: {sim['length_aware_decode_steps']}/"
        f"{sim['naive_decode_steps']}, {sim['step_reduction']:.1%} fewer (target ≥ 25%)")
    kv = kv_budget_report()
    lines.extend(kv_budget_lines(kv))
    if plot_dir is not None:
        lines.append(
            f"wrote {plot_micro_groups(Path(plot_dir) / 'micro_groups.png', real, sim, kv)}")
    return tuple(lines)


def kv_budget_lines(kv: dict[str, Any]) -> list[str]:
    """The summary lines of :func:`kv_budget_report`: one per schedule and budget setting."""
    head = "issue 18 simulation"
    lines = [f"{head}: P={kv['P']} prompts of 256 tokens × G={kv['G']}, lognormal lengths "
             f"μ=6 σ=0.8 capped at 4096; KV budget {kv['kv_budget_tokens']} tokens = half the "
             f"full-group peak"]
    for s, r in kv["unbudgeted"].items():
        lines.append(f"{head}, {s}, no budget: peak KV {r['peak_tokens']} tokens, "
                     f"{r['decode_steps']} decode steps")
    for s, r in kv["budgeted"].items():
        lines.append(
            f"{head}, {s}, budget: peak KV {r['peak_tokens']} tokens, {r['decode_steps']} "
            f"decode steps, {r['preemptions']} preemptions, {r['recomputed_tokens']} tokens "
            f"recomputed, KV utilisation {r['kv_utilisation']:.2f}")
    lines.append(f"{head}: peak KV micro/full (no budget) {kv['peak_ratio']:.3f} (target ≤ "
                 f"0.5); decode steps length-aware under the budget vs micro groups without "
                 f"one: {kv['step_reduction']:.1%} fewer (target ≥ 25%)")
    return lines


def plot_micro_groups(path: Path, real: dict[str, dict[str, float]],
                      sim: dict[str, float], kv: dict[str, Any] | None = None) -> Path:
    """Rows of bars: the real run per schedule (wall time, peak KV tokens, decode steps),
    the simulation (peak KV tokens, decode steps) and, given ``kv``
    (:func:`kv_budget_report`), the issue 18 workload per schedule under its KV budget
    (decode steps, peak KV tokens, preemptions)."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    colours = {"full_group": "tab:gray", "micro_group": "tab:blue", "length_aware": "tab:orange"}
    fig, axes = plt.subplots(3 if kv is not None else 2, 3,
                             figsize=(13, 10.5 if kv is not None else 7))
    order = [s for s in ("full_group", "micro_group", "length_aware") if s in real]
    for ax, key, title in zip(axes[0], ("wall_s", "peak_tokens", "decode_steps"),
                              ("wall time (s, median)", "peak KV tokens", "decode steps"),
                              strict=True):
        vals = [real[s][key] for s in order]
        ax.bar(order, vals, color=[colours[s] for s in order])
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.3g}", ha="center", va="bottom", fontsize=8)
        ax.set_title(f"real run: {title}", fontsize=9)
    m = sim["m"]
    panels = (
        ("peak KV tokens, one unit at a time",
         {"full_group": sim["full_peak_tokens"], f"micro_group m={m}": sim["micro_peak_tokens"]}),
        ("decode steps, same KV budget",
         {f"micro_group m={m}": sim["naive_decode_steps"],
          "length_aware": sim["length_aware_decode_steps"]}),
        ("KV utilisation (mean KV / budget), same budget",
         {f"micro_group m={m}": sim["naive_kv_utilisation"],
          "length_aware": sim["length_aware_kv_utilisation"]}),
    )
    for ax, (title, vals) in zip(axes[1], panels, strict=True):
        names = list(vals)
        ax.bar(names, list(vals.values()),
               color=[colours[n.split(" ")[0]] for n in names])
        for i, v in enumerate(vals.values()):
            ax.text(i, v, f"{v:.3g}", ha="center", va="bottom", fontsize=8)
        ax.set_title(f"simulation: {title}", fontsize=9)
    if kv is not None:
        held = kv["budgeted"]
        for ax, key, title in zip(axes[2], ("decode_steps", "peak_tokens", "preemptions"),
                                  ("decode steps", "peak KV tokens", "preemptions"),
                                  strict=True):
            names = list(held)
            vals = [held[s][key] for s in names]
            ax.bar(names, vals, color=[colours[s] for s in names])
            for i, v in enumerate(vals):
                ax.text(i, v, f"{v:.3g}", ha="center", va="bottom", fontsize=8)
            ax.set_title(f"issue 18 workload, budget {kv['kv_budget_tokens']} tokens: {title}",
                         fontsize=9)
    for ax in axes.flat:
        ax.tick_params(labelsize=8)
    fig.suptitle("micro-group generation, G = 16 — top: generate_groups on a tiny random Llama "
                 "(same completions under every schedule);\n"
                 f"{'middle' if kv is not None else 'bottom'}: simulation, lognormal "
                 f"lengths, P = {sim['P']}, m = {m}, KV budget {sim['kv_budget_tokens']} tokens"
                 + ("; bottom: the issue 18 workload under its KV budget" if kv is not None
                    else ""), fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
