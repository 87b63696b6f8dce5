"""The advantages family's one schema: the code tables and layouts that
csrc/include/rlkern/group_stats.h defines, as rlkern._C exports them and as Python, the Triton
kernels and the C++ ops read them; the AdvantageConfig that drives every backend; the layering
(ops never lean on the reference outside backend="torch")."""

from __future__ import annotations

import ast
import math
import re
from pathlib import Path

import pytest
import torch

import rlkern
import rlkern.reference.advantages as ref_adv
from rlkern import _C
from rlkern.config import advantages as config
from rlkern.ops import advantages as ops_adv

ROOT = Path(__file__).resolve().parents[1]
HEADER = ROOT / "csrc" / "include" / "rlkern" / "group_stats.h"
# X-macro list of the header → the table it defines.
MACROS = {"ESTIMATORS": "estimator", "STD_MODES": "std", "STD_SCOPES": "std_scope",
          "SINGLETONS": "singleton", "NAN_POLICIES": "nan_policy", "GIGPO_MODES": "gigpo_mode",
          "FLAGS": "flags", "HPARAMS": "hparams", "PARAMS": "params", "MOMENTS": "moments",
          "EXTRAS": "extras"}


def _header_tables() -> dict[str, tuple[str, ...]]:
    """Each RLKERN_ADV_<LIST>(X) of the header, expanded (a list may include another)."""
    text = HEADER.read_text()
    lists: dict[str, list[str]] = {}
    for m in re.finditer(r"#define RLKERN_ADV_(\w+)\(X\)((?:[^\n]*\\\n)*[^\n]*)", text):
        body = re.sub(r"/\*.*?\*/", "", m.group(2).replace("\\\n", " "))
        entries = []
        for item in re.finditer(r'RLKERN_ADV_(\w+)\(X\)|X\(\w+, "(\w+)"\)', body):
            entries.extend(lists[item.group(1)] if item.group(1) else [item.group(2)])
        lists[m.group(1)] = entries
    return {MACROS[name]: tuple(entries) for name, entries in lists.items()}


def test_exported_tables_are_the_header_lists():
    assert {k: tuple(v) for k, v in _C.LAYOUTS["advantages"].items()} == _header_tables()


def test_python_and_triton_tables_equal_the_header():
    header = _header_tables()
    for table, names in (("estimator", config.ESTIMATORS), ("std", config.STD_MODES),
                         ("std_scope", config.STD_SCOPES), ("singleton", config.SINGLETONS),
                         ("nan_policy", config.NAN_POLICIES),
                         ("gigpo_mode", config.GIGPO_MODES)):
        assert names == header[table], table
        assert config.entries(table) == header[table]
        assert [int(config.code(table, name)) for name in names] == list(range(len(names)))
    # each flag is named after its code table and after the AdvantageConfig field it encodes
    fields = set(rlkern.AdvantageConfig.__dataclass_fields__)
    assert set(header["flags"]) <= fields and all(f in header for f in header["flags"])
    assert set(header["hparams"]) <= fields
    assert header["params"][:len(header["hparams"])] == header["hparams"]
    kernels = pytest.importorskip("rlkern.kernels.advantages")
    assert kernels.PARAM_FIELDS == header["params"]
    assert kernels.MOMENT_FIELDS == header["moments"]
    assert kernels.EXTRA_FIELDS == header["extras"]


@pytest.mark.parametrize("estimator", config.ESTIMATORS)
def test_kernel_args_follow_the_header(estimator):
    options = {"lam": 0.5, "kappa": 0.3} if estimator == "xrpo" else {}
    cfg = rlkern.AdvantageConfig(estimator=estimator, eps=1e-4, std="biased",
                                 singleton="verl", nan_policy="omit", **options)
    flags, hparams = cfg.kernel_args()
    header = _header_tables()
    for i, flag in enumerate(header["flags"]):
        assert flags[i] == header[flag].index(getattr(cfg, flag)), flag
    values = dict(zip(header["hparams"], hparams, strict=True))
    assert values["eps"] == 1e-4 and values["r_max"] == 1.0
    assert values["lam"] == (0.5 if estimator == "xrpo" else config.UNLIKELY_LAMBDA)
    back = rlkern.AdvantageConfig.from_kernel_args(flags, hparams)
    assert back.kernel_args() == (flags, hparams)
    assert (back.estimator, back.std, back.singleton, back.nan_policy, back.kappa) == (
        cfg.estimator, cfg.std, cfg.singleton, cfg.nan_policy, cfg.kappa)


def test_config_is_validated_once_and_frozen():
    cfg = rlkern.AdvantageConfig(eps=1)
    assert isinstance(cfg.eps, float)
    with pytest.raises(AttributeError):
        cfg.eps = 0.5  # type: ignore[misc]
    with pytest.raises(ValueError, match="estimator"):
        rlkern.AdvantageConfig(estimator="ppo")
    with pytest.raises(ValueError, match="lam"):
        rlkern.AdvantageConfig(estimator="xrpo", kappa=0.1)
    with pytest.raises(TypeError, match="eps"):
        rlkern.AdvantageConfig(eps="small")


@pytest.mark.parametrize("options", [
    {"eps": 1e-4}, {"eps": 1}, {"estimator": "xrpo", "lam": 0.5, "kappa": 0.25},
    {"estimator": "unlikely"}, {"std": "none", "singleton": "verl", "nan_policy": "omit"},
])
def test_cached_config_is_the_constructors(options):
    want = rlkern.AdvantageConfig(**options)
    for _ in range(2):  # a miss, then a hit
        cfg, flags, hparams = config.config_and_args(**options)
        assert cfg == want and (flags, hparams) == want.kernel_args()
        flags.append(99)  # each call gets its own lists
        hparams[0] = math.nan


@pytest.mark.parametrize("options, error", [
    ({"eps": True}, TypeError), ({"eps": 1.0, "lam": 0.5}, ValueError),
    ({"eps": torch.tensor(1e-4)}, TypeError), ({"eps": math.nan}, ValueError),
    ({"estimator": "ppo"}, ValueError), ({"estimator": "xrpo", "lam": 0.5}, ValueError),
])
def test_cached_config_raises_as_the_constructor(options, error):
    with pytest.raises(error) as direct:
        rlkern.AdvantageConfig(**options)
    for _ in range(2):  # errors are not cached; an equal-valued bool is not a float
        with pytest.raises(error) as cached:
            config.config_and_args(**options)
        assert str(cached.value) == str(direct.value)


def test_cached_config_tells_a_bool_from_an_equal_int():
    assert config.config_and_args(eps=1)[0].eps == 1.0  # cached: True == 1 and hashes alike
    with pytest.raises(TypeError, match="eps"):
        config.config_and_args(eps=True)


def _cpu_outs(n: int) -> tuple[torch.Tensor, ...]:
    return torch.empty(n), torch.empty(n), torch.empty(n), torch.empty(n, dtype=torch.bool)


def test_cpp_ops_reject_bad_codes_with_a_clear_error():
    scores = torch.rand(8)
    flags, hparams = rlkern.AdvantageConfig().kernel_args()
    estimator = config.codes().flags.estimator
    bad = list(flags)
    bad[estimator] = 42
    with pytest.raises(ValueError, match=r"estimator: 42 is not a code of the estimator table"):
        torch.ops.rlkern.group_advantages_out(scores, None, 4, None, None, bad, hparams,
                                              *_cpu_outs(8))
    with pytest.raises(ValueError, match="flags: expected"):
        torch.ops.rlkern.group_advantages_out(scores, None, 4, None, None, flags[:-1], hparams,
                                              *_cpu_outs(8))
    with pytest.raises(ValueError, match="hparams: expected"):
        torch.ops.rlkern.group_advantages_out(scores, None, 4, None, None, flags, hparams[:1],
                                              *_cpu_outs(8))
    nan_policy = config.codes().flags.nan_policy
    bad = list(flags)
    bad[nan_policy] = -1
    keys, moments = torch.empty(8, dtype=torch.long), torch.empty(8, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="nan_policy: -1 is not a code"):
        torch.ops.rlkern.group_moments_out(scores, None, 4, bad, keys, moments,
                                           torch.empty(1, dtype=torch.long))
    with pytest.raises(ValueError, match="step_mode: 2 is not a code of the gigpo_mode table"):
        torch.ops.rlkern.gigpo_advantages_out(scores, scores, torch.arange(8), torch.arange(8),
                                              1.0, 0, 2, 1e-6, *_cpu_outs(8)[:3])
    opo = rlkern.AdvantageConfig(estimator="opo").kernel_args()
    with pytest.raises(ValueError, match="group statistics support"):
        torch.ops.rlkern.group_finish_out(scores, torch.zeros(8, dtype=torch.long),
                                          torch.zeros(1, 5, dtype=torch.float64), *opo,
                                          *_cpu_outs(8))


def test_every_backend_gets_the_configs_kernel_args(monkeypatch):
    seen = {}

    def record(backend):
        def kernel(scores, group_ids, group_size, weights, loglik, flags, hparams, outs):
            seen[backend] = (list(flags), list(hparams))
            for out in outs:
                out.zero_()
        return kernel

    for backend in ops_adv._KERNELS:
        monkeypatch.setitem(ops_adv._KERNELS, backend, record(backend))
    kwargs = {"estimator": "rloo", "eps": 1e-3, "singleton": "verl", "nan_policy": "omit"}
    want = rlkern.AdvantageConfig(**kwargs).kernel_args()
    rlkern.group_advantages(torch.rand(8), group_size=4, backend="cpu", **kwargs)
    rlkern.group_advantages(torch.rand(8), group_size=4, backend="torch", **kwargs)
    assert seen == {"cpu": want, "torch": want}


def _raise(*args, **kwargs):
    raise AssertionError("a non-torch backend called the reference")


@pytest.fixture
def no_reference(monkeypatch):
    """Every reference function of the family raises when called."""
    for name in ("group_advantages_rows_reference", "group_moments_reference", "chan_merge",
                 "merge_all", "advantages_from_moments_reference", "group_advantages_reference"):
        monkeypatch.setattr(ref_adv, name, _raise)


def test_cpu_backend_never_calls_the_reference(no_reference):
    scores = torch.rand(12)
    ids = torch.tensor([3, 1, 3, 1, 7, 7, 7, 1, 3, 3, 1, 9])
    for estimator in config.ESTIMATORS:
        extra = {}
        if estimator == "opo":
            extra["lengths"] = torch.arange(12)
        if estimator in ("unlikely", "xrpo"):
            extra = {"old_logprobs": -torch.rand(12, 3), "mask": torch.ones(12, 3)}
        if estimator == "xrpo":
            extra.update(lam=0.5, kappa=0.3)
        rlkern.group_advantages(scores, group_ids=ids, estimator=estimator, **extra)
    with pytest.raises(AssertionError, match="reference"):
        rlkern.group_advantages(scores, group_ids=ids, backend="torch")


def test_group_stats_runs_on_the_kernels(no_reference):
    """GroupStats' moments, merges and advantages on CPU are the C++ ops' (the reference
    raises here), and still equal the one-shot result."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 9, (60,), generator=gen) * 1000 - 7
    scores = torch.randn(60, generator=gen)
    scores[::11] = math.nan
    workers = [rlkern.GroupStats(nan_policy="omit").update(scores[i::3], ids[i::3])
               for i in range(3)]
    stats = workers[0].merge(workers[1]).merge(workers[2])
    for kwargs in ({}, {"estimator": "rloo", "singleton": "verl"}, {"std_scope": "batch"},
                   {"estimator": "gpg"}, {"estimator": "ngrpo", "std": "biased"}):
        got = stats.advantages(scores, ids, **kwargs)
        want = rlkern.group_advantages(scores, group_ids=ids, nan_policy="omit", **kwargs)
        for a, b in zip(got, want, strict=True):
            if a.dtype == torch.bool:
                assert torch.equal(a, b)
            else:
                torch.testing.assert_close(a, b, equal_nan=True, rtol=1.2e-7, atol=1e-6)
    with pytest.raises(AssertionError, match="reference"):
        stats.advantages(scores, ids, backend="torch")


def _imports(path: Path, *, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


@pytest.mark.parametrize("name", ["advantages", "advantages_segmented", "group_stats",
                                  "token_advantages"])
def test_ops_do_not_import_the_reference(name):
    path = ROOT / "python" / "rlkern" / "ops" / f"{name}.py"
    assert not any(m.startswith("rlkern.reference") for m in _imports(path, top_level_only=True))


@pytest.mark.parametrize("name", ["advantages", "token_advantages"])
def test_reference_does_not_import_ops(name):
    path = ROOT / "python" / "rlkern" / "reference" / f"{name}.py"
    assert not any(m.startswith("rlkern.ops") for m in _imports(path, top_level_only=False))
