"""The registered ops behind policy_loss / kl_penalty: opcheck, torch.compile(fullgraph=True),
fake tensors, and the one-spec rule (the Python and Triton layouts = the C++ header's lists)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import rlkern
from conftest import bits
from policy_loss_cases import CASES, call_kwargs, make_inputs
from rlkern.config.layout import layout
from rlkern.ops.policy_loss import prepare
from rlkern.ops.policy_loss.register import split_inputs

ROOT = Path(__file__).resolve().parents[1]
OPS_BACKENDS = ["cpu", "torch"]
L = layout("policy_loss")


def _op_args(name: str, dtype=torch.float32, B=6, T=7):
    case = CASES[name]
    inp = make_inputs(B, T, dtype, seed=3)
    args, kw = call_kwargs(case, inp)
    kw = {k: v for k, v in kw.items() if k not in ("num_tokens", "num_seqs")}
    return prepare(*args, config=case.config, backend="cpu", **kw)


@pytest.mark.parametrize("backend", OPS_BACKENDS)
@pytest.mark.parametrize("name", ["ppo-clip-higher-dual", "all-addons", "trl-preset", "gmpo",
                                  "gvpo"])
def test_opcheck_fwd_bwd(name, backend):
    p = _op_args(name)
    lp = p.lp.clone().requires_grad_()
    inputs = list(p.inputs)
    if p.get("entropy") is not None:
        inputs[L.inputs.entropy] = p.get("entropy").clone().requires_grad_()
    given, slots = split_inputs(inputs)
    fwd_args = (lp, p.old, p.adv, p.mask, given, slots, p.flags, p.hparams, backend)
    torch.library.opcheck(torch.ops.rlkern.policy_loss_fwd.default, fwd_args)
    row_sums, row_stats = torch.ops.rlkern.policy_loss_fwd(*fwd_args)
    grad_rows = torch.randn_like(row_sums)
    given, slots = split_inputs(p.inputs)
    torch.library.opcheck(
        torch.ops.rlkern.policy_loss_bwd.default,
        (p.lp, p.old, p.adv, p.mask, given, slots, row_stats.detach(), grad_rows, p.flags,
         p.hparams, p.get("entropy") is not None, backend))


def test_opcheck_compiled_out_ops():
    p = _op_args("all-addons")
    B = p.mask.shape[0]
    row_stats = torch.empty(len(L.row_stats), B, dtype=torch.float64)
    common = (p.lp, p.old, p.adv, p.mask, p.inputs)
    torch.library.opcheck(torch.ops.rlkern.policy_loss_fwd_out.default,
                          (*common, p.flags, p.hparams, row_stats))
    torch.library.opcheck(torch.ops.rlkern.policy_loss_bwd_out.default,
                          (*common, row_stats, torch.randn(len(L.row_grads), B,
                                                           dtype=torch.float64),
                           p.flags, p.hparams, torch.empty_like(p.lp),
                           torch.empty_like(p.get("entropy"))))
    lp, ref = p.lp.nan_to_num(), p.get("ref_logprobs").nan_to_num()
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
    given, slots = split_inputs(p.inputs)
    with FakeTensorMode() as mode:
        conv = lambda t: None if t is None else mode.from_tensor(t)
        sums, stats = torch.ops.rlkern.policy_loss_fwd(
            conv(p.lp), conv(p.old), conv(p.adv), conv(p.mask), [conv(t) for t in given],
            slots, p.flags, p.hparams, "cpu")
        assert sums.shape == (len(L.row_grads), 6) and stats.shape == (len(L.row_stats), 6)
        assert sums.dtype == stats.dtype == torch.float64


def _header_list(text: str, macro: str) -> list[str]:
    """The entry names of one X-macro list of the header (``#define macro(X) X(id, name) ...``:
    a quoted name, or a field identifier)."""
    body = re.search(rf"#define {macro}\(X\)(.*?)(?<!\\)\n", text, re.S).group(1)
    body = re.sub(r"/\*.*?\*/", "", body, flags=re.S)
    return [m.group(2) or m.group(3)
            for m in re.finditer(r"X\((\w+), (?:\"(\w+)\"|(\w+))", body)]


TABLES = {"flags": "RLKERN_PL_FLAGS", "hparams": "RLKERN_PL_HPARAMS",
          "inputs": "RLKERN_PL_INPUTS", "row_stats": "RLKERN_PL_ROW_STATS",
          "row_grads": "RLKERN_PL_ROW_GRADS", "loss_kinds": "RLKERN_PL_LOSS_KINDS",
          "ratio_modes": "RLKERN_PL_RATIO_MODES", "kl_kinds": "RLKERN_PL_KL_KINDS",
          "rollout_levels": "RLKERN_PL_ROLLOUT_LEVELS", "agg_modes": "RLKERN_PL_AGG_MODES"}


def test_python_spec_matches_the_header():
    """DESIGN rules 5 and 13: the flags / hparams / inputs / row statistics / codes are
    specified once (the header's X-macro lists); the layout Python reads through rlkern._C
    lists the same names in the same order, each name once."""
    text = (ROOT / "csrc" / "include" / "rlkern" / "policy_loss.h").read_text()
    assert set(vars(L)) == set(TABLES)
    for table, macro in TABLES.items():
        names = [e.name for e in getattr(L, table)]
        assert names == _header_list(text, macro), table
        assert [int(e) for e in getattr(L, table)] == list(range(len(names))), table
        assert len(set(names)) == len(names), table
    # the differentiable statistics are rows of row_stats, consecutive, in row_grads order
    rows = [L.row_stats[g.name] for g in L.row_grads]
    assert rows == list(range(rows[0], rows[0] + len(rows)))
    # every rlkern loss name maps to a loss kind of the header (gspo: ppo on sequence ratios)
    from rlkern.config.policy_loss import AGG_MODES, POLICY_LOSSES, PolicyLossConfig

    # the fused op's codes: the config's names, '-' spelled '_'
    assert [e.name for e in L.agg_modes] == [m.replace("-", "_") for m in AGG_MODES]

    for name in POLICY_LOSSES:
        extra = {"gvpo": {"group_size": 2}, "dro": {"dro_beta": 1.0}}.get(name, {})
        flags, hparams = PolicyLossConfig(policy_loss=name, **extra).kernel_args(
            with_kl=False, with_rollout=False)
        assert len(flags) == len(L.flags) and len(hparams) == len(L.hparams)
        kind = L.loss_kinds(flags[L.flags.loss_kind]).name
        assert kind == ("ppo" if name == "gspo" else name)


@pytest.mark.parametrize("with_kl", [False, True])
@pytest.mark.parametrize("with_rollout", [False, True])
def test_kernel_args_cache_is_the_encoding(with_kl, with_rollout):
    """kernel_args is cached by the config's value: each config's cached arguments are its
    encoding, equal configs share them, and every call gets lists of its own."""
    from rlkern.config.policy_loss import POLICY_LOSSES, PolicyLossConfig

    for name in POLICY_LOSSES:
        extra = {"gvpo": {"group_size": 2}, "dro": {"dro_beta": 1.0}}.get(name, {})
        for options in ({}, {"kl_estimator": "k3", "clip_ratio_c": 4.0},
                        {"rollout_correction": "token_truncate", "rollout_max": 2.0}):
            cfg = PolicyLossConfig(policy_loss=name, **extra, **options)
            want = cfg._encode(with_kl=with_kl, with_rollout=with_rollout)
            for _ in range(2):  # a miss, then a hit
                flags, hparams = cfg.kernel_args(with_kl=with_kl, with_rollout=with_rollout)
                assert (flags, hparams) == want
                flags.append(-1)  # the next call gets fresh lists
                hparams.clear()
            twin = PolicyLossConfig(policy_loss=name, **extra, **options)
            assert twin.kernel_args(with_kl=with_kl, with_rollout=with_rollout) == want


def test_cpu_op_takes_the_layout_and_rejects_a_wrong_inputs_list():
    """The CPU op's row_stats has exactly len(row_stats) rows, its grad_rows len(row_grads), its
    inputs list one entry per slot; anything else is refused with a message naming it."""
    p = _op_args("all-addons")
    B = p.mask.shape[0]
    common = (p.lp, p.old, p.adv, p.mask)
    ops = torch.ops.rlkern
    stats = torch.empty(len(L.row_stats), B, dtype=torch.float64)
    ops.policy_loss_fwd_out(*common, p.inputs, p.flags, p.hparams, stats)
    expected = torch.empty_like(stats)
    with pytest.raises(RuntimeError, match=r"row_stats: expected a contiguous tensor of"):
        ops.policy_loss_fwd_out(*common, p.inputs, p.flags, p.hparams,
                                torch.empty(len(L.row_stats) + 1, B, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=rf"inputs: expected {len(L.inputs)} optional"):
        ops.policy_loss_fwd_out(*common, p.inputs[:-1], p.flags, p.hparams, expected)
    with pytest.raises(RuntimeError, match=rf"inputs: expected {len(L.inputs)} optional"):
        ops.policy_loss_fwd_out(*common, [*p.inputs, None], p.flags, p.hparams, expected)
    with pytest.raises(RuntimeError, match=rf"flags: expected {len(L.flags)} values"):
        ops.policy_loss_fwd_out(*common, p.inputs, p.flags[:-1], p.hparams, expected)
    with pytest.raises(RuntimeError, match=rf"hparams: expected {len(L.hparams)} values"):
        ops.policy_loss_fwd_out(*common, p.inputs, p.flags, [*p.hparams, 0.0], expected)
    with pytest.raises(RuntimeError, match=r"grad_rows: expected a contiguous tensor of"):
        ops.policy_loss_bwd_out(*common, p.inputs, stats,
                                torch.zeros(len(L.row_grads) + 1, B, dtype=torch.float64),
                                p.flags, p.hparams, torch.empty_like(p.lp), None)
    bad = list(p.inputs)
    bad[L.inputs.token_weights] = p.lp[:, :-1]
    with pytest.raises(RuntimeError, match=r"token_weights: expected shape"):
        ops.policy_loss_fwd_out(*common, bad, p.flags, p.hparams, expected)


def test_triton_module_takes_the_layout():
    """The Triton kernels restate no code or index: they take the layout tables the op layer
    hands them (LAY), whose entries are the header's, in order."""
    pytest.importorskip("triton")
    from rlkern.kernels import policy_loss as K
    from rlkern.ops.policy_loss.register import layout_tables

    src = (ROOT / "kernels" / "policy_loss.py").read_text()
    assert not re.search(r"tl\.constexpr\(\d+\)", src), "a layout number in the Triton module"
    assert not re.search(r"^(from|import) rlkern\.(?!kernels\b)", src, re.M)  # torch-free
    lay = K.layout_tuple(layout_tables())
    for table in TABLES:
        names = [e.name for e in getattr(L, table)]
        assert list(getattr(lay, table)._fields) == names
        assert list(getattr(lay, table)) == list(range(len(names)))


FWD = "rlkern::policy_loss_fwd"


@pytest.mark.parametrize("grad_mode", ["no_grad", "no_input_requires_grad"])
@pytest.mark.parametrize("name", ["ppo-clip-higher-dual", "all-addons", "gmpo", "gvpo",
                                  "trl-preset"])
def test_graph_free_forward_calls_the_body(name, grad_mode, monkeypatch):
    """Where the forward builds no graph, in plain eager mode on the CPU, rlkern.policy_loss
    calls rlkern::policy_loss_fwd's body directly (rlkern.ops.eager.call with no_graph): the
    same loss and metrics, bit for bit, as through the registered op, which every other call
    takes. (A linear aggregate's graph-free forward takes the fused linear op instead,
    tests/test_policy_loss_fused.py; switched off here.)"""
    import contextlib

    import rlkern.ops.policy_loss.api as api
    from rlkern.ops import eager

    monkeypatch.setattr(api, "forward_applies", lambda p: False)
    case = CASES[name]
    inp = make_inputs(6, 33, torch.float32, seed=5)
    args, kw = call_kwargs(case, inp)
    if grad_mode == "no_grad":
        args = (args[0].clone().requires_grad_(), *args[1:])
    calls = []
    real = eager.BODIES[FWD]
    monkeypatch.setitem(eager.BODIES, FWD, lambda *a: calls.append("body") or real(*a))
    outs = []
    for body in (True, False):
        if not body:
            monkeypatch.setattr(eager, "plain_eager", lambda *t, **k: False)
        ctx = torch.no_grad() if grad_mode == "no_grad" else contextlib.nullcontext()
        with ctx:
            outs.append(rlkern.policy_loss(*args, config=case.config, backend="cpu", **kw))
    # the direct call only (the registered op holds the function it was made from)
    assert calls == ["body"]
    a, b = outs
    assert torch.equal(bits(a.loss), bits(b.loss))
    for k in a.metrics:
        assert torch.equal(bits(a.metrics[k]), bits(b.metrics[k])), k


def test_the_body_is_not_called_where_a_graph_or_a_tracer_needs_the_op(monkeypatch):
    """With a gradient wanted off the fused path — the torch backend, or an entropy that
    needs a gradient while the log-probabilities do not (it travels in the op's Tensor[]
    argument) — or under FakeTensorMode, the registered op runs (the body is then reached
    through the dispatcher, not called directly)."""
    from rlkern.ops import eager

    direct = []
    real = eager.plain_eager

    def spy(*t, **k):
        direct.append(real(*t, **k))
        return direct[-1]

    monkeypatch.setattr(eager, "plain_eager", spy)
    inp = make_inputs(4, 9, torch.float32, seed=2)
    lp = inp["logprobs"].clone().requires_grad_()
    out = rlkern.policy_loss(lp, inp["old_logprobs"], inp["advantages"], inp["mask"],
                             backend="torch")
    out.loss.backward()
    assert direct == [False] and lp.grad is not None
    ent = torch.nan_to_num(inp["entropy"]).requires_grad_()
    out = rlkern.policy_loss(inp["logprobs"], inp["old_logprobs"], inp["advantages"],
                             inp["mask"], entropy=ent, config=rlkern.PolicyLossConfig(
                                 entropy_coef=0.01), backend="cpu")
    out.loss.backward()
    assert direct == [False, False] and ent.grad is not None and ent.grad.abs().sum() > 0
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        fake = {k: mode.from_tensor(v) for k, v in inp.items()}
        with torch.no_grad():
            rlkern.policy_loss(fake["logprobs"], fake["old_logprobs"], fake["advantages"],
                               fake["mask"], backend="cpu")
    assert direct == [False, False, False]
