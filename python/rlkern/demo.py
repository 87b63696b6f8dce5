"""A complete GRPO loop on CPU with rlkern: ``rlkern demo`` and ``examples/grpo_toy.py``.

A tiny randomly initialised ``LlamaForCausalLM`` learns a verifiable digit task (by default:
write the prompt's two digits, each in 0-4, in reverse order, then an end token) from reward
alone — no supervised warm-up. Each step:

1. **sample** ``G`` completions per prompt with :func:`rlkern.generate_groups` (micro-group
   decoding with a KV cache; it returns each sampled token's logprob);
2. **score** them with :func:`toy_reward` and turn the scores into GRPO advantages with
   :func:`rlkern.group_advantages`;
3. **update** the policy with the fused loss :func:`rlkern.linear_grpo_loss` on the final
   hidden states and the LM head (or, with ``loss="two-op"``, :func:`rlkern.linear_logprobs`
   followed by :func:`rlkern.policy_loss`), using the sampler's logprobs as the old logprobs.

See ``docs/demo.md`` for the task, the measured run and how to run it.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import torch
from torch import Tensor

import rlkern

__all__ = [
    "EOS",
    "SEP",
    "TASKS",
    "VOCAB_SIZE",
    "DemoConfig",
    "DemoResult",
    "add_arguments",
    "build_model",
    "config_from_args",
    "importance_ratios",
    "main",
    "make_prompts",
    "plot_ratios",
    "plot_rewards",
    "ratio_table",
    "run",
    "toy_reward",
    "toy_target",
]

# Vocabulary: the digits 0-9 are their own token ids; no tokenizer is needed.
SEP = 10  #: ends the prompt: "now answer"
EOS = 11  #: ends the answer
VOCAB_SIZE = 12

#: The answer's digits for each task, as a function of the prompt's digits.
TASKS: dict[str, Callable[[list[int]], list[int]]] = {
    "copy": lambda d: list(d),
    "reverse": lambda d: list(reversed(d)),
    "sort": lambda d: sorted(d),
}

_LOSSES = ("auto", "fused", "two-op")


def toy_target(digits: Sequence[int], task: str = "reverse") -> list[int]:
    """The correct completion for a prompt's digits: the task's answer followed by ``EOS``."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {sorted(TASKS)}")
    return [*TASKS[task]([int(x) for x in digits]), EOS]


def toy_reward(digits: Sequence[int], completion: Sequence[int], task: str = "reverse") -> float:
    """Fraction of the target's positions (answer digits and the final ``EOS``) that the
    completion gets right, position by position, in ``[0, 1]``.

    Partial credit makes the reward dense enough for a random policy to score a little (about
    1/12 per position) and for the group to contain better and worse answers from the first
    step; a completion that stops early simply misses the positions it never wrote.
    """
    target = toy_target(digits, task)
    hits = sum(int(c) == t for c, t in zip(completion, target, strict=False))
    return hits / len(target)


@dataclass
class DemoConfig:
    """Settings of the demo loop (the defaults are the measured run of ``docs/demo.md``)."""

    steps: int = 100
    prompts_per_step: int = 8
    group_size: int = 8
    digits: int = 2
    base: int = 5
    task: str = "reverse"
    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    lr: float = 3e-3
    inner_steps: int = 2
    max_grad_norm: float = 1.0
    temperature: float = 1.0
    top_p: float | None = None
    schedule: str = "length_aware"
    loss: str = "auto"
    seed: int = 0
    threads: int = 1
    out: str | None = "grpo_toy_reward.png"
    #: With ``top_p``: where to write the importance-ratio figure (:func:`plot_ratios`).
    ratio_out: str | None = None
    quiet: bool = False


@dataclass
class DemoResult:
    """What :func:`run` measured: one entry per step, plus the resolved loss path."""

    config: DemoConfig
    loss_path: str
    rewards: list[float] = field(default_factory=list)
    exact: list[float] = field(default_factory=list)
    lengths: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    #: With a filter (``top_p``): per step, the mean over completion tokens of the importance
    #: ratio exp(trainer log-prob − the sampler's processed log-prob) at the rollout policy,
    #: for trainer log-probs over the full vocabulary and under the sampler's truncation.
    ratio_full: list[float] = field(default_factory=list)
    ratio_truncated: list[float] = field(default_factory=list)
    #: With a filter: per step, the mean over completion tokens of the sampler's kept mass
    #: Σ_K p / Σ_V p of the token's row, exp(raw log-prob − processed log-prob) as sampled.
    kept_mass: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    png: str | None = None
    ratio_png: str | None = None


def build_model(cfg: DemoConfig):
    """A small randomly initialised ``LlamaForCausalLM`` over the 12-token vocabulary.

    Built from a ``LlamaConfig``, so nothing is downloaded; the LM head is untied so that
    ``model.lm_head.weight`` is the ``(V, H)`` matrix handed to the fused loss.
    """
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as e:  # pragma: no cover - transformers is in the test/bench extras
        raise ImportError("the demo needs transformers: pip install transformers") from e
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=cfg.hidden_size,
        intermediate_size=2 * cfg.hidden_size,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        max_position_embeddings=4 * (cfg.digits + 2),
        tie_word_embeddings=False,
        use_cache=True,  # generate_groups decodes with the KV cache
        bos_token_id=None,
        eos_token_id=EOS,
        pad_token_id=None,
    )
    return LlamaForCausalLM(config)


def make_prompts(n: int, digits: int, gen: torch.Generator, base: int = 10) -> list[Tensor]:
    """``n`` prompts of ``digits`` random digits in ``[0, base)`` followed by ``SEP``."""
    if not 1 <= base <= 10:
        raise ValueError(f"base must be in [1, 10], got {base}")
    sep = torch.tensor([SEP])
    return [torch.cat([torch.randint(0, base, (digits,), generator=gen), sep])
            for _ in range(n)]


def _score_member(digits: list[list[int]], task: str, p: int, completion: list[int]) -> float:
    """``generate_groups``' ``reward_fn``: the reward of a completion of prompt ``p``."""
    return toy_reward(digits[p], completion, task)


def _pad(rows: Sequence[Sequence[float] | Tensor], width: int, value: float,
         dtype: torch.dtype) -> Tensor:
    out = torch.full((len(rows), width), value, dtype=dtype)
    for i, r in enumerate(rows):
        if len(r):
            out[i, : len(r)] = torch.as_tensor(r, dtype=dtype)
    return out


def _resolve_loss(loss: str) -> str:
    if loss not in _LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose from {_LOSSES}")
    fused_available = hasattr(rlkern, "linear_grpo_loss")
    if loss == "fused" and not fused_available:
        raise ValueError("loss='fused' needs rlkern.linear_grpo_loss, which this install lacks; "
                         "use loss='two-op'")
    if loss == "auto":
        return "fused" if fused_available else "two-op"
    return loss


def _policy_loss(path: str, hidden: Tensor, weight: Tensor, labels: Tensor, mask: Tensor,
                 advantages: Tensor, old_logprobs: Tensor, config, temperature: float) -> Tensor:
    """The GRPO loss on the completion positions' hidden states ``(B, T, H)``; logprobs are
    taken at the sampling temperature, as the sampler's old logprobs were."""
    if path == "fused":
        # One chunked pass: logits tile → logprob → per-token loss derivative → ∂h, ∂W; the
        # (B·T, V) logits are never held.
        return rlkern.linear_grpo_loss(hidden, weight, labels, mask, advantages,
                                       old_logprobs=old_logprobs, config=config,
                                       temperature=temperature).loss
    # Two ops: the fused linear logprobs (no logits either), then the clipped surrogate.
    B, T, H = hidden.shape
    logprobs = rlkern.linear_logprobs(hidden.reshape(B * T, H), weight, labels.reshape(-1),
                                      temperature=temperature).logprobs.view(B, T)
    return rlkern.policy_loss(logprobs, old_logprobs, advantages, mask, config=config).loss


def importance_ratios(hidden: Tensor, weight: Tensor, labels: Tensor, mask: Tensor,
                      processed: Tensor, temperature: float, top_p: float) -> tuple[float, float]:
    """Mean importance ratio ``exp(trainer − sampler)`` over the masked tokens, for trainer
    log-probs over the full vocabulary and under the sampler's top-p truncation
    (``rlkern.token_logprobs(..., top_p=...)``), against the sampler's processed log-probs.

    Without truncated support the ratio of a kept token is its kept mass (< 1): the trainer's
    probability is not renormalised over the kept set. With it the ratio is 1 up to the
    difference between the rollout's and the trainer's logits (incremental decode vs one
    forward over the sequence)."""
    with torch.no_grad():
        logits = hidden.detach() @ weight.detach().T  # (B, T, V): a 12-token vocabulary
        full = rlkern.token_logprobs(logits, labels, temperature=temperature).logprobs
        trunc = rlkern.token_logprobs(logits, labels, temperature=temperature,
                                      top_p=top_p).logprobs
        m = mask > 0
        return (float((full - processed).exp()[m].mean()),
                float((trunc - processed).exp()[m].mean()))


def run(cfg: DemoConfig, log: Callable[[str], None] = print) -> DemoResult:
    """Train for ``cfg.steps`` GRPO steps; return the per-step rewards, losses and timings,
    and write the reward curve to ``cfg.out`` (unless it is ``None``)."""
    if cfg.task not in TASKS:
        raise ValueError(f"unknown task {cfg.task!r}; choose from {sorted(TASKS)}")
    if cfg.ratio_out and cfg.top_p is None:
        raise ValueError("ratio_out (--ratio-out) plots the importance ratios that only a run "
                         "with top_p (--top-p) measures")
    path = _resolve_loss(cfg.loss)
    threads = torch.get_num_threads()
    if cfg.threads > 0:
        # Batch-of-one decode forwards of a 64-wide model are tiny matmuls: on a small shared
        # machine the intra-op thread handoff costs far more than it saves (20x measured).
        torch.set_num_threads(cfg.threads)
    try:
        return _train(cfg, path, log)
    finally:
        torch.set_num_threads(threads)  # leave the caller's process as it was


def _train(cfg: DemoConfig, path: str, log: Callable[[str], None]) -> DemoResult:
    torch.manual_seed(cfg.seed)
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    # TRL's default loss (dapo: PPO clip 0.2, token-mean, no KL).
    loss_config = rlkern.PolicyLossConfig.trl(loss_type="dapo")
    gen = torch.Generator().manual_seed(cfg.seed)
    P, G, n = cfg.prompts_per_step, cfg.group_size, cfg.digits
    result = DemoResult(config=cfg, loss_path=path)
    if not cfg.quiet:
        n_params = sum(p.numel() for p in model.parameters())
        log(f"rlkern demo: task={cfg.task} digits={n} base={cfg.base} | Llama {cfg.layers}x"
            f"{cfg.hidden_size} ({n_params / 1e3:.0f}k params) | {P} prompts x G={G} | "
            f"loss={path} | schedule={cfg.schedule}")
    t_start = time.perf_counter()
    for step in range(1, cfg.steps + 1):
        t0 = time.perf_counter()
        prompts = make_prompts(P, n, gen, cfg.base)
        digits = [p[:n].tolist() for p in prompts]

        # 1. Sample G completions per prompt; each member stops at EOS or after n + 1 tokens.
        model.eval()
        roll = rlkern.generate_groups(
            model, prompts, group_size=G, max_new_tokens=n + 1, schedule=cfg.schedule,
            temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed * 1_000_003 + step,
            eos_token_id=EOS,
            # Also feeds the streaming per-group statistics (roll.stats), group by group.
            reward_fn=partial(_score_member, digits, cfg.task),
        )
        rows = range(P * G)  # group-major: row p·G + j is member j of prompt p
        scores = torch.tensor([toy_reward(digits[i // G], roll.completions[i], cfg.task)
                               for i in rows])

        # 2. GRPO advantages: (s − mean_g) / (std_g + eps) within each prompt's group.
        adv = rlkern.group_advantages(scores, group_size=G, estimator="grpo").advantages

        # 3. Policy update on [prompt, completion] sequences, right-padded. Padding sits after
        # every real token, so causal attention needs no mask and positions are unchanged; the
        # loss mask drops the padded positions.
        T = n + 1
        completions = _pad(roll.completions, T, EOS, torch.int64)
        mask = _pad([[1.0] * len(c) for c in roll.completions], T, 0.0, torch.float32)
        # The sampler's log_softmax(x/T) of each token serves as the old logprobs: the same
        # float32 model computed them (Llama has no dropout, so train() changes nothing).
        old = _pad(roll.logprobs, T, 0.0, torch.float32)
        input_ids = torch.cat([torch.stack(prompts).repeat_interleave(G, 0), completions], 1)
        model.train()
        step_loss = 0.0
        for inner in range(cfg.inner_steps):
            hidden = model.model(input_ids=input_ids).last_hidden_state  # (B, n+1+T, H)
            if inner == 0 and cfg.top_p is not None:  # still the rollout's policy
                processed = _pad(roll.processed_logprobs, T, 0.0, torch.float32)
                full, trunc = importance_ratios(hidden[:, n : n + T], model.lm_head.weight,
                                                completions, mask, processed, cfg.temperature,
                                                cfg.top_p)
                result.ratio_full.append(full)
                result.ratio_truncated.append(trunc)
                raw = _pad(roll.logprobs, T, 0.0, torch.float32)
                result.kept_mass.append(float((raw - processed).exp()[mask > 0].mean()))
            # The state at position n + k (SEP for k = 0) predicts completion token k.
            loss = _policy_loss(path, hidden[:, n : n + T], model.lm_head.weight, completions,
                                mask, adv, old, loss_config, cfg.temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            # TRL's default max_grad_norm=1. Without it, an early run of this loop (3 digits,
            # lr 3e-3) climbed to a reward of 0.3 and then collapsed to 0 for good.
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            opt.step()
            step_loss += float(loss.detach()) / cfg.inner_steps

        dt = time.perf_counter() - t0
        reward = float(scores.mean())
        exact = float((scores == 1.0).float().mean())
        result.rewards.append(reward)
        result.exact.append(exact)
        result.lengths.append(float(roll.lengths.float().mean()))
        result.losses.append(step_loss)
        result.seconds.append(dt)
        if not cfg.quiet:
            ratios = (f"  ratio full {result.ratio_full[-1]:.4f} truncated "
                      f"{result.ratio_truncated[-1]:.4f}" if cfg.top_p is not None else "")
            log(f"step {step:4d}  reward {reward:.3f}  exact {exact:.3f}  "
                f"len {result.lengths[-1]:.2f}  loss {step_loss:+.4f}  {dt:.2f}s{ratios}")
    result.wall_s = time.perf_counter() - t_start
    if cfg.out:
        result.png = str(plot_rewards(result, cfg.out))
    if cfg.ratio_out:
        result.ratio_png = str(plot_ratios(result, cfg.ratio_out))
    if not cfg.quiet:
        k = max(1, min(10, len(result.rewards) // 5))
        first = sum(result.rewards[:k]) / k
        last = sum(result.rewards[-k:]) / k
        log(f"done: {cfg.steps} steps in {result.wall_s:.1f}s; mean reward of the first {k} "
            f"steps {first:.3f} -> last {k} steps {last:.3f}"
            + (f"; curve: {result.png}" if result.png else ""))
        if cfg.top_p is not None and result.ratio_full:
            log("mean importance ratio per step (the table of docs/sampling.md):")
            log(ratio_table(result))
            if result.ratio_png:
                log(f"importance-ratio figure: {result.ratio_png}")
    return result


def _pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend, imported only when a figure is
    written (matplotlib is an optional dependency: rlkern's ``test`` and ``bench`` extras)."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("writing the demo's figures needs matplotlib: pip install matplotlib "
                          "(in rlkern's test and bench extras)") from e
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    return plt


def plot_rewards(result: DemoResult, out: str | Path) -> Path:
    """Write the per-step mean reward (and exact-answer rate) as a PNG; returns its path."""
    plt = _pyplot()
    cfg = result.config
    steps = list(range(1, len(result.rewards) + 1))
    k = max(1, min(10, len(steps) // 5))

    def smooth(xs: list[float]) -> list[float]:
        return [sum(xs[max(0, i - k + 1): i + 1]) / (i + 1 - max(0, i - k + 1))
                for i in range(len(xs))]

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(steps, result.rewards, color="tab:blue", alpha=0.3, lw=1, label="mean reward")
    ax.plot(steps, smooth(result.rewards), color="tab:blue", lw=2,
            label=f"mean reward ({k}-step moving average)")
    ax.plot(steps, smooth(result.exact), color="tab:green", lw=1.5, ls="--",
            label=f"exact answers ({k}-step moving average)")
    ax.set_ylabel("reward")
    ax.set_ylim(0, 1.02)
    ax.legend(loc="upper left", fontsize=8)
    return _save_figure(plt, fig, ax, out,
                        f"rlkern demo: {cfg.task} {cfg.digits} digits (0-{cfg.base - 1}), Llama "
                        f"{cfg.layers}x{cfg.hidden_size}, {cfg.prompts_per_step}x"
                        f"{cfg.group_size} samples/step, {result.wall_s:.0f}s on CPU")


def _save_figure(plt, fig, ax, out: str | Path, title: str) -> Path:
    """The demo figures' common ending: steps on x, a grid, the title; written to ``out``
    (its folder created) and closed."""
    ax.set_xlabel("GRPO step")
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def _ratio_steps(n: int) -> list[int]:
    """The steps a ratio table shows: 1, then every tenth of the run (1, 10, 20, ..., 100)."""
    every = max(1, n // 10)
    return sorted({1, *range(every, n + 1, every)})


def ratio_table(result: DemoResult) -> str:
    """The per-step mean importance ratios of a ``top_p`` run as a Markdown table: steps 1,
    then every tenth of the run, and the mean over all steps; rows for the full-vocabulary
    log-probs, the truncated ones and the sampler's kept mass."""
    if not result.ratio_full:
        raise ValueError("no importance ratios: the run had no top_p")
    steps = _ratio_steps(len(result.ratio_full))
    rows = (("full-vocabulary log-probs", result.ratio_full, 3),
            (f"`token_logprobs(top_p={result.config.top_p:g})`", result.ratio_truncated, 4),
            ("kept mass (sampler)", result.kept_mass, 3))
    lines = ["| step | " + " | ".join(map(str, steps)) + f" | mean of {len(result.ratio_full)} |",
             "|---" * (len(steps) + 2) + "|"]
    for name, xs, digits in rows:
        cells = [f"{xs[s - 1]:.{digits}f}" for s in steps] + [f"{sum(xs) / len(xs):.{digits}f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_ratios(result: DemoResult, out: str | Path, date: str | None = None) -> Path:
    """Write the per-step mean importance ratio ``exp(trainer − sampler)`` of a ``top_p`` run
    as a PNG (returns its path): the trainer's log-probs over the full vocabulary and under the
    sampler's truncation, the sampler's mean kept mass, and the line at 1. ``date`` (default:
    today, UTC) goes into the title with V, top-p and the temperature."""
    if not result.ratio_full:
        raise ValueError("no importance ratios to plot: the run had no top_p (--top-p)")
    plt = _pyplot()
    cfg = result.config
    date = date or datetime.now(timezone.utc).date().isoformat()
    steps = list(range(1, len(result.ratio_full) + 1))
    fig, ax = plt.subplots(figsize=(7, 4.6), dpi=110)
    ax.axhline(1.0, color="black", lw=0.8, ls=":", label="ratio 1 (unbiased)")
    # Drawn wide under the full-vocabulary curve, which it matches token for token.
    ax.plot(steps, result.kept_mass, color="tab:gray", lw=6, alpha=0.3,
            label="kept mass of the sampled rows (sampler)")
    ax.plot(steps, result.ratio_full, color="tab:red", lw=1.5, marker=".", ms=3,
            label="trainer log-probs over the full vocabulary")
    ax.plot(steps, result.ratio_truncated, color="tab:blue", lw=1.5, marker=".", ms=3,
            label=f"trainer log-probs with truncated support (top_p={cfg.top_p:g})")
    ax.set_ylabel("mean importance ratio exp(trainer − sampler)")
    lo = min(min(result.ratio_full), min(result.kept_mass), 1.0)
    ax.set_ylim(lo - 0.25 * (1.02 - lo), 1.02 + 0.05 * (1.02 - lo))
    # Below the axes: the curves of a run may cross any spot inside them.
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=8)
    return _save_figure(plt, fig, ax, out,
                        f"rlkern demo, rollout vs trainer log-probs: V={VOCAB_SIZE}, top-p "
                        f"{cfg.top_p:g}, T={cfg.temperature:g}, {cfg.prompts_per_step}x"
                        f"{cfg.group_size} samples/step, run {date}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's command-line options (shared by ``rlkern demo`` and the example script)."""
    d = DemoConfig()
    a = parser.add_argument
    a("--steps", type=int, default=d.steps, help="GRPO steps (default: %(default)s)")
    a("--prompts", type=int, default=d.prompts_per_step, dest="prompts_per_step",
      help="prompts per step (default: %(default)s)")
    a("--group-size", "-G", type=int, default=d.group_size, dest="group_size",
      help="completions per prompt (default: %(default)s)")
    a("--digits", type=int, default=d.digits, help="prompt length (default: %(default)s)")
    a("--base", type=int, default=d.base,
      help="prompt digits are drawn from 0 .. base-1 (default: %(default)s)")
    a("--task", choices=sorted(TASKS), default=d.task, help="default: %(default)s")
    a("--hidden-size", type=int, default=d.hidden_size, dest="hidden_size")
    a("--layers", type=int, default=d.layers)
    a("--heads", type=int, default=d.heads)
    a("--lr", type=float, default=d.lr, help="AdamW learning rate (default: %(default)s)")
    a("--inner-steps", type=int, default=d.inner_steps, dest="inner_steps",
      help="optimizer steps per batch of samples, TRL's num_iterations (default: %(default)s)")
    a("--temperature", type=float, default=d.temperature)
    a("--top-p", type=float, default=d.top_p, dest="top_p",
      help="sample with top-p and log the mean importance ratio of the trainer's log-probs "
           "(full vocabulary, and under the same truncation) to the sampler's processed ones")
    a("--schedule", choices=("length_aware", "micro_group", "full_group"), default=d.schedule,
      help="generate_groups schedule (default: %(default)s)")
    a("--loss", choices=_LOSSES, default=d.loss,
      help="fused: rlkern.linear_grpo_loss; two-op: linear_logprobs + policy_loss; "
           "auto: fused when available (default: %(default)s)")
    a("--seed", type=int, default=d.seed)
    a("--threads", type=int, default=d.threads,
      help="torch threads; 0 leaves torch's default (default: %(default)s)")
    a("--out", default=d.out, help="reward-curve PNG (default: %(default)s); '' for none")
    a("--ratio-out", default=d.ratio_out, dest="ratio_out",
      help="with --top-p: write the per-step importance-ratio figure to this PNG")
    a("--quiet", action="store_true", help="no per-step lines")
    parser.set_defaults(func=main)


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    """A :class:`DemoConfig` from parsed :func:`add_arguments` options."""
    names = asdict(DemoConfig()).keys()
    kw = {k: getattr(args, k) for k in names if hasattr(args, k)}
    kw["out"] = kw.get("out") or None
    kw["ratio_out"] = kw.get("ratio_out") or None
    return DemoConfig(**kw)


def main(args: argparse.Namespace) -> int:
    """Entry point of ``rlkern demo``."""
    result = run(config_from_args(args))
    return 0 if all(math.isfinite(x) for x in result.losses) else 1
