"""Plain eager calls (rlkern.ops.eager): when a public function runs its registered op's body
without the dispatcher, that it gives the op's bits, and that every tracer and mode still sees
the op."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import rlkern
from rlkern.ops import eager
from rlkern.ops.eager import plain_eager


class _OpLog(TorchDispatchMode):
    """Records the name of every op dispatched under it."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.name())
        return func(*args, **(kwargs or {}))


def test_plain_eager_only_in_plain_eager_mode():
    x = torch.rand(4)
    assert plain_eager(x, None)
    assert plain_eager()
    with torch.device("cpu"):  # any torch function mode
        assert not plain_eager(x)
    with _OpLog():
        assert not plain_eager(x)
    with FakeTensorMode():
        assert not plain_eager(x)
    assert not plain_eager(torch.empty(4, device="meta"))
    seen = []
    torch.vmap(lambda row: seen.append(plain_eager(row)) or row)(torch.rand(2, 3))
    assert seen == [False]

    assert not plain_eager(torch.rand(2, requires_grad=True))

    class Sub(torch.Tensor):
        pass

    assert not plain_eager(x.as_subclass(Sub))
    traced = []
    with pytest.warns(DeprecationWarning):
        torch.jit.trace(lambda t: traced.append(plain_eager(t)) or t * 2, (x,),
                        check_trace=False)
    assert traced and not any(traced)
    compiled = torch.compile(lambda t: t + int(plain_eager(t)), backend="eager", fullgraph=True)
    assert torch.equal(compiled(x), x)  # traced: the op path


def _spy_body(monkeypatch, name: str) -> list[int]:
    """Records each direct call of the op's body (the registered op keeps the original)."""
    calls: list[int] = []
    body = eager.BODIES[name]

    def spy(*args):
        calls.append(1)
        return body(*args)

    monkeypatch.setitem(eager.BODIES, name, spy)
    return calls


@pytest.mark.parametrize("estimator", ["grpo", "rloo", "opo", "xrpo", "unlikely"])
@pytest.mark.parametrize("by_ids", [False, True])
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_group_advantages_plain_call_is_the_op(monkeypatch, estimator, by_ids, backend):
    gen = torch.Generator().manual_seed(3)
    n, t = 48, 5
    scores = torch.randint(0, 4, (n,), generator=gen).float()
    mask = torch.rand(n, t, generator=gen) > 0.2
    grouping = ({"group_ids": torch.randint(0, 7, (n,), generator=gen) * 31} if by_ids
                else {"group_size": 8})
    options = {"lam": 0.5, "kappa": 0.3} if estimator == "xrpo" else {}
    if estimator == "opo":
        options["lengths"] = torch.randint(1, 9, (n,), generator=gen).float()
    if estimator in ("xrpo", "unlikely"):
        options.update(mask=mask, old_logprobs=-torch.rand(n, t, generator=gen))
    calls = _spy_body(monkeypatch, "rlkern::group_advantages")
    plain = rlkern.group_advantages(scores, estimator=estimator, backend=backend, **grouping,
                                    **options)
    assert calls == [1]  # the body ran directly
    with _OpLog() as log:
        via_op = rlkern.group_advantages(scores, estimator=estimator, backend=backend,
                                         **grouping, **options)
    assert calls == [1]  # ... and not under a dispatch mode,
    assert "rlkern::group_advantages" in log.names  # where the op is dispatched instead
    for a, b in zip(plain, via_op, strict=True):
        assert a.dtype == b.dtype and torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))


def test_group_advantages_compiled_sees_the_op(monkeypatch):
    calls = _spy_body(monkeypatch, "rlkern::group_advantages")
    scores = torch.tensor([1.0, 0.0, 3.0, 3.0, 2.0, 0.5])
    fn = torch.compile(lambda s: rlkern.group_advantages(s, group_size=3).advantages,
                       backend="aot_eager", fullgraph=True)
    got = fn(scores)
    assert calls == []
    assert torch.equal(got, rlkern.group_advantages(scores, group_size=3).advantages)
    assert calls == [1]


# ---------------------------------------------------------------------------------------------
# Policy-loss metrics: the host path (CPU, plain eager) against the device path


def _row_stats(B: int, seed: int, *, poisoned: bool, empty: bool) -> torch.Tensor:
    from rlkern.config.layout import layout

    S = layout("policy_loss").row_stats
    gen = torch.Generator().manual_seed(seed)
    rs = torch.rand(len(S), B, generator=gen, dtype=torch.float64) * 7
    rs[S.len] = torch.randint(0, 50, (B,), generator=gen).double() * (0 if empty else 1)
    rs[S.non_finite] = 0.0
    if poisoned and B:
        rs[S.non_finite, B // 2] = 1.0
    rs[S.ratio_min] = torch.rand(B, generator=gen, dtype=torch.float64)
    rs[S.ratio_max] = 1 + torch.rand(B, generator=gen, dtype=torch.float64)
    return rs


@pytest.mark.parametrize("B", [0, 1, 7])
@pytest.mark.parametrize("poisoned", [False, True])
@pytest.mark.parametrize("empty", [False, True])
@pytest.mark.parametrize("addons", [(), ("kl",), ("entropy", "rollout"), ("vespo", "kl")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_metrics_host_path_is_the_device_path(monkeypatch, B, poisoned, empty, addons, dtype):
    from rlkern.ops.policy_loss import aggregate

    rs = _row_stats(B, seed=B * 31 + len(addons), poisoned=poisoned, empty=empty)
    parts = {"pg_loss": torch.tensor(0.1234567891, dtype=torch.float64),
             "entropy_loss": torch.tensor(-2.5, dtype=torch.float64)}
    if "kl" in addons:
        parts["kl_loss"] = torch.tensor(1 / 3, dtype=torch.float64)
    options = dict(with_kl="kl" in addons, with_entropy="entropy" in addons,
                   with_rollout="rollout" in addons, vespo="vespo" in addons, dtype=dtype)
    for given in (parts, None):
        host = aggregate.finish_metrics(rs, given, **options)
        with monkeypatch.context() as m:
            m.setattr(aggregate, "plain_eager", lambda *t: False)
            device = aggregate.finish_metrics(rs, given, **options)
        assert list(host) == list(device)
        for name in host:
            a, b = host[name], device[name]
            assert a.dtype == b.dtype == dtype and a.dim() == 0
            assert torch.equal(a.isnan(), b.isnan()), name
            assert torch.equal(a.nan_to_num(), b.nan_to_num()), name


# ---------------------------------------------------------------------------------------------
# Sampling: the body in plain eager mode, the op under a mode or torch.compile


@pytest.mark.parametrize("options", [
    {}, {"top_k": 5, "return_entropy": True}, {"top_p": 0.8, "min_p": 0.05},
    {"num_samples": 3, "top_k": 7}, {"indices": "rows", "temperature": 0.6},
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sample_plain_call_is_the_op(monkeypatch, options, dtype):
    from rlkern.ops import sample as sample_module

    gen = torch.Generator().manual_seed(9)
    logits = (torch.randn(6, 97, generator=gen) * 3).to(dtype)
    options = dict(options)
    n = 6
    if options.get("indices") == "rows":
        options["indices"] = torch.tensor([5, 0, 2])
        n = 3
    seeds, steps = torch.arange(n) * 11 + 1, torch.full((n,), 4)
    calls: list[bool] = []  # per call of the body: whether it ran inside the op's dispatch
    body = sample_module._sample_impl

    def spy(*args):
        calls.append(any("torch/_library" in f.filename for f in inspect.stack()))
        return body(*args)

    monkeypatch.setattr(sample_module, "_sample_impl", spy)
    plain = rlkern.sample(logits, seeds=seeds, steps=steps, backend="cpu", **options)
    assert calls == [False]  # the body, called directly
    with _OpLog() as log:
        via_op = rlkern.sample(logits, seeds=seeds, steps=steps, backend="cpu", **options)
    assert calls == [False, True]  # ... and from the registered op under a dispatch mode
    assert {"rlkern::sample", "rlkern::sample_n"} & set(log.names)
    for a, b in zip(plain, via_op, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.dtype == b.dtype and torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))


# ---------------------------------------------------------------------------------------------
# The token-, step- and turn-level helpers: every op registered through rlkern.ops.eager


def _token_calls() -> dict[str, tuple[str, object]]:
    gen = torch.Generator().manual_seed(4)
    B, T = 6, 9
    x = torch.randn(B, T, generator=gen)
    mask = torch.rand(B, T, generator=gen) > 0.25
    mask[:, 0] = True
    steps = torch.randn(12, generator=gen)
    return {
        "discounted_returns": ("rlkern::discounted_returns",
                               lambda: rlkern.discounted_returns(x, gamma=0.9)),
        "gae": ("rlkern::gae", lambda: rlkern.gae(x, x * 0.5, mask, gamma=0.95, lam=0.9)),
        "position_baseline": ("rlkern::position_baseline",
                              lambda: rlkern.position_baseline(x, mask, group_size=3)),
        "gtpo_weights": ("rlkern::gtpo_weights",
                         lambda: rlkern.gtpo_weights(x.abs(), mask, group_size=2)),
        "gigpo_advantages": ("rlkern::gigpo_advantages", lambda: rlkern.gigpo_advantages(
            steps, steps * 2, torch.arange(12) % 3, group_ids=torch.arange(12) % 2,
            omega=1.0, mode="mean_norm")),
        "empg_modulate": ("rlkern::empg_modulate", lambda: rlkern.empg_modulate(
            steps, steps.abs(), steps.abs() + 0.5)),
        "optimal_token_baseline": ("rlkern::optimal_token_baseline",
                                   lambda: rlkern.optimal_token_baseline(
                                       x, mask, -x.abs(), x.abs(), group_size=3)),
    }


@pytest.mark.parametrize("fn", list(_token_calls()))
def test_token_helpers_plain_call_is_the_op(monkeypatch, fn):
    name, run = _token_calls()[fn]
    calls = _spy_body(monkeypatch, name)
    plain = run()
    assert calls == [1]
    with _OpLog() as log:
        via_op = run()
    assert calls == [1] and name in log.names
    plain = plain if isinstance(plain, tuple) else (plain,)
    via_op = via_op if isinstance(via_op, tuple) else (via_op,)
    for a, b in zip(plain, via_op, strict=True):
        assert a.dtype == b.dtype and torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))


def test_every_registered_body_is_called_through_eager():
    """Each op registered with rlkern.ops.eager.custom_op is what torch.ops names."""
    assert set(eager.BODIES) >= {"rlkern::group_advantages", "rlkern::sample",
                                 "rlkern::sample_n", *(n for n, _ in _token_calls().values())}
    for name in eager.BODIES:
        namespace, op = name.split("::")
        assert hasattr(getattr(torch.ops, namespace), op), name


def test_autograd_function_runs_the_body_and_the_registered_rule():
    """eager.autograd_function: the op's body forward, its registered setup_context and
    backward; the same values and gradient as the registered op under autograd."""
    calls: list[str] = []

    @eager.custom_op("rlkern_test::cube", mutates_args=())
    def cube(x: torch.Tensor, scale: float) -> torch.Tensor:
        calls.append("body")
        return x * x * x * scale

    def setup(ctx, inputs, output):
        calls.append("setup")
        ctx.save_for_backward(inputs[0])
        ctx.scale = inputs[1]

    def backward(ctx, grad):
        calls.append("backward")
        (x,) = ctx.saved_tensors
        return grad * 3 * x * x * ctx.scale, None

    torch.library.register_autograd("rlkern_test::cube", backward, setup_context=setup)
    fn = eager.autograd_function("rlkern_test::cube", setup, backward)
    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    fn.apply(x, 0.5).sum().backward()
    assert calls == ["body", "setup", "backward"]
    via_fn = x.grad.clone()
    x.grad = None
    torch.ops.rlkern_test.cube(x, 0.5).sum().backward()
    assert torch.equal(x.grad, via_fn)
    assert torch.allclose(via_fn, 1.5 * x.detach() ** 2)


def test_call_bumps_the_version_of_what_the_body_writes():
    """A body that writes an argument the way a C++ kernel does (through its memory, which
    bumps no version counter) still leaves the counter bumped, as the registered op would."""

    @eager.custom_op("rlkern_test::fill_ones", mutates_args=("out",))
    def fill_ones(x: torch.Tensor, out: torch.Tensor) -> None:
        out.data.copy_(torch.ones_like(x))

    assert eager.MUTATED["rlkern_test::fill_ones"] == (1,)
    x, out = torch.zeros(4), torch.zeros(4)
    before = out._version
    eager.call("rlkern_test::fill_ones", x, out)
    assert out._version > before and torch.equal(out, torch.ones(4))
    assert eager.MUTATED["rlkern::sample"] == ()
