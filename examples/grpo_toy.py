"""GRPO on CPU in a few minutes: a tiny Llama learns to reverse digits from reward alone.

    python examples/grpo_toy.py                      # the measured run of docs/demo.md
    python examples/grpo_toy.py --steps 40 --out curve.png
    python examples/grpo_toy.py --loss two-op        # linear_logprobs + policy_loss
    python examples/grpo_toy.py --top-p 0.9 --ratio-out docs/img/truncated_support_ratio.png
                                                     # docs/sampling.md's ratio figure

Same as ``rlkern demo``. The loop lives in ``python/rlkern/demo.py`` (function ``run``) so that
the command, this script and the tests run one copy of it. One step of it, in short::

    roll = rlkern.generate_groups(model, prompts, group_size=G, max_new_tokens=n + 1,
                                  schedule="length_aware", eos_token_id=EOS)   # + logprobs
    scores = [toy_reward(digits, completion) for ...]                          # verifiable
    adv = rlkern.group_advantages(scores, group_size=G, estimator="grpo").advantages
    hidden = model.model(input_ids=prompt_and_completion).last_hidden_state
    loss = rlkern.linear_grpo_loss(hidden[:, n : n + T], model.lm_head.weight, completion,
                                   mask, adv, old_logprobs=roll_logprobs,
                                   config=rlkern.PolicyLossConfig.trl(loss_type="dapo")).loss
    loss.backward(); clip_grad_norm_(...); opt.step()

Needs ``transformers`` and ``matplotlib`` (both in rlkern's ``test`` extra).
"""

from __future__ import annotations

import argparse
import sys

from rlkern.demo import add_arguments, config_from_args, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    add_arguments(parser)
    result = run(config_from_args(parser.parse_args(argv)))
    return 0 if result.rewards else 1


if __name__ == "__main__":
    sys.exit(main())
