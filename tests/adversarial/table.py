"""The reliability table of docs/reliability.md, generated from the adversarial suite.

Each row is one named edge input of one op: the op's builder from :mod:`cases` is driven by a
scripted draw (every choice fixed: the first option, or the largest size, unless the edge
overrides it) and the call runs on every backend. A cell says what the backend gave: ``ok``
(finite outputs and gradients), ``NaN`` / ``inf`` (where the outputs hold them), or the type
of the error raised. ``python -m adversarial.table`` (from ``tests/``) rewrites the doc;
``test_reliability_table.py`` fails when the doc and the code disagree.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch

# As tests/conftest.py: without a GPU the Triton kernels run in the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import strategies as st

from adversarial.cases import BUILDERS
from adversarial.harness import BACKENDS, Outcome, judge, run

DOC = Path(__file__).resolve().parents[2] / "docs" / "reliability.md"
SIZE_LABELS = {"N", "S", "V", "H", "G", "R", "B", "T"}

#: The input each op's edges act on (the label of its `_float` draw).
PRIMARY = {
    "token_logprobs": "logits", "linear_logprobs": "hidden", "linear_logprobs_with_grad":
    "hidden", "linear_grpo_loss": "old", "policy_loss": "logprobs", "kl_penalty": "logprobs",
    "group_advantages": "scores", "group_stats": "scores", "discounted_returns": "rewards",
    "gae": "rewards",
    "position_baseline": "returns", "gtpo_weights": "entropy", "gigpo_advantages": "step",
    "empg_modulate": "adv", "sample": "logits", "optimal_token_baseline": "rewards",
}

#: Named edges: label overrides, with "{p}" standing for the op's primary input.
EDGES: dict[str, dict[str, Any]] = {
    "finite values": {},
    "NaN entries": {"{p}.kind": "with_nan"},
    "±inf entries": {"{p}.kind": "with_inf"},
    "−inf entries": {"{p}.kind": "with_neg_inf"},
    "huge finite (×1e10)": {"{p}.kind": "huge"},
    "tiny (×1e-30)": {"{p}.kind": "tiny"},
    "constant rows": {"{p}.kind": "constant"},
    "constant −1e10": {"{p}.kind": "big_constant"},
    "one logit 1e10": {"{p}.kind": "one_huge"},
    "dtype's most negative": {"{p}.kind": "finfo_min"},
    "stride-0 rows": {"{p}.layout": "expanded"},
    "transposed storage": {"{p}.layout": "transposed"},
    "empty batch": {"N": 0, "B": 0, "S": 0, "R": 0},
    "temperature 1e-10": {"temperature": 1e-10},
    "temperature 1e300": {"temperature": 1e300},
    "bf16 input": {"dtype": torch.bfloat16},
    "eps = 0": {"eps": 0.0},
    "num_tokens = tensor(0)": {"num_tokens": "zero"},
    "num_tokens = tensor(-3)": {"num_tokens": "negative"},
    "num_tokens = tensor(0), checks off": {"num_tokens": "zero", "checks_off": 0},
    # Every input the builders may move to meta (`_maybe_meta` draws 0, `_rare_meta` 17).
    "an input on meta": {**dict.fromkeys(("old.meta", "grad_lp.meta", "labels.meta",
                                          "seeds.meta"), 0),
                         **dict.fromkeys(("group_ids.meta", "mask.meta", "lengths.meta",
                                          "reset.meta", "keys.meta", "H_next.meta"), 17)},
    "inplace_backward": {"inplace_backward": True},
    "−inf in bias": {"has_bias": True, "bias.kind": "with_neg_inf"},
}


class Scripted:
    """A stand-in for hypothesis' ``data`` that answers every draw from a script."""

    def __init__(self, overrides: dict[str, Any]):
        self.overrides = overrides
        self.used: set[str] = set()

    def draw(self, strategy: st.SearchStrategy, label: str = "") -> Any:
        if label in self.overrides:
            self.used.add(label)
            return self.overrides[label]
        inner = getattr(strategy, "wrapped_strategy", strategy)
        if hasattr(inner, "elements"):
            options = list(inner.elements)
            return options[-1] if label in SIZE_LABELS else options[0]
        if hasattr(inner, "start"):
            return min(inner.end, inner.start + 3) if label in SIZE_LABELS else \
                min(inner.end, inner.start + 2)
        return False  # booleans: the option off


def _cell(outcome: Outcome | None) -> str:
    if outcome is None:
        return "n/a"
    if outcome.error is not None:
        return type(outcome.error).__name__
    nan = any(t.is_floating_point() and bool(torch.isnan(t).any()) for t in outcome.values)
    inf = any(t.is_floating_point() and bool(torch.isinf(t).any()) for t in outcome.values)
    return "NaN" if nan else "inf" if inf else "ok"


def rows() -> list[tuple[str, str, list[str], str]]:
    """(op, edge, one cell per backend, verdict) for every edge that applies to an op."""
    out = []
    for op, build in sorted(BUILDERS.items()):
        primary = PRIMARY[op]
        for edge, script in EDGES.items():
            overrides = {k.replace("{p}", primary): v for k, v in script.items()}
            data = Scripted(overrides)
            try:
                call = build(data)
            except (ValueError, KeyError, IndexError):
                continue  # the edge cannot be drawn for this op
            if script and not data.used - {"checks_off"}:
                continue  # the op has no such input or option (checks_off only qualifies)
            outcomes = run(call)
            cells = [_cell(outcomes.get(b)) for b in BACKENDS]
            problems = judge(call, outcomes)
            out.append((op, edge, cells, _verdict(problems)))
    return out


def _verdict(problems: list[str]) -> str:
    """The rules broken, by name only (the numbers of a disagreement vary with the CPU)."""
    rules = {
        "disagree on raising": "backends disagree on raising",
        "requires grad": "outputs require grad",
        "not finite": "non-finite output for finite input",
        "uninitialised": "reads uninitialised memory",
        "differ": "backends' values differ",
        "in different places": "NaN / inf placed differently",
        " outputs vs ": "different numbers of outputs",
    }
    broken = sorted({name for p in problems for key, name in rules.items() if key in p})
    return "✓" if not problems else "✗ " + "; ".join(broken or ["other"])


def render() -> str:
    lines = [
        "# Reliability: what every op gives on edge inputs",
        "",
        "Generated by `tests/adversarial/table.py` from the adversarial suite "
        "(`tests/adversarial/`); do not edit by hand — run `cd tests && python -m "
        "adversarial.table`. Each row runs one op on one edge input on every backend "
        "(`triton` in the interpreter). A cell is `ok` (finite outputs and gradients), `NaN` or "
        "`inf` (present in the outputs, as documented for that input), or the error raised. "
        "The last column is the suite's verdict: backends agree (or raise the same error), "
        "finite inputs give finite results, nothing reads uninitialised memory.",
        "",
    ]
    current = None
    for op, edge, cells, verdict in rows():
        if op != current:
            lines += ["", f"## `{op}`", "", "| input | " + " | ".join(BACKENDS) + " | verdict |",
                      "|---|" + "---|" * (len(BACKENDS) + 1)]
            current = op
        lines.append(f"| {edge} | " + " | ".join(cells) + f" | {verdict} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    text = render()
    if "--check" in sys.argv:
        sys.exit(0 if DOC.exists() and DOC.read_text() == text else 1)
    DOC.write_text(text)
    print(f"wrote {DOC}")
