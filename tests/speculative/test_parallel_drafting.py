"""Parallel-drafting heads (one forward proposes several depths): the serving geometry is the
training geometry, trees deeper than the head reaches are refused (forced) or left out (auto),
and the checkpoint keeps the placeholder."""

from __future__ import annotations

import pytest
import torch

from eaglespec.config import SpecConfig
from eaglespec.engine.llm import LLM
from eaglespec.kv_cache import KVCache
from eaglespec.models.attention_step import PrefillStep, TreeStep
from eaglespec.models.eagle import EagleConfig, load_head, save_head
from eaglespec.speculative.drafter import chain_bits
from eaglespec.train.dense import TTTStep
from tests.conftest import small_engine
from tests.speculative.test_speculative_greedy import eagle1_head, predictable_target

SCALE = 0.25


@pytest.fixture(scope="module")
def target():
    return predictable_target(seed=21)


def test_placeholders_see_when_serving_what_they_saw_in_training(target):
    """Training runs every anchor at once (TTTStep); serving caches the pairs up to the anchor
    and runs the K - 1 placeholders after them. Both must give the same outputs."""
    head = eagle1_head(target, seed=3, oracle=False, parallel_tokens=4)
    lc = head.config.layer
    t = 10
    gen = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, lc.vocab_size, (t + 1,), generator=gen)
    feats = torch.randn(t, lc.hidden_size, generator=gen)
    positions = torch.arange(t)
    step = TTTStep(1, t, SCALE)
    anchor_hidden = head(feats, tokens[1:], positions, step, None).hidden  # row t reads (f_t, x_{t+1}) at t
    trained = [head.forward_placeholders(anchor_hidden, positions + i, step, None).last for i in range(1, 4)]
    for anchor in (0, 4, 6):  # the last cached pair
        n = anchor + 1
        cache = KVCache.allocate(lc.num_layers, 8, 4, lc.num_kv_heads, lc.head_dim, torch.float32, "cpu")
        tables = torch.arange(8, dtype=torch.int32)[None]
        prefill = PrefillStep(torch.arange(n), tables, torch.tensor([0, n], dtype=torch.int32),
                              torch.tensor([n], dtype=torch.int32), n, SCALE)
        last = head(feats[:n], tokens[1:n + 1], positions[:n], prefill, cache).hidden[-1]
        ahead = TreeStep(tables, torch.tensor([n], dtype=torch.int32), chain_bits(3, "cpu")[None], SCALE)
        served = head.forward_placeholders(last.expand(3, -1), n + torch.arange(3), ahead, cache).last
        for i in range(3):
            torch.testing.assert_close(served[i], trained[i][anchor], atol=1e-5, rtol=1e-5)


def test_a_tree_deeper_than_the_head_reaches_is_refused_or_left_out(target):
    head = eagle1_head(target, seed=3, oracle=False, parallel_tokens=3)
    with pytest.raises(ValueError, match="proposes 3 tokens per forward"):
        LLM.from_model(target, draft=head, spec=SpecConfig(tree="chain:4"), engine=small_engine())
    auto = LLM.from_model(target, draft=head, spec=SpecConfig(auto_trees=("chain:2", "chain:3", "dynamic:4,3,8")),
                          engine=small_engine())
    assert list(auto.speculative.programs) == ["chain:2", "chain:3"]
    assert auto.speculative.policy.trees == ["chain:2", "chain:3"]
    with pytest.raises(ValueError, match="every tree is deeper"):
        LLM.from_model(target, draft=head, spec=SpecConfig(auto_trees=("chain:4",)), engine=small_engine())
    with pytest.raises(ValueError, match="EAGLE-1 heads only"):
        EagleConfig("eagle3", head.config.layer, parallel_tokens=2)
    with pytest.raises(ValueError, match="parallel_tokens must be an int >= 1"):
        EagleConfig("eagle1", head.config.layer, parallel_tokens=0)


def test_the_checkpoint_keeps_the_placeholder_and_the_reach(target, tmp_path):
    head = eagle1_head(target, seed=3, oracle=False, parallel_tokens=3)
    save_head(head, str(tmp_path / "h"))
    assert '"parallel_draft_tokens": 3' in (tmp_path / "h" / "config.json").read_text()
    loaded = load_head(str(tmp_path / "h"), target)
    assert loaded.config.parallel_tokens == 3 and torch.equal(loaded.placeholder, head.placeholder)
    sequential = eagle1_head(target, seed=3, oracle=False)
    save_head(sequential, str(tmp_path / "s"))
    (tmp_path / "s" / "config.json").write_text((tmp_path / "h" / "config.json").read_text())
    with pytest.raises(ValueError, match="missing tensor.*placeholder"):
        load_head(str(tmp_path / "s"), target)
