"""The launch proxy of bench.step_launches: a sampled speculative step costs what a greedy one
does plus one sampling pass (what a sampled decode step adds over a greedy one), whatever the
tree's depth: the target's draws are made for every node at once, not depth by depth."""

from __future__ import annotations

import pytest
import torch

from eaglespec.bench.step_launches import build, count_step


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
