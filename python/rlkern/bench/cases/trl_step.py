"""Benchmark case ``trl_step``: one optimizer step of TRL's real ``GRPOTrainer``, end to end
(generation, scoring, the loss, its backward and the optimizer), with and without
``rlkern.integrations.trl``.

The model is randomly initialised from a config of Qwen3-0.6B's shape family (vocabulary
151,936, tied embeddings, hidden 512, 2 layers by default) and saved to a temporary directory
with a word-level tokenizer over the same vocabulary: no network, no downloads. Each step
generates ``G`` completions of exactly ``K`` tokens (``min_new_tokens = K``) for one prompt.

Implementations (each its own trainer over the same saved model, same seed):

* ``rlkern`` — ``GRPOTrainer`` with :func:`rlkern.integrations.trl.apply` in force;
* ``trl`` — TRL's own methods;
* ``rlkern + LoRA`` / ``trl + LoRA`` — the same with a peft LoRA adapter (rank 16 on the
  attention and MLP projections; the LM head stays frozen, as TRL requires).

One call runs one optimizer step: every trainer runs ``trainer.train()`` on a thread of its
own, held by a callback at each step's start until the call releases it; the call returns
when the step ends, with that step's loss (the agreement check compares the first steps,
taken from identical weights with identical random state: the global RNG is re-seeded with
the step's index before each step). Patching is class-wide, so each call applies or removes
it around its own step. Peak RSS: Linux's ``VmHWM`` of the process, reset
(``/proc/self/clear_refs``) before each step and read after it; the summary gives its median
over each implementation's steps after the first (the process's resident memory, models and
optimizer state included). The runner's own "peak extra" figure is measured on one more step.

``--quick``: a tiny vocabulary (512), hidden 64, ``G = 4``, ``K = 16``: a functional test.
"""

from __future__ import annotations

import atexit
import math
import statistics
import tempfile
import threading
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from rlkern.bench.cases import Case, CaseOptions, Impl, Outputs, Size, Tolerance, register
from rlkern.bench.kit import Peer, RlkernBackend

V_QWEN = 151936
FULL_SIZES = [Size({"V": V_QWEN, "H": 512, "L": 2, "G": 8, "K": 256})]
QUICK_SIZES = [Size({"V": 512, "H": 64, "L": 2, "G": 4, "K": 16})]
PROMPT_WORDS = 16
SEED = 0

TRL = Peer("trl", lambda: __import__("trl"), hint="optional: pip install -e '.[parity]'")
PEFT = Peer("peft", lambda: __import__("peft"), hint="optional: pip install peft")

#: The logged values of a step compared between the implementations' first steps.
CHECKED = ("loss", "reward", "entropy")
#: name → (patched, LoRA)
IMPLS: dict[str, tuple[bool, bool]] = {"rlkern": (True, False), "trl": (False, False),
                                       "rlkern + LoRA": (True, True),
                                       "trl + LoRA": (False, True)}


class _StopTrainingError(Exception):
    """Raised in a held trainer's thread to end its ``train()``."""


def _status_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def save_model(path: str, size: Size) -> None:
    """A random model of Qwen3-0.6B's family (``V``, hidden ``H``, ``L`` layers; heads of 64)
    and a word-level tokenizer over its ``V`` ids (``<pad>``, ``<s>``, ``</s>``, ``w0`` …)."""
    import tokenizers
    import transformers

    V, H = size["V"], size["H"]
    words = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(V - 3)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=words, unk_token="<pad>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    ).save_pretrained(path)
    torch.manual_seed(SEED)
    heads = max(1, H // 64)
    config = transformers.Qwen3Config(
        vocab_size=V, hidden_size=H, intermediate_size=3 * H, num_hidden_layers=size["L"],
        num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), head_dim=H // heads,
        max_position_embeddings=PROMPT_WORDS + size["K"] + 8, tie_word_embeddings=True,
        pad_token_id=0, bos_token_id=1, eos_token_id=2)
    transformers.Qwen3ForCausalLM(config).save_pretrained(path)


def _reward(completions, **kwargs):
    """A reward that varies between completions (so advantages are not all zero)."""
    return [len(set(c.split())) / 64 for c in completions]


def _gate(stepper: _Stepper) -> Any:
    """A ``TrainerCallback`` holding the trainer at each step's start until :meth:`_Stepper.step`
    releases it, and handing the step's logged loss back once the step is logged (the trainer
    logs after ``on_step_end``; ``logging_steps=1``)."""
    from transformers import TrainerCallback

    class Gate(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs) -> None:
            stepper.go.acquire()
            if stepper.stopping:
                raise _StopTrainingError()

        def on_log(self, args, state, control, logs=None, **kwargs) -> None:
            if logs and "loss" in logs:
                stepper.logs = dict(logs)
                stepper.done.release()

    return Gate()


@dataclass
class _Stepper:
    """A ``GRPOTrainer`` training on its own thread, one step per :meth:`step`."""

    model_dir: str
    size: Size
    bf16: bool
    patched: bool
    lora: bool
    backend: str
    go: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(0))
    done: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(0))
    stopping: bool = False
    error: BaseException | None = None
    steps: int = 0
    logs: dict[str, float] = field(default_factory=dict)
    peak_rss_kib: list[int] = field(default_factory=list)
    trainer: Any = None
    thread: threading.Thread | None = None

    def start(self) -> None:
        import datasets
        from trl import GRPOConfig, GRPOTrainer

        G, K = self.size["G"], self.size["K"]
        prompts = [" ".join(f"w{(7 * i + j) % (self.size['V'] - 3)}"
                            for j in range(PROMPT_WORDS)) for i in range(64)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            args = GRPOConfig(
                output_dir=tempfile.mkdtemp(prefix="rlkern_trl_step_"), use_cpu=True,
                report_to=[], save_strategy="no", seed=SEED, bf16=self.bf16,
                max_steps=10**6, logging_steps=1, disable_tqdm=True, learning_rate=1e-5,
                per_device_train_batch_size=G, num_generations=G, max_completion_length=K,
                generation_kwargs={"min_new_tokens": K}, beta=0.0)
            peft_config = None
            if self.lora:
                from peft import LoraConfig

                peft_config = LoraConfig(r=16, lora_alpha=32, task_type="CAUSAL_LM",
                                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                         "gate_proj", "up_proj", "down_proj"])
            self.trainer = GRPOTrainer(
                model=self.model_dir, reward_funcs=_reward, args=args, peft_config=peft_config,
                train_dataset=datasets.Dataset.from_dict({"prompt": prompts}))
        self.trainer.add_callback(_gate(self))
        from transformers.trainer_callback import PrinterCallback

        self.trainer.remove_callback(PrinterCallback)  # no log line per step on stdout
        self.thread = threading.Thread(target=self._train, daemon=True,
                                       name="rlkern-bench-trl-step")
        self.thread.start()

    def _train(self) -> None:
        try:
            self.trainer.train()
        except _StopTrainingError:
            pass
        except BaseException as exc:  # reported by the next step() call
            self.error = exc
        finally:
            self.done.release()  # a waiting step() returns and sees the error

    def step(self) -> dict[str, float]:
        """One optimizer step; returns what the trainer logged for it (loss, reward, …)."""
        import rlkern.integrations.trl as rt

        if self.thread is None:
            self.start()
        if self.error is not None or not self.thread.is_alive():
            raise RuntimeError(f"the trainer stopped: {self.error!r}")
        was = rt.is_applied()
        rt.apply(backend=self.backend) if self.patched else rt.remove()
        torch.manual_seed(SEED + self.steps)  # step k sees the same random state in every impl
        measure = _reset_peak_rss()
        try:
            self.go.release()
            self.done.acquire()
        finally:
            rt.apply() if was else rt.remove()
        if self.error is not None:
            raise RuntimeError(f"GRPOTrainer failed: {self.error!r}") from self.error
        peak = _status_kib("VmHWM") if measure else None
        if peak is not None:
            self.peak_rss_kib.append(peak)
        self.steps += 1
        return self.logs

    def stop(self) -> None:
        if self.thread is not None and self.thread.is_alive():
            self.stopping = True
            self.go.release()
            self.thread.join(timeout=60)


@dataclass
class TrlStepInputs:
    """The saved model of one size and the implementations' trainers (made on first use)."""

    model_dir: str
    size: Size
    bf16: bool
    backend: str
    steppers: dict[str, _Stepper] = field(default_factory=dict)

    def stepper(self, name: str) -> _Stepper:
        if name not in self.steppers:
            patched, lora = IMPLS[name]
            self.steppers[name] = _Stepper(self.model_dir, self.size, self.bf16, patched, lora,
                                           self.backend)
        return self.steppers[name]

    def close(self) -> None:
        for s in self.steppers.values():
            s.stop()


def _stop_all(steppers: dict[str, _Stepper]) -> None:
    for s in steppers.values():
        s.stop()


@register("trl_step")
def trl_step_case(options: CaseOptions) -> Case:
    """The ``trl_step`` case (CPU only: TRL's trainer is run with ``use_cpu=True``); the
    rlkern rows' fused head runs the run's backend (``apply(backend=...)``)."""
    backend = RlkernBackend.choose(options)
    peaks: dict[str, list[int]] = {}
    live: list[TrlStepInputs] = []

    def make_inputs(size: Size, dtype: torch.dtype, device: torch.device) -> TrlStepInputs:
        if device.type != "cpu":
            raise ValueError("trl_step runs TRL's trainer on CPU (use_cpu=True); use "
                             "--device cpu")
        for old in live:  # one size at a time: the previous size's trainers end here
            old.close()
        live.clear()
        model_dir = tempfile.mkdtemp(prefix="rlkern_trl_step_model_")
        save_model(model_dir, size)
        inputs = TrlStepInputs(model_dir, size, bf16=dtype == torch.bfloat16,
                               backend=backend.name)
        weakref.finalize(inputs, _stop_all, inputs.steppers)
        atexit.register(inputs.close)
        live.append(inputs)
        return inputs

    def run(name: str) -> Callable[[TrlStepInputs], Outputs]:
        def call(inputs: TrlStepInputs) -> Outputs:
            TRL.get()
            if IMPLS[name][1]:
                PEFT.get()
            stepper = inputs.stepper(name)
            logs = stepper.step()
            peaks[f"{inputs.size.label()} {name}"] = stepper.peak_rss_kib
            return {key: torch.tensor([float(logs.get(key, math.nan))], dtype=torch.float64)
                    for key in CHECKED}
        return call

    def implementations(mode: str) -> list[Impl]:
        impls = []
        for name, (_, lora) in IMPLS.items():
            skip = TRL.missing() or (PEFT.missing() if lora else None)
            if name == "rlkern":
                impls.append(Impl.rlkern(run(name), note=backend.note))
            else:
                impls.append(Impl(name, run(name), skip=skip))
        return impls

    def summary(measurements: list[Any], plot_dir: str | None) -> tuple[str, ...]:
        lines = ["peak RSS per step (VmHWM, reset before each step; median of the steps after "
                 "each implementation's first):"]
        for key, values in peaks.items():
            after = values[1:]
            if after:
                lines.append(f"  {key}: {statistics.median(after) / 1024:.0f} MiB "
                             f"({len(after)} steps)")
            else:
                lines.append(f"  {key}: no step after the first was measured")
        return tuple(lines)

    # The first steps start from the same weights and random state (a fresh LoRA adapter is the
    # identity), so they generate the same completions: the same reward, and TRL's and rlkern's
    # loss and mean entropy agree to float rounding (bf16 autocast: to its rounding).
    # the first step is on-policy: its loss is ~0 (mean advantage 0), so the gate needs an
    # absolute term
    tolerances = {key: Tolerance(atol=1e-3, rtol=1e-2, gate=0.1, gate_atol=1e-4)
                  for key in CHECKED}
    return Case(name="trl_step", sizes=FULL_SIZES, quick_sizes=QUICK_SIZES, modes=("step",),
                make_inputs=make_inputs, implementations=implementations,
                tolerances=tolerances, summary=summary,
                notes=("one call = one optimizer step of GRPOTrainer (G completions of K "
                       "tokens for one prompt): seconds per step", *backend.notes),
                warnings=backend.notes, environment=backend.environment)


__all__ = ["FULL_SIZES", "IMPLS", "QUICK_SIZES", "TrlStepInputs", "save_model",
           "trl_step_case"]
