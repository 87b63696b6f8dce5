"""The GRPO demo (``rlkern demo``, ``examples/grpo_toy.py``): its reward and a few real steps."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("matplotlib",
                    reason="the demo writes its reward and ratio figures with matplotlib")

import rlkern
from rlkern import demo
from rlkern.cli import main as cli_main
from rlkern.demo import EOS, DemoConfig, toy_reward, toy_target

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tiny(**kw) -> DemoConfig:
    """A few seconds' worth of the loop: 2 prompts × 4 members, a 1-layer 16-wide Llama."""
    base = dict(steps=2, prompts_per_step=2, group_size=4, digits=2, hidden_size=16, layers=1,
                heads=2, quiet=True, out=None)
    base.update(kw)
    return DemoConfig(**base)


def test_target_per_task():
    assert toy_target([1, 2, 3], "reverse") == [3, 2, 1, EOS]
    assert toy_target([1, 2, 3], "copy") == [1, 2, 3, EOS]
    assert toy_target([3, 0, 2], "sort") == [0, 2, 3, EOS]
    with pytest.raises(ValueError, match="unknown task"):
        toy_target([1], "add")


@pytest.mark.parametrize(
    ("digits", "completion", "task", "expected"),
    [
        ([1, 2, 3], [3, 2, 1, EOS], "reverse", 1.0),    # right answer, then the end token
        ([1, 2, 3], [3, 2, 1, 7], "reverse", 0.75),     # no end token where it belongs
        ([1, 2, 3], [1, 2, 3, EOS], "reverse", 0.5),    # copied: the middle digit and EOS match
        ([1, 2, 3], [EOS], "reverse", 0.0),             # stopped at once
        ([1, 2, 3], [3, EOS], "reverse", 0.25),         # stopped early: later positions missed
        ([1, 2, 3], [], "reverse", 0.0),
        ([4, 4], [4, 4, EOS], "copy", 1.0),
        ([4, 7], [7, 4, EOS], "copy", 1 / 3),           # position by position, not a set
        ([9, 0, 5], [0, 5, 9, EOS], "sort", 1.0),
        ([9, 0, 5], [0, 9, 5, EOS], "sort", 0.5),
    ],
)
def test_reward_on_hand_made_examples(digits, completion, task, expected):
    assert toy_reward(digits, completion, task) == pytest.approx(expected)


def test_untrained_policy_reward_is_low_but_not_zero():
    # What the task promises GRPO at step 1 (rewards are measured before the step's update):
    # the untrained model samples nearly uniformly over 12 tokens, about 1/12 per position.
    res = demo.run(DemoConfig(steps=1, out=None, quiet=True))
    assert 0.02 < res.rewards[0] < 0.2


def test_few_steps_finite_losses_and_png(tmp_path):
    out = tmp_path / "curve" / "reward.png"
    threads = torch.get_num_threads()
    res = demo.run(tiny(steps=3, out=str(out)))
    assert len(res.rewards) == len(res.losses) == len(res.seconds) == 3
    assert all(math.isfinite(x) for x in res.losses)
    assert all(0.0 <= r <= 1.0 for r in res.rewards)
    assert any(x != 0.0 for x in res.losses)  # some group had a reward spread
    assert res.png == str(out)
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert torch.get_num_threads() == threads  # the thread setting is restored


@pytest.mark.skipif(not hasattr(rlkern, "linear_grpo_loss"), reason="no linear_grpo_loss")
def test_fused_and_two_op_losses_train_alike():
    # Same seed → same model, prompts and samples; the fused loss and linear_logprobs +
    # policy_loss must then give the same loss and the same update, step after step.
    fused = demo.run(tiny(steps=3, loss="fused"))
    two_op = demo.run(tiny(steps=3, loss="two-op"))
    assert fused.loss_path == "fused" and two_op.loss_path == "two-op"
    assert fused.rewards == two_op.rewards
    assert fused.losses == pytest.approx(two_op.losses, rel=1e-4, abs=1e-6)


def test_all_schedules_sample_the_same_batch():
    # generate_groups' completions do not depend on the schedule, so neither does training.
    runs = [demo.run(tiny(schedule=s, loss="two-op")) for s in ("length_aware", "micro_group")]
    assert runs[0].rewards == runs[1].rewards
    assert runs[0].losses == pytest.approx(runs[1].losses, rel=1e-5, abs=1e-7)


def test_cli_demo_writes_png(tmp_path, capsys):
    out = tmp_path / "r.png"
    rc = cli_main(["demo", "--steps", "2", "--prompts", "2", "-G", "4", "--digits", "2",
                   "--hidden-size", "16", "--layers", "1", "--heads", "2", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "step    1  reward" in text and "step    2  reward" in text
    assert "done: 2 steps" in text
    assert out.read_bytes()[:8] == PNG_MAGIC


def test_bad_options_raise():
    with pytest.raises(ValueError, match="unknown loss"):
        demo.run(tiny(loss="three-op"))
    with pytest.raises(ValueError, match="unknown task"):
        demo.run(tiny(task="add"))


def test_example_script_runs(tmp_path, capsys):
    # examples/grpo_toy.py is a thin wrapper over rlkern.demo: it must keep working with it.
    path = Path(__file__).resolve().parents[1] / "examples" / "grpo_toy.py"
    spec = importlib.util.spec_from_file_location("grpo_toy", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "r.png"
    rc = module.main(["--steps", "1", "--prompts", "2", "-G", "4", "--hidden-size", "16",
                      "--layers", "1", "--heads", "2", "--loss", "two-op", "--out", str(out)])
    assert rc == 0
    assert "loss=two-op" in capsys.readouterr().out
    assert out.read_bytes()[:8] == PNG_MAGIC


def test_top_p_logs_importance_ratios():
    """With --top-p the loop logs the mean importance ratio of the trainer's log-probs to the
    sampler's processed ones: below 1 over the full vocabulary (≈ the kept mass), 1 under the
    same truncation (rlkern.token_logprobs(top_p=...))."""
    res = demo.run(tiny(top_p=0.8))
    assert len(res.ratio_full) == len(res.ratio_truncated) == 2
    for full, trunc in zip(res.ratio_full, res.ratio_truncated, strict=True):
        assert 0.5 < full < 0.99
        assert abs(trunc - 1.0) < 1e-3
    plain = demo.run(tiny(steps=1))
    assert plain.ratio_full == plain.ratio_truncated == []


def test_top_p_logs_the_samplers_kept_mass():
    """kept_mass is the sampler's own Σ_K p / Σ_V p of each sampled token's row (raw minus
    processed log-prob); the full-vocabulary ratio is that same mass to rounding, since the
    trainer's logits equal the rollout's up to rounding before the first update."""
    res = demo.run(tiny(top_p=0.8))
    assert len(res.kept_mass) == 2
    for mass, full in zip(res.kept_mass, res.ratio_full, strict=True):
        assert 0.5 < mass < 0.99
        assert mass == pytest.approx(full, abs=1e-4)
    assert demo.run(tiny(steps=1)).kept_mass == []


def test_ratio_figure_of_a_tiny_run(tmp_path):
    """--ratio-out: the importance-ratio figure of a few-step top-p run is written as a PNG
    (skipped, with its reason, where matplotlib is missing: the module skips then)."""
    out = tmp_path / "fig" / "ratio.png"
    res = demo.run(tiny(steps=3, top_p=0.9, ratio_out=str(out)))
    assert res.ratio_png == str(out)
    assert out.read_bytes()[:8] == PNG_MAGIC
    again = tmp_path / "again.png"
    assert demo.plot_ratios(res, again, date="2026-12-05") == again
    assert again.read_bytes()[:8] == PNG_MAGIC


def test_ratio_figure_errors(tmp_path):
    with pytest.raises(ValueError, match="only a run with top_p"):
        demo.run(tiny(ratio_out=str(tmp_path / "r.png")))
    plain = demo.run(tiny(steps=1))
    with pytest.raises(ValueError, match="no importance ratios to plot"):
        demo.plot_ratios(plain, tmp_path / "r.png")
    with pytest.raises(ValueError, match="no importance ratios"):
        demo.ratio_table(plain)
    assert not (tmp_path / "r.png").exists()


def test_ratio_table_rows_and_steps():
    res = demo.run(tiny(steps=3, top_p=0.9))
    lines = demo.ratio_table(res).splitlines()
    assert lines[0] == "| step | 1 | 2 | 3 | mean of 3 |"
    assert lines[1] == "|---|---|---|---|---|"
    full, trunc, mass = (line.split(" | ") for line in lines[2:])
    assert full[0] == "| full-vocabulary log-probs"
    assert full[1:4] == [f"{x:.3f}" for x in res.ratio_full]
    assert trunc[0] == "| `token_logprobs(top_p=0.9)`"
    assert trunc[-1] == f"{sum(res.ratio_truncated) / 3:.4f} |"
    assert mass[0] == "| kept mass (sampler)"
    # A 100-step run shows step 1 and every tenth step, as docs/sampling.md's table.
    assert demo._ratio_steps(100) == [1, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
    assert demo._ratio_steps(5) == [1, 2, 3, 4, 5]


def test_cli_demo_ratio_out(tmp_path, capsys):
    out = tmp_path / "ratio.png"
    rc = cli_main(["demo", "--steps", "2", "--prompts", "2", "-G", "4", "--hidden-size", "16",
                   "--layers", "1", "--heads", "2", "--top-p", "0.9", "--out", "",
                   "--ratio-out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| step | 1 | 2 | mean of 2 |" in text
    assert f"importance-ratio figure: {out}" in text
    assert out.read_bytes()[:8] == PNG_MAGIC


def test_missing_matplotlib_is_a_clear_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(ImportError, match="needs matplotlib: pip install matplotlib"):
        demo._pyplot()
