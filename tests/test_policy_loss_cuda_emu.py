"""The CUDA policy-loss kernels (csrc/cuda/policy_loss.cu), executed on the CPU by the CUDA
emulator of tests/cuda_emu, against the float64 statement of the same per-row statistics and
per-token derivatives (the op layer's torch backend on the fp32 inputs upcast).

The launchers ``rlkern_policy_loss_fwd_cuda`` / ``rlkern_policy_loss_bwd_cuda`` /
``rlkern_kl_penalty_cuda`` are called through ctypes on CPU tensors, as
csrc/cuda/policy_loss_ops.cpp calls them on CUDA tensors. Outputs live inside guard bands that
must stay untouched.
Skipped, with the reason, when no host C++ compiler is found.
"""

from __future__ import annotations

import ctypes

import pytest
import torch

from cuda_emu import EmulatedLibrary
from cuda_emu.testing import CSRC, Guarded, emulated
from policy_loss_cases import CASES, call_kwargs, make_inputs
from rlkern.config.layout import layout
from rlkern.ops.policy_loss import prepare
from rlkern.ops.policy_loss.register import split_inputs

c_p, c_i64, c_i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
L = layout("policy_loss")


class RowArray(ctypes.Structure):
    """rlkern::policy_loss::RowArray of rlkern/policy_loss.h."""

    _fields_ = [("p", c_p), ("stride", c_i64)]


class Inputs(ctypes.Structure):
    """rlkern::policy_loss::Inputs (RlkernPolicyLossInputs of rlkern/cuda_launchers.h)."""

    _fields_ = [("B", c_i64), ("T", c_i64), ("f64", c_i32), ("adv_per_token", c_i32),
                ("logp", RowArray), ("old", RowArray), ("adv", RowArray), ("mask", RowArray),
                ("opt", RowArray * len(L.inputs))]


@pytest.fixture(scope="module")
def emu() -> EmulatedLibrary:
    lib = emulated(CSRC / "cuda" / "policy_loss.cu")
    f = lib.lib
    f.rlkern_policy_loss_fwd_cuda.argtypes = [ctypes.POINTER(Inputs), c_p, c_p, c_p, c_p]
    f.rlkern_policy_loss_bwd_cuda.argtypes = [ctypes.POINTER(Inputs), c_p, c_p, c_p, c_p, c_p,
                                              c_p, c_p]
    f.rlkern_kl_penalty_cuda.argtypes = [c_p, c_p, c_p, c_p, c_i64, ctypes.c_int, ctypes.c_int,
                                         ctypes.c_double, ctypes.c_double, c_p]
    return lib


def _guarded(shape, dtype) -> tuple[Guarded, torch.Tensor]:
    out = Guarded(shape, dtype)
    return out, out.view


def _untouched(out: Guarded) -> bool:
    return out.untouched()


def _inputs_struct(p) -> tuple[Inputs, list]:
    keep = []
    row = lambda t: RowArray(None, 0) if t is None else RowArray(
        t.data_ptr(), t.stride(0) if t.dim() == 2 else 0)
    adv = row(p.adv) if p.adv.dim() == 2 else RowArray(p.adv.data_ptr(), 1)
    opt = (RowArray * len(L.inputs))(*(row(t) for t in p.inputs))
    s = Inputs(p.mask.shape[0], p.mask.shape[1], 0, int(p.adv.dim() == 2), row(p.lp),
               row(p.old), adv, row(p.mask), opt)
    keep += [p]
    return s, keep


def _prepare(name, B, T, seed):
    case = CASES[name]
    inp = make_inputs(B, T, torch.float32, seed=seed)
    args, kw = call_kwargs(case, inp)
    kw = {k: v for k, v in kw.items() if k not in ("num_tokens", "num_seqs")}
    return prepare(*args, config=case.config, backend="cpu", **kw)


def _upcast(p):
    """The op arguments of the torch backend on the inputs upcast to float64."""
    d = lambda t: None if t is None else t.double()
    return (d(p.lp), d(p.old), d(p.adv), p.mask,
            *split_inputs([d(t) for t in p.inputs]))


NAMES = ["ppo", "ppo-clip-higher-dual", "ppo-delta", "ppo-adv-per-token", "gspo", "ppo-seq-trl",
         "cispo-verl", "cispo-trl", "sapo", "sapo-seq", "gmpo", "gmpo-adv-per-token-rollout",
         "reinforce", "gvpo", "kl-k3", "kl-abs+", "kl-bias-seq-full", "kl-bias-gspo",
         "entropy-mask", "rollout-token_mask", "rollout-sequence_truncate", "token-weights",
         "all-addons", "trl-preset", "verl-preset", "vespo", "vespo-params-adv-per-token",
         "vespo-rollout-truncate", "vespo-rollout-mask-addons", "trl-preset-vespo"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("B,T", [(6, 45), (3, 1), (12, 7)])
def test_forward_and_backward(emu, name, B, T):
    p = _prepare(name, B, T, seed=B * T)
    if p.cfg.policy_loss == "gvpo" and B % p.cfg.group_size:
        pytest.skip("gvpo needs whole groups")
    s, keep = _inputs_struct(p)
    flags = torch.tensor(p.flags, dtype=torch.int32)
    hp = torch.tensor(p.hparams, dtype=torch.float64)
    buf, stats = _guarded((len(L.row_stats), B), torch.float64)
    rc = emu.lib.rlkern_policy_loss_fwd_cuda(ctypes.byref(s), flags.data_ptr(), hp.data_ptr(),
                                             stats.data_ptr(), None)
    assert rc == 0, emu.last_error()
    assert _untouched(buf), "row_stats: written outside"
    up = _upcast(p)
    _, expected = torch.ops.rlkern.policy_loss_fwd(*up, p.flags, p.hparams, "torch")
    # fp32 kernel vs the float64 statement: relative 1e-5 of each statistic's scale
    scale = expected.abs().amax(dim=1, keepdim=True).clamp(min=1.0)
    finite = torch.isfinite(expected)
    assert torch.equal(finite, torch.isfinite(stats))
    err = ((stats - expected).abs() / scale)[finite]
    assert float(err.max()) < 2e-5, (name, (stats - expected)[finite].abs().max())

    grad_rows = torch.randn(len(L.row_grads), B, dtype=torch.float64,
                            generator=torch.Generator().manual_seed(1))
    gbuf, grad = _guarded((B, T), torch.float32)
    ebuf, grad_ent = _guarded((B, T), torch.float32)
    rc = emu.lib.rlkern_policy_loss_bwd_cuda(
        ctypes.byref(s), flags.data_ptr(), hp.data_ptr(), stats.data_ptr(),
        grad_rows.data_ptr(), grad.data_ptr(),
        grad_ent.data_ptr() if p.get("entropy") is not None else None,
        None)
    assert rc == 0, emu.last_error()
    assert _untouched(gbuf)
    g_ref, ge_ref = torch.ops.rlkern.policy_loss_bwd(*up, expected, grad_rows, p.flags,
                                                     p.hparams, True, "torch")
    gs = float(g_ref.abs().max()) if g_ref.numel() else 1.0
    torch.testing.assert_close(grad.double(), g_ref, rtol=2e-5, atol=2e-5 * max(gs, 1e-3))
    if p.get("entropy") is not None:
        assert _untouched(ebuf)
        torch.testing.assert_close(grad_ent.double(), ge_ref)
    del keep


def test_kl_penalty(emu):
    g = torch.Generator().manual_seed(0)
    lp = -torch.rand(1000, generator=g) * 4
    ref = lp + torch.randn(1000, generator=g) * 3
    grad = torch.randn(1000, generator=g)
    for kind in (1, 2, 3, 4):
        for st in (0, 1):
            for clamps in ((20.0, 10.0), (float("inf"), float("inf"))):
                for with_grad in (False, True):
                    buf, out = _guarded((1000,), torch.float32)
                    rc = emu.lib.rlkern_kl_penalty_cuda(
                        lp.data_ptr(), ref.data_ptr(), grad.data_ptr() if with_grad else None,
                        out.data_ptr(), 1000, kind, st, *clamps, None)
                    assert rc == 0 and _untouched(buf)
                    args = (lp.double(), ref.double(), kind, bool(st), *clamps)
                    want = (torch.ops.rlkern.kl_penalty_bwd(args[0], args[1], grad.double(),
                                                            *args[2:], "torch")
                            if with_grad else
                            torch.ops.rlkern.kl_penalty_fwd(*args, "torch"))
                    torch.testing.assert_close(out.double(), want, rtol=2e-5, atol=1e-6)


def test_invalid_arguments(emu):
    p = _prepare("ppo", 2, 3, seed=0)
    s, keep = _inputs_struct(p)
    hp = torch.tensor(p.hparams, dtype=torch.float64)
    stats = torch.empty(len(L.row_stats), 2, dtype=torch.float64)
    bad = torch.zeros(len(L.flags), dtype=torch.int32)
    bad[L.flags.loss_kind] = len(L.loss_kinds) + 3  # no such loss kind
    assert emu.lib.rlkern_policy_loss_fwd_cuda(ctypes.byref(s), bad.data_ptr(), hp.data_ptr(),
                                               stats.data_ptr(), None) == -2
    flags = torch.zeros(len(L.flags), dtype=torch.int32)
    flags[L.flags.kl_kind] = L.kl_kinds.k3  # KL without a reference
    assert emu.lib.rlkern_policy_loss_fwd_cuda(ctypes.byref(s), flags.data_ptr(),
                                               hp.data_ptr(), stats.data_ptr(), None) == -3
    del keep
