"""The launch proxy of bench.step_launches: a sampled speculative step costs what a greedy one
does plus one sampling pass (what a sampled decode step adds over a greedy one), whatever the
tree's depth: the target's draws are made for every node at once, not depth by depth. And each
forward of the head begins with one product (design note 60)."""

from __future__ import annotations

import pytest
import torch

from eaglespec.bench.step_launches import build, count_step
from tests.conftest import needs_triton_kernels


@pytest.mark.parametrize("tree", ["chain:3", "dynamic:4,2,6"])
def test_sampled_step_adds_one_sampling_pass(tree):
    device = torch.device("cpu")
    greedy_step, greedy_decode = count_step(build("smollm2-135m", device, tree, 1, 16, "torch", 2), 1, 16, tree)
    sampled_step, sampled_decode = count_step(build("smollm2-135m", device, tree, 1, 16, "torch", 2), 1, 16, tree,
                                              sampled=True)
    sampling_pass = sampled_decode.total - greedy_decode.total
    assert sampling_pass > 20  # the cuts and the noise: a pass is many launches (the test has power)
    # Repeating the per-node settings (five fields) and adding the depth are the only other extras.
    assert sampled_step.total - greedy_step.total <= sampling_pass + 8, (sampled_step.counts, greedy_step.counts)


@needs_triton_kernels
def test_each_head_forward_of_a_step_begins_with_one_product():
    """EAGLE-1's input (the embedding lookup, the parent rows' gather, the concatenation and fc)
    is one launch per head forward: chain:3 runs the head three times (the extend and two
    depths), and the target's embedding is the step's only lookup, with nothing concatenated."""
    llm = build("smollm2-135m", torch.device("cpu"), "chain:3", 1, 16, "triton", 2)
    step, _ = count_step(llm, 1, 16, "chain:3")
    assert step.counts["triton:_gemv_embed_concat_kernel"] == 3, step.counts
    assert step.counts.get("embedding", 0) == 1 and "cat" not in step.counts, step.counts
