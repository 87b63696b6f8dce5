"""The registered ops behind policy_loss / kl_penalty: opcheck, torch.compile(fullgraph=True),
fake tensors, and the one-spec rule (the Python argument spec = the C++ header's structs)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import rlkern
from policy_loss_cases import CASES, call_kwargs, make_inputs
from rlkern.ops import policy_loss as P

ROOT = Path(__file__).resolve().parents[1]
OPS_BACKENDS = ["cpu", "torch"]


def _op_args(name: str, dtype=torch.float32, B=6, T=7):
    case = CASES[name]
    inp = make_inputs(B, T, dtype, seed=3)
    args, kw = call_kwargs(case, inp)
    p = P._prepare(*args, case.config, kw.get("ref_logprobs"), kw.get("rollout_logprobs"),
                   kw.get("entropy"), kw.get("token_weights"), None, "cpu", {})
    return p


@pytest.mark.parametrize("backend", OPS_BACKENDS)
@pytest.mark.parametrize("name", ["ppo-clip-higher-dual", "all-addons", "trl-preset", "gmpo",
                                  "gvpo"])
def test_opcheck_fwd_bwd(name, backend):
    p = _op_args(name)
    lp = p.lp.clone().requires_grad_()
    ent = None if p.ent is None else p.ent.clone().requires_grad_()
    fwd_args = (lp, p.old, p.adv, p.mask, p.ref, p.rollout, ent, p.tw, p.thr, p.flags,
                p.hparams, backend)
    torch.library.opcheck(torch.ops.rlkern.policy_loss_fwd.default, fwd_args)
    row_sums, row_stats = torch.ops.rlkern.policy_loss_fwd(*fwd_args)
    grad_rows = torch.randn_like(row_sums)
    torch.library.opcheck(
        torch.ops.rlkern.policy_loss_bwd.default,
        (p.lp, p.old, p.adv, p.mask, p.ref, p.rollout, p.ent, p.tw, p.thr, row_stats.detach(),
         grad_rows, p.flags, p.hparams, p.ent is not None, backend))


def test_opcheck_compiled_out_ops():
    p = _op_args("all-addons")
    B = p.mask.shape[0]
    row_stats = torch.empty(20, B, dtype=torch.float64)
    common = (p.lp, p.old, p.adv, p.mask, p.ref, p.rollout, p.ent, p.tw, p.thr)
    torch.library.opcheck(torch.ops.rlkern.policy_loss_fwd_out.default,
                          (*common, p.flags, p.hparams, row_stats))
    torch.library.opcheck(torch.ops.rlkern.policy_loss_bwd_out.default,
                          (*common, row_stats, torch.randn(4, B, dtype=torch.float64), p.flags,
                           p.hparams, torch.empty_like(p.lp), torch.empty_like(p.ent)))
    lp, ref = p.lp.nan_to_num(), p.ref.nan_to_num()
    torch.library.opcheck(torch.ops.rlkern.kl_penalty_fwd_out.default,
                          (lp, ref, 3, False, 20.0, 10.0, torch.empty_like(lp)))
    torch.library.opcheck(torch.ops.rlkern.kl_penalty_bwd_out.default,
                          (lp, ref, torch.randn_like(lp), 3, True, 20.0, 10.0,
                           torch.empty_like(lp)))


@pytest.mark.parametrize("backend", OPS_BACKENDS)
def test_opcheck_kl(backend):
    g = torch.Generator().manual_seed(0)
    lp = torch.randn(3, 5, generator=g, requires_grad=True)
    ref = torch.randn(3, 5, generator=g, requires_grad=True)
    for kind, st in ((1, False), (3, False), (3, True), (4, False)):
        torch.library.opcheck(torch.ops.rlkern.kl_penalty_fwd.default,
                              (lp, ref, kind, st, 20.0, 10.0, backend))
        torch.library.opcheck(torch.ops.rlkern.kl_penalty_bwd.default,
                              (lp.detach(), ref.detach(), torch.randn(3, 5), kind, st, 20.0,
                               10.0, backend))


@pytest.mark.parametrize("name", ["ppo-clip-higher-dual", "all-addons", "trl-preset", "gvpo",
                                  "agg-global-counts"])
def test_torch_compile_fullgraph_forward_and_backward(name):
    case = CASES[name]
    inp = make_inputs(6, 9, torch.float32, seed=4)
    args, kw = call_kwargs(case, inp)
    ent = kw.pop("entropy", None)

    def step(lp, e):
        extra = {} if e is None else {"entropy": e}
        out = rlkern.policy_loss(lp * 1.0, *args[1:], config=case.config, **kw, **extra)
        return out.loss + 0.0 * out.metrics["clipfrac"], out.metrics["ratio_mean"]

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    lp1 = args[0].clone().requires_grad_()
    e1 = None if ent is None else ent.clone().requires_grad_()
    loss1, ratio1 = compiled(lp1, e1)
    loss1.backward()
    lp2 = args[0].clone().requires_grad_()
    e2 = None if ent is None else ent.clone().requires_grad_()
    loss2, ratio2 = step(lp2, e2)
    loss2.backward()
    torch.testing.assert_close(loss1, loss2)
    torch.testing.assert_close(ratio1, ratio2)
    torch.testing.assert_close(lp1.grad, lp2.grad)
    if ent is not None:
        torch.testing.assert_close(e1.grad, e2.grad)


def test_torch_compile_inductor_and_kl_penalty():
    inp = make_inputs(4, 8, torch.float32, seed=5)
    lp0 = torch.where(inp["mask"], inp["logprobs"], 0.0)
    ref0 = torch.where(inp["mask"], inp["ref_logprobs"], 0.0)

    def step(x):
        lp = torch.log_softmax(x, -1)[..., 0].expand(4, 8) + lp0
        out = rlkern.policy_loss(lp, inp["old_logprobs"], inp["advantages"], inp["mask"],
                                 clip_ratio_c=3.0)
        return out.loss + rlkern.kl_penalty(lp, ref0, estimator="k3+").mean()

    torch._dynamo.reset()
    x = torch.randn(4, 8, 5, requires_grad=True)
    torch.compile(step, fullgraph=True)(x).backward()
    y = x.detach().clone().requires_grad_()
    step(y).backward()
    torch.testing.assert_close(x.grad, y.grad)


def test_fake_tensors_give_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    p = _op_args("all-addons")
    with FakeTensorMode() as mode:
        conv = lambda t: None if t is None else mode.from_tensor(t)
        sums, stats = torch.ops.rlkern.policy_loss_fwd(
            conv(p.lp), conv(p.old), conv(p.adv), conv(p.mask), conv(p.ref), conv(p.rollout),
            conv(p.ent), conv(p.tw), conv(p.thr), p.flags, p.hparams, "cpu")
        assert sums.shape == (4, 6) and stats.shape == (20, 6)
        assert sums.dtype == stats.dtype == torch.float64


def _header_struct(text: str, name: str) -> list[str]:
    body = re.search(rf"struct {name} \{{(.*?)\}};", text, re.S).group(1)
    fields = []
    for line in body.splitlines():
        line = line.split("//")[0].strip()
        if line:
            fields += [f.strip() for f in line.split(maxsplit=1)[1].rstrip(";").split(",")]
    return fields


def test_python_spec_matches_the_header():
    """DESIGN rule 5: the flags / hparams / row statistics are specified once (the header);
    the Python spec must list the same names in the same order."""
    text = (ROOT / "csrc" / "include" / "rlkern" / "policy_loss.h").read_text()
    assert _header_struct(text, "Flags") == list(P.FLAG_FIELDS)
    assert _header_struct(text, "HParams") == list(P.HPARAM_FIELDS)
    enum = re.search(r"enum RowStat : int \{(.*?)\};", text, re.S).group(1)
    names = re.findall(r"\bk(\w+) = (\d+)", enum)
    camel = lambda s: re.sub(r"(?<!^)(?=[A-Z])", "_", s).lower()
    assert [int(i) for _, i in names] == list(range(len(names)))
    assert names[-1][0] == "NumRowStats" and int(names[-1][1]) == len(P.ROW_STATS)
    header_names = [camel(n) for n, _ in names[:-1]]
    aliases = {"seq_log_ratio": "seq_log_ratio", "neg_log_ratio": "neg_log_ratio",
               "rollout_w_sum": "rollout_w_sum", "non_finite": "non_finite"}
    assert [aliases.get(n, n) for n in header_names] == list(P.ROW_STATS)
    kinds = dict(re.findall(r"\bk(Ppo|Cispo|Sapo|Reinforce|Gmpo|Gvpo) = (\d)", text))
    assert {k.lower(): int(v) for k, v in kinds.items()} == {
        k: v for k, v in P.LOSS_KINDS.items() if k != "gspo"}


def test_triton_module_spec_matches():
    pytest.importorskip("triton")
    src = (ROOT / "kernels" / "policy_loss.py").read_text()
    consts = dict(re.findall(r"^_S_(\w+) = tl\.constexpr\((\d+)\)", src, re.M))
    assert len(consts) == len(P.ROW_STATS)
    hp = dict(re.findall(r"^_(\w+) = tl\.constexpr\((\d+)\)\n", src, re.M))
    order = ["CLIP_LO", "CLIP_HI", "DUAL_C", "DELTA", "LR_CLAMP", "SEQ_MAX", "TAU_POS",
             "TAU_NEG", "KL_LC", "KL_VC", "ROLL_LC", "ROLL_MIN", "ROLL_MAX"]
    assert [int(hp[k]) for k in order] == list(range(len(P.HPARAM_FIELDS)))
