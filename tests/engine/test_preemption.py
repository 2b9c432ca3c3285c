"""A pool too small for the batch: requests are preempted and recomputed, outputs unchanged.

Regression: a request preempted for an older one in the same step was still asked to make
room, and preempted a request already chosen for the step (IndexError on its freed blocks;
seen as ``eaglespec train all`` failing on the CPU, whose pool is small).
"""

from __future__ import annotations

import random

from eaglespec.config import SamplingParams
from eaglespec.engine.llm import LLM
from tests.conftest import random_model, small_engine, tiny_config


def test_preemption_keeps_outputs_and_frees_blocks():
    target = random_model(tiny_config())
    rnd = random.Random(3)
    prompts = [[rnd.randrange(97) for _ in range(rnd.randint(1, 50))] for _ in range(14)]
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    roomy = LLM.from_model(target, engine=small_engine(num_blocks=200, max_model_len=64))
    expected = [roomy.generate([p], params)[0].token_ids for p in prompts]
    tight = LLM.from_model(target, engine=small_engine(num_blocks=12, max_batch_size=8, max_model_len=64))
    free = tight.runner.allocator.num_free
    outs = tight.generate(prompts, params)
    for prompt, out, want in zip(prompts, outs, expected):
        assert out.error is None
        assert out.token_ids == want[:64 - len(prompt)]
    assert tight.runner.allocator.num_free == free
