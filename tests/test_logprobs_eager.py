"""token_logprobs' CPU path in plain eager mode and its two one-call ops.

In plain eager mode on CPU tensors, token_logprobs calls ``rlkern::logprobs_fwd``'s body and
autograd rule directly (``_EagerLogprobs``, made by rlkern.ops.eager.autograd_function) instead
of the registered op, and the CPU backend's forward and backward are each one C++ call
(``rlkern::logprobs_fwd_cpu`` / ``logprobs_bwd_cpu``). These tests hold both to what they
replace:

* the eager path gives the registered op's outputs and gradients bit for bit (every dtype,
  layout, option and upstream), and is the path taken (the profiler's op names);
* the one-call forward gives the caller-output kernel op's bits (``logprobs_fwd_out`` on the
  layout the Python layer builds), with the outputs' shapes and dtypes;
* the C++ data checks raise the Python layer's errors with the same messages (the ``torch``
  backend's), and stand down with the checks off;
* the in-place backward bumps the logits' version counter, as the mutating op does;
* the filtered calls (``top_k`` / ``top_p`` / ``min_p``) take ``rlkern::truncated_logprobs_fwd``'s
  body and autograd rule the same way, with the registered op's bits.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rlkern
from conftest import bits
from rlkern.config.logprobs import output_names, outputs
from rlkern.ops import logprobs as lp_ops

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _layout(kind: str, dtype: torch.dtype, V: int = 37) -> torch.Tensor:
    """Logits of one of the layouts token_logprobs takes without a copy."""
    if kind == "2d":
        return torch.randn(7, V, dtype=torch.float64).to(dtype)
    if kind == "3d":
        return torch.randn(2, 5, V, dtype=torch.float64).to(dtype)
    if kind == "trl_slice":  # TRL's logits[:, :-1, :]
        return torch.randn(3, 6, V, dtype=torch.float64).to(dtype)[:, :-1, :]
    if kind == "transposed":
        return torch.randn(4, 3, V, dtype=torch.float64).to(dtype).transpose(0, 1)
    if kind == "4d":
        return torch.randn(2, 2, 3, V, dtype=torch.float64).to(dtype)
    raise AssertionError(kind)


def _labels(logits: torch.Tensor, dtype: torch.dtype, ignore_index: int) -> torch.Tensor:
    labels = torch.randint(0, logits.shape[-1], logits.shape[:-1]).to(dtype)
    labels.view(-1)[::3] = ignore_index
    return labels


def _run(path: str, logits: torch.Tensor, labels: torch.Tensor, *, with_entropy: bool,
         with_stats: bool, inplace: bool, temperature: float = 0.8, ignore_index: int = -100,
         grads: tuple[str, ...] = ("logprobs", "entropy", "lse"),
         ) -> tuple[list[torch.Tensor | None], torch.Tensor]:
    """Outputs (None where not asked for) and the gradient wrt the logits, by token_logprobs
    (``path="eager"``) or by the registered op under autograd (``path="op"``)."""
    x = logits.detach().clone().requires_grad_()
    leaf = x
    # the in-place backward writes over the tensor autograd saved: keep the leaf intact
    src = x * 1 if inplace else x
    if path == "eager":
        res = rlkern.token_logprobs(src, labels, temperature=temperature,
                                    return_entropy=with_entropy, return_stats=with_stats,
                                    ignore_index=ignore_index, inplace_backward=inplace)
        out = [getattr(res, name) for name in output_names()]
    else:
        raw = torch.ops.rlkern.logprobs_fwd(src, labels, temperature, ignore_index, with_entropy,
                                            with_stats, inplace, "cpu")
        wanted = {"logprobs", "lse"} | ({"entropy"} if with_entropy else set()) | (
            {"self_certainty", "sum_p_sq"} if with_stats else set())
        out = [t if name in wanted else None for name, t in zip(output_names(), raw, strict=True)]
    gen = torch.Generator().manual_seed(3)
    loss = 0
    for name in grads:
        t = out[outputs()[name]]
        if t is not None:
            loss = loss + (t * torch.randn(t.shape, generator=gen, dtype=t.dtype)).sum()
    loss.backward()
    return [None if t is None else t.detach() for t in out], leaf.grad


def _assert_same(a: list[torch.Tensor | None], b: list[torch.Tensor | None]) -> None:
    for name, x, y in zip(output_names(), a, b, strict=True):
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.shape == y.shape and x.dtype == y.dtype, name
            assert torch.equal(bits(x), bits(y)), name


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["2d", "3d", "trl_slice", "transposed", "4d"])
@pytest.mark.parametrize("with_entropy,with_stats", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("inplace", [False, True])
def test_eager_path_matches_registered_op(dtype, kind, with_entropy, with_stats, inplace):
    logits = _layout(kind, dtype)
    labels = _labels(logits, torch.int64, -100)
    eager = _run("eager", logits, labels, with_entropy=with_entropy, with_stats=with_stats,
                 inplace=inplace)
    op = _run("op", logits, labels, with_entropy=with_entropy, with_stats=with_stats,
              inplace=inplace)
    _assert_same(eager[0], op[0])
    assert torch.equal(bits(eager[1]), bits(op[1]))


@pytest.mark.parametrize("grads", [("logprobs",), ("entropy",), ("lse",), ("logprobs", "lse")])
def test_eager_path_each_upstream(grads):
    """Each differentiable output alone (the others' gradients materialised as zeros)."""
    logits = _layout("3d", torch.bfloat16)
    labels = _labels(logits, torch.int32, 0)
    kw = dict(with_entropy=True, with_stats=False, inplace=False, ignore_index=0, grads=grads)
    eager = _run("eager", logits, labels, **kw)
    op = _run("op", logits, labels, **kw)
    assert torch.equal(bits(eager[1]), bits(op[1]))
    assert eager[1].abs().sum() > 0  # a gradient that can tell paths apart


def test_eager_path_marks_the_same_outputs_differentiable():
    """The statistics are not differentiable on either path; the other outputs are."""
    logits = torch.randn(3, 50, requires_grad=True)
    labels = torch.randint(0, 50, (3,))
    eager = rlkern.token_logprobs(logits, labels, return_entropy=True, return_stats=True)
    op = torch.ops.rlkern.logprobs_fwd(logits, labels, 1.0, -100, True, True, False, "cpu")
    assert [getattr(eager, n).requires_grad for n in output_names()] == \
        [t.requires_grad for t in op] == [True, True, True, False, False]


def test_eager_path_is_taken_and_the_op_elsewhere():
    """Plain eager mode runs the one-call ops without the registered op; a dispatch mode (as
    torch.compile's tracing) still sees the registered op."""
    from torch.profiler import profile
    from torch.utils._python_dispatch import TorchDispatchMode

    logits = torch.randn(4, 50, requires_grad=True)
    labels = torch.randint(0, 50, (4,))
    with profile() as prof:
        rlkern.token_logprobs(logits, labels, return_entropy=True).logprobs.sum().backward()
    names = {e.name for e in prof.events() if e.name.startswith("rlkern::")}
    assert names == {"rlkern::logprobs_fwd_cpu", "rlkern::logprobs_bwd_cpu"}

    seen: list[str] = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with Record():
        rlkern.token_logprobs(logits.detach(), labels)
    assert "rlkern.logprobs_fwd.default" in seen


def test_inplace_backward_bumps_version_and_writes_the_gradient():
    logits = torch.randn(3, 4, 41)
    labels = torch.randint(0, 41, (3, 4))
    base = logits.clone().requires_grad_()
    x = base * 1  # a non-leaf: the in-place gradient is written over it
    out = rlkern.token_logprobs(x, labels, return_entropy=True, inplace_backward=True)
    version = x._version
    x.retain_grad()
    (out.logprobs.sum() + out.entropy.sum()).backward()
    assert x._version > version
    fresh = logits.clone().requires_grad_()
    again = rlkern.token_logprobs(fresh, labels, return_entropy=True)
    ref, = torch.autograd.grad(again.logprobs.sum() + again.entropy.sum(), fresh)
    assert torch.equal(bits(x.detach()), bits(ref))  # the buffer holds the gradient
    assert torch.equal(bits(base.grad), bits(ref))


def test_retain_graph_backward_twice():
    logits = torch.randn(5, 33, requires_grad=True)
    labels = torch.randint(0, 33, (5,))
    out = rlkern.token_logprobs(logits, labels, return_entropy=True)
    loss = out.logprobs.sum() + 0.1 * out.entropy.sum()
    g1, = torch.autograd.grad(loss, logits, retain_graph=True)
    g2, = torch.autograd.grad(loss, logits)
    assert torch.equal(bits(g1), bits(g2))


def test_create_graph_fails_as_the_registered_op_does():
    """No double backward on either path: the first-order gradient is built, the second
    refuses with the registered backward op's message."""
    labels = torch.randint(0, 33, (5,))
    for path in ("eager", "op"):
        logits = torch.randn(5, 33, requires_grad=True)
        if path == "eager":
            lp = rlkern.token_logprobs(logits, labels).logprobs
        else:
            lp = torch.ops.rlkern.logprobs_fwd(logits, labels, 1.0, -100, False, False, False,
                                               "cpu")[0]
        g, = torch.autograd.grad(lp.sum(), logits, create_graph=True)
        with pytest.raises(RuntimeError, match="logprobs_bwd"):
            g.sum().backward()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("label_dtype", [torch.int32, torch.int64])
def test_fwd_cpu_matches_caller_output_kernel(dtype, label_dtype):
    """The one-call forward against the kernel op on the layout the Python layer builds: the
    same bits, outputs of logits.shape[:-1] in the accumulation dtype, unwanted ones empty."""
    logits = _layout("trl_slice", dtype, V=300)
    labels = _labels(logits, label_dtype, -100)
    got = torch.ops.rlkern.logprobs_fwd_cpu(logits, labels, 0.7, -100, True, True, True)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    B, L, _ = logits.shape
    want = [torch.empty(B, L, dtype=acc) for _ in outputs()]
    torch.ops.rlkern.logprobs_fwd_out(logits, labels.to(torch.int64).contiguous(), 0.7, -100,
                                      want)
    for name, g, w in zip(output_names(), got, want, strict=True):
        assert g.shape == (B, L) and g.dtype == acc, name
        assert torch.equal(bits(g), bits(w)), name
    lean = torch.ops.rlkern.logprobs_fwd_cpu(logits, labels, 0.7, -100, False, False, True)
    for name, t in zip(output_names(), lean, strict=True):
        if name in ("logprobs", "lse"):
            assert torch.equal(bits(t), bits(want[outputs()[name]])), name
        else:
            assert t.shape == (0,) and t.dtype == torch.float32, name


def test_bwd_cpu_takes_strided_rows():
    """Per-row tensors of any strides (autograd hands over expanded gradients)."""
    logits = torch.randn(2, 3, 40)
    labels = torch.randint(0, 40, (2, 3))
    out = torch.ops.rlkern.logprobs_fwd_cpu(logits, labels, 1.3, -100, True, False, True)
    lse, ent = out[outputs().lse], out[outputs().entropy]
    g_lp = torch.randn(3, 2).t()  # transposed: not contiguous
    g_ent = torch.tensor(0.5).expand(2, 3)  # stride 0
    strided = torch.empty_like(logits)
    torch.ops.rlkern.logprobs_bwd_cpu(logits, labels, lse, ent, g_lp, g_ent, None, 1.3, -100,
                                      strided)
    dense = torch.empty_like(logits)
    torch.ops.rlkern.logprobs_bwd_cpu(logits, labels, lse.t().contiguous().t(), ent,
                                      g_lp.contiguous(), g_ent.contiguous(), None, 1.3, -100,
                                      dense)
    assert torch.equal(bits(strided), bits(dense))
    with pytest.raises(ValueError, match="grad_logprobs: expected 6 values"):
        torch.ops.rlkern.logprobs_bwd_cpu(logits, labels, lse, ent, torch.ones(5), None, None,
                                          1.3, -100, dense)
    with pytest.raises(RuntimeError, match="entropy: required when grad_entropy"):
        torch.ops.rlkern.logprobs_bwd_cpu(logits, labels, lse, None, None, g_ent, None, 1.3,
                                          -100, dense)


def _error(backend: str, logits: torch.Tensor, labels: torch.Tensor, **kw) -> str:
    with pytest.raises(ValueError) as info:
        rlkern.token_logprobs(logits, labels, backend=backend, **kw)
    return str(info.value)


@pytest.mark.parametrize("label_dtype", [torch.int32, torch.int64])
def test_label_check_message_as_the_python_layer(label_dtype):
    logits = torch.randn(2, 3, 11)
    for bad in (11, -1, 2**31 - 1 if label_dtype == torch.int32 else 2**40):
        labels = torch.zeros(2, 3, dtype=label_dtype)
        labels[1, 0] = bad
        cpu, ref = _error("cpu", logits, labels), _error("torch", logits, labels)
        assert cpu.startswith(f"labels: value {bad} at flat position 3 is outside [0, 11) and "
                              "is not ignore_index=-100"), cpu
        assert ref in cpu  # the C++ message may carry a location suffix, nothing else
    labels = torch.full((2, 3), -100, dtype=label_dtype)
    labels[0, 2] = 7
    assert torch.isfinite(rlkern.token_logprobs(logits, labels).logprobs[0, 2])


def test_all_neginf_row_message_and_checks_off():
    logits = torch.randn(3, 9)
    logits[1] = float("-inf")
    labels = torch.tensor([0, 4, 2])
    cpu, ref = _error("cpu", logits, labels), _error("torch", logits, labels)
    assert cpu.startswith("logits: row 1 (flat index over the leading dims) is all -inf"), cpu
    assert ref in cpu
    # an ignored all -inf row is no error; a finite row with lse = -inf (bf16 lowest at a tiny
    # temperature) is none either
    ignored = rlkern.token_logprobs(logits, torch.tensor([0, -100, 2]))
    assert ignored.lse[1] == 0 and ignored.logprobs[1] == 0  # an ignored row gives 0
    lowest = torch.full((1, 4), torch.finfo(torch.bfloat16).min, dtype=torch.bfloat16)
    out = rlkern.token_logprobs(lowest, torch.tensor([1]), temperature=1e-10)
    assert torch.isfinite(out.logprobs).all()
    lp_ops.set_checks(False)
    try:
        out = rlkern.token_logprobs(logits, labels)
    finally:
        lp_ops.set_checks(True)
    assert out.lse[1] == float("-inf") and torch.isnan(out.logprobs[1])
    bad = torch.tensor([0, 4, 99])
    lp_ops.set_checks(False)
    try:
        out = rlkern.token_logprobs(logits, bad)  # no read out of bounds: a NaN row
    finally:
        lp_ops.set_checks(True)
    assert torch.isnan(out.logprobs[2])


def test_one_call_ops_refuse_float_labels():
    """A direct caller of the C++ ops (not through token_logprobs' checks) gets a TypeError
    for labels that are not integers, rather than a silent conversion."""
    logits = torch.randn(2, 3)
    with pytest.raises(TypeError, match="labels: expected int32 or int64"):
        torch.ops.rlkern.logprobs_fwd_cpu(logits, torch.zeros(2), 1.0, -100, False, False, True)
    with pytest.raises(TypeError, match="labels: expected int32 or int64"):
        torch.ops.rlkern.logprobs_bwd_cpu(logits, torch.zeros(2), torch.zeros(2), None, None,
                                          None, None, 1.0, -100, torch.empty_like(logits))


def test_unmergeable_leading_dims():
    base = torch.randn(3, 2, 4, 10)
    logits = base.transpose(0, 1)  # (2, 3, 4, 10): dims 0 and 1 cannot merge
    labels = torch.zeros(2, 3, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="cannot be merged without a copy"):
        rlkern.token_logprobs(logits, labels)
    with pytest.raises(ValueError, match="cannot be merged without a copy"):
        torch.ops.rlkern.logprobs_fwd_cpu(logits, labels, 1.0, -100, False, False, True)


def test_empty_inputs():
    for shape in ((0, 7), (2, 0, 7), (0, 3, 0)):
        logits = torch.randn(shape, requires_grad=True)
        labels = torch.zeros(shape[:-1], dtype=torch.long)
        out = rlkern.token_logprobs(logits, labels, return_entropy=True)
        assert out.logprobs.shape == shape[:-1]
        (out.logprobs.sum() + out.entropy.sum()).backward()
        assert logits.grad.shape == shape and not logits.grad.any()
    with pytest.raises(ValueError, match="empty vocab"):
        rlkern.token_logprobs(torch.randn(2, 0), torch.zeros(2, dtype=torch.long))


@st.composite
def cases(draw):
    dtype = draw(st.sampled_from(DTYPES))
    B, L = draw(st.integers(1, 3)), draw(st.integers(1, 6))
    V = draw(st.sampled_from([1, 2, 17, 255, 4097]))
    pad = draw(st.integers(0, 2))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    logits = (torch.randn(B, L + pad, V, generator=gen, dtype=torch.float64)
              * draw(st.sampled_from([0.1, 1.0, 30.0]))).to(dtype)[:, pad:, :]
    if draw(st.booleans()):
        logits = logits.transpose(0, 1)
    ignore_index = draw(st.sampled_from([-100, 0]))
    labels = torch.randint(0, V, logits.shape[:-1], generator=gen)
    labels[torch.rand(labels.shape, generator=gen) < 0.3] = ignore_index
    flags = draw(st.sampled_from([(False, False), (True, False), (True, True)]))
    return (logits, labels.to(draw(st.sampled_from([torch.int32, torch.int64]))),
            draw(st.sampled_from([1.0, 0.3, 2.5])), ignore_index, flags, draw(st.booleans()))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_eager_path_matches_registered_op_property(case):
    logits, labels, temperature, ignore_index, (with_entropy, with_stats), inplace = case
    kw = dict(with_entropy=with_entropy, with_stats=with_stats, inplace=inplace,
              temperature=temperature, ignore_index=ignore_index)
    eager = _run("eager", logits, labels, **kw)
    op = _run("op", logits, labels, **kw)
    _assert_same(eager[0], op[0])
    assert torch.equal(bits(eager[1]), bits(op[1]))


def _truncated(path: str, logits: torch.Tensor, labels: torch.Tensor, filters: dict,
               with_entropy: bool) -> tuple[list[torch.Tensor | None], torch.Tensor]:
    """(logprobs, entropy, lse) and the gradient wrt the logits of a filtered call, by
    token_logprobs (``"eager"``) or by the registered op under autograd (``"op"``)."""
    from rlkern.ops.logprobs import rows3d
    from rlkern.ops.truncated_logprobs import row_filters

    x = logits.detach().clone().requires_grad_()
    if path == "eager":
        out = rlkern.token_logprobs(x, labels, temperature=0.9, return_entropy=with_entropy,
                                    **filters)
        outs = [out.logprobs, out.entropy, out.lse]
    else:
        temp, k, p, mp = row_filters(x, 0.9, filters.get("top_k"), filters.get("top_p"),
                                     filters.get("min_p"), filters.get("filter_order",
                                                                       "top_k_first"))
        lp, ent, lse = torch.ops.rlkern.truncated_logprobs_fwd(
            rows3d(x), labels.reshape(-1).to(torch.int64), temp, k, p, mp,
            filters.get("filter_order") == "joint", -100, with_entropy, "cpu")
        lead = x.shape[:-1]
        outs = [lp.view(lead), ent.view(lead) if with_entropy else None, lse.view(lead)]
    gen = torch.Generator().manual_seed(5)
    loss = 0
    for t in outs:
        if t is not None:
            w = torch.randn(t.shape, generator=gen, dtype=t.dtype)
            loss = loss + torch.where(torch.isfinite(t), t * w, 0).sum()
    loss.backward()
    return [None if t is None else t.detach() for t in outs], x.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("filters", [{"top_k": 5}, {"top_p": 0.8}, {"min_p": 0.05},
                                     {"top_k": 7, "top_p": 0.9, "filter_order": "joint"}])
@pytest.mark.parametrize("with_entropy", [False, True])
def test_truncated_eager_path_matches_registered_op(dtype, filters, with_entropy):
    logits = (_layout("trl_slice", dtype, V=64).double() * 3).to(dtype)
    labels = _labels(logits, torch.int64, -100)
    eager = _truncated("eager", logits, labels, filters, with_entropy)
    op = _truncated("op", logits, labels, filters, with_entropy)
    for name, a, b in zip(("logprobs", "entropy", "lse"), eager[0], op[0], strict=True):
        assert (a is None) == (b is None), name
        if a is not None:
            assert torch.equal(bits(a), bits(b)), name
    assert torch.equal(bits(eager[1]), bits(op[1]))
    assert eager[1].abs().sum() > 0


def test_truncated_eager_path_is_taken():
    from torch.profiler import profile

    logits = torch.randn(3, 40, requires_grad=True)
    labels = torch.randint(0, 40, (3,))
    with profile() as prof:
        out = rlkern.token_logprobs(logits, labels, top_p=0.9, return_entropy=True)
        (out.logprobs.sum() + out.entropy.sum()).backward()
    names = {e.name for e in prof.events() if e.name.startswith("rlkern::")}
    assert names == {"rlkern::truncated_logprobs_fwd_cpu", "rlkern::truncated_logprobs_bwd_out"}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("label_dtype", [torch.int32, torch.int64])
def test_truncated_fwd_cpu_matches_caller_output_kernel(dtype, label_dtype):
    """The filtered one-call forward against the caller-output kernel op: the same bits (fp32
    kernel outputs, converted for float64 logits), outputs of labels' shape."""
    from rlkern.ops.truncated_logprobs import row_filters

    logits = (torch.randn(2, 3, 90, dtype=torch.float64) * 3).to(dtype)
    labels = _labels(logits, label_dtype, -100).reshape(-1)
    temp, k, p, mp = row_filters(logits, 0.8, 9, 0.85, None, "top_k_first")
    got = torch.ops.rlkern.truncated_logprobs_fwd_cpu(logits, labels, temp, k, p, mp, False,
                                                      -100, True, True)
    want = [torch.empty(6) for _ in range(3)]
    torch.ops.rlkern.truncated_logprobs_fwd_out(logits, labels.to(torch.int64), temp, k, p, mp,
                                                False, -100, want[0], want[1], want[2])
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for name, g, w in zip(("logprobs", "entropy", "lse"), got, want, strict=True):
        assert g.shape == (6,) and g.dtype == acc, name
        assert torch.equal(bits(g), bits(w.to(acc))), name
    lean = torch.ops.rlkern.truncated_logprobs_fwd_cpu(logits, labels, temp, k, p, mp, False,
                                                       -100, False, True)
    assert lean[1].shape == (0,) and lean[1].dtype == acc


def test_truncated_check_messages_as_the_python_layer():
    logits = torch.randn(2, 3, 11)
    labels = torch.zeros(2, 3, dtype=torch.long)
    labels[1, 0] = 11
    cpu, ref = (_error(b, logits, labels, top_p=0.9) for b in ("cpu", "torch"))
    assert cpu.startswith("labels: value 11 at flat position 3 is outside [0, 11)") and ref in cpu
    logits[0, 2] = float("-inf")
    labels[1, 0] = 4
    cpu, ref = (_error(b, logits, labels, top_k=3) for b in ("cpu", "torch"))
    assert cpu.startswith("logits: row 2 (flat index over the leading dims) is all -inf")
    assert ref in cpu
    lp_ops.set_checks(False)
    try:
        out = rlkern.token_logprobs(logits, labels, top_k=3)
    finally:
        lp_ops.set_checks(True)
    assert torch.isnan(out.logprobs[0, 2])
