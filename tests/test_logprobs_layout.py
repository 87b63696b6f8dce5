"""The layouts of the logprobs family are defined once, in csrc/include/rlkern/logprobs.h, and
every other layer reads them: rlkern._C exports them, rlkern.config reads them, the compiled ops
index their lists by them, the Triton launcher takes its outputs in their order.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import torch

import rlkern
from rlkern import backends
from rlkern.config.layout import entries, layout
from rlkern.config.logprobs import STATS_OUTPUTS, linear_stats, output_names, outputs

HEADER = Path(__file__).resolve().parent.parent / "csrc" / "include" / "rlkern" / "logprobs.h"


def header_list(macro: str, path: Path = HEADER) -> list[str]:
    """The entry names of the X-macro list ``macro`` as the header writes them."""
    text = path.read_text()
    body = re.search(rf"#define {macro}\(X\)((?:[^\n]*\\\n)*[^\n]*)", text)
    assert body is not None, f"{macro} not found in {path.name}"
    return re.findall(r'X\(\s*\w+\s*,\s*"(\w+)"\s*\)', body.group(1))


def test_python_layouts_equal_the_header():
    assert list(outputs().__members__) == header_list("RLKERN_LOGPROBS_OUTPUTS")
    assert list(linear_stats().__members__) == header_list("RLKERN_LINEAR_LOGPROBS_STATS")
    assert [int(o) for o in outputs()] == list(range(len(outputs())))
    assert output_names() == tuple(outputs().__members__)
    assert set(STATS_OUTPUTS) <= set(output_names())
    assert sorted(layout("logprobs").__dict__) == ["outputs"]
    assert sorted(layout("linear_logprobs").__dict__) == ["stats"]


def test_entries_are_the_layout_tables_as_plain_dicts():
    """entries(family, table) holds what layout(family).<table> holds: every table of every
    family, names and indices in the same order; an unknown family raises layout()'s error."""
    from rlkern import _C

    for family, tables in _C.LAYOUTS.items():
        for table in tables:
            enum_table = getattr(layout(family), table)
            got = entries(family, table)
            assert type(got) is dict
            assert list(got.items()) == [(m.name, int(m)) for m in enum_table]
    with pytest.raises(KeyError, match="no layout for op family"):
        entries("no_such_family", "inputs")


def test_every_layer_follows_the_outputs_layout():
    # The public NamedTuple has one field per output (in its own, public order).
    assert set(rlkern.TokenLogprobs._fields) == set(output_names())
    # The functional op returns them in the layout's order.
    logits, labels = torch.randn(2, 3, 11), torch.randint(0, 11, (2, 3))
    out = torch.ops.rlkern.logprobs_fwd(logits, labels, 1.0, -100, True, True, False, "cpu")
    ref = rlkern.reference.token_logprobs_reference(logits, labels)
    assert len(out) == len(outputs())
    for o in outputs():
        torch.testing.assert_close(out[o], ref[o.name], rtol=1e-5, atol=1e-5)
    # The Triton launcher's output arguments, after the logits and labels, are in that order.
    pytest.importorskip("triton")
    kernels = backends.triton_module("logprobs", torch.device("cpu"))
    params = list(inspect.signature(kernels.logprobs_fwd).parameters)
    assert params[2:2 + len(outputs())] == list(output_names())


def test_compiled_ops_check_their_lists():
    logits, labels = torch.randn(2, 3, 11), torch.randint(0, 11, (2, 3))
    rows = lambda: torch.empty(2, 3)
    outs = [rows() for _ in outputs()]
    with pytest.raises(RuntimeError, match=rf"outputs: expected {len(outputs())} entries"):
        torch.ops.rlkern.logprobs_fwd_out(logits, labels, 1.0, -100, outs[:-1])
    missing = list(outs)
    missing[outputs().lse] = None
    with pytest.raises(RuntimeError, match="logprobs and lse are required"):
        torch.ops.rlkern.logprobs_fwd_out(logits, labels, 1.0, -100, missing)
    pair = list(outs)
    pair[outputs().sum_p_sq] = None
    with pytest.raises(RuntimeError, match="self_certainty and sum_p_sq are computed together"):
        torch.ops.rlkern.logprobs_fwd_out(logits, labels, 1.0, -100, pair)
    grads = [None] * len(outputs())
    grads[outputs().self_certainty] = rows()
    with pytest.raises(RuntimeError, match="grad_self_certainty: self_certainty is not differ"):
        torch.ops.rlkern.logprobs_bwd_out(logits, labels, outs, grads, 1.0, -100,
                                          torch.empty_like(logits))
    wrong = list(outs)
    wrong[outputs().entropy] = torch.empty(5)
    with pytest.raises(RuntimeError, match="entropy: expected a contiguous tensor of 6 elements"):
        torch.ops.rlkern.logprobs_fwd_out(logits, labels, 1.0, -100, wrong)


def test_linear_stats_layout_is_the_epilogue_state():
    """The CPU epilogue's running state has one column per layout entry, filled as named: after
    one tile holding every label, m is the row max, s = Σ exp(z − m), t = Σ exp(z − m)(z − m)
    and x_y the label's logit."""
    S = linear_stats()
    tile = torch.randn(4, 9, dtype=torch.float64)
    labels = torch.tensor([0, 3, 8, 5])
    stats = torch.zeros(4, len(S), dtype=torch.float64)
    stats[:, S.m], stats[:, S.x_y] = -float("inf"), float("nan")
    torch.ops.rlkern.linear_logprobs_tile_fwd_(tile, labels, 0, 1.0, -100, True, stats)
    m = tile.max(1).values
    e = torch.exp(tile - m[:, None])
    torch.testing.assert_close(stats[:, S.m], m)
    torch.testing.assert_close(stats[:, S.s], e.sum(1))
    torch.testing.assert_close(stats[:, S.t], (e * (tile - m[:, None])).sum(1))
    torch.testing.assert_close(stats[:, S.x_y], tile.gather(1, labels[:, None])[:, 0])
    with pytest.raises(RuntimeError, match=rf"stats: expected a \(n, {len(S)}\) tensor"):
        torch.ops.rlkern.linear_logprobs_tile_fwd_(tile, labels, 0, 1.0, -100, True,
                                                   stats[:, :-1].contiguous())
