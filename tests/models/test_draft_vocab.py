"""Reduced draft vocabularies: the N most frequent tokens' rows of a head's output projection and
their target ids, for EAGLE-1 (the target's lm_head) and EAGLE-3 (its own lm_head and d2t)."""

from __future__ import annotations

import json

import pytest
import torch

from eaglespec.bench.e2e import FULL_VOCAB, draft_vocab_size_for, parse_draft_vocabs
from eaglespec.config import SpecConfig
from eaglespec.models.eagle import EagleConfig, build_head, load_head, save_head
from eaglespec.speculative.drafter import Drafter
from eaglespec.speculative.tree import parse_tree
from eaglespec.train.dense import DenseCausalStep
from tests.conftest import random_model, tiny_config
from tests.speculative.test_speculative_greedy import eagle1_head, eagle3_head

VOCAB = 97


@pytest.fixture(scope="module")
def target():
    return random_model(tiny_config(vocab_size=VOCAB), seed=3)


def ranking(seed: int = 0) -> torch.Tensor:
    return torch.randperm(VOCAB, generator=torch.Generator().manual_seed(seed)).to(torch.int32)


def test_eagle1_vocab_is_the_top_ranked_rows_of_the_target_lm_head(target):
    head = eagle1_head(target, seed=1, oracle=False)
    head.set_token_ranking(ranking())
    vocab = head.draft_vocab(20)
    ids = ranking()[:20].long().sort().values
    assert vocab.size == 20 and torch.equal(vocab.to_target, ids)
    assert torch.equal(vocab.weight, target.output_weight[ids])
    last = torch.randn(5, target.config.hidden_size)
    full = torch.nn.functional.linear(last, target.output_weight)
    torch.testing.assert_close(vocab.logits(last), full[:, ids])
    # draft id -> target id on the device, any shape
    assert torch.equal(vocab.target_ids(torch.tensor([[0, 19]])), ids[[0, 19]][None])
    whole = head.draft_vocab(None)  # the head's own: the target's vocabulary, no copy, no id map
    assert whole.to_target is None and whole.weight.data_ptr() == target.output_weight.data_ptr()


def test_eagle3_vocab_keeps_its_own_rows_of_the_best_ranked_targets(target):
    head = eagle3_head(target, seed=2, draft_vocab=40)
    own = head.draft_to_target()
    rank = ranking(5)
    head.set_token_ranking(rank)
    vocab = head.draft_vocab(12)
    position = {int(t): i for i, t in enumerate(rank)}
    best = sorted(own.tolist(), key=lambda t: position[t])[:12]
    assert vocab.to_target.tolist() == sorted(best)
    rows = [own.tolist().index(t) for t in sorted(best)]
    assert torch.equal(vocab.weight, head.lm_head.weight[rows])
    assert head.draft_vocab(None).weight.data_ptr() == head.lm_head.weight.data_ptr()


def test_bad_sizes_and_a_missing_ranking_fail_clearly(target):
    head = eagle1_head(target, seed=1, oracle=False)
    with pytest.raises(ValueError, match="needs the head's token ranking"):
        head.draft_vocab(10)
    head.set_token_ranking(ranking())
    for bad in (0, VOCAB + 1, True, 3.0):
        with pytest.raises(ValueError, match=r"draft_vocab_size must be an int in \[1, 97\]"):
            head.draft_vocab(bad)
    three = eagle3_head(target, seed=2, draft_vocab=40)
    with pytest.raises(ValueError, match=r"in \[1, 40\] for this eagle3 head"):
        three.draft_vocab(41)
    for bad in (0, -3, True, "8k"):
        with pytest.raises(ValueError, match="SpecConfig.draft_vocab_size"):
            SpecConfig(draft_vocab_size=bad)
    with pytest.raises(ValueError, match="every target id"):
        head.set_token_ranking(torch.zeros(VOCAB, dtype=torch.int32))
    with pytest.raises(ValueError, match="EagleConfig.draft_vocab_size"):
        EagleConfig("eagle1", head.config.layer, draft_vocab_size=VOCAB + 1)


def test_drafter_refuses_a_vocabulary_narrower_than_the_tree(target):
    head = eagle1_head(target, seed=1, oracle=False)
    head.set_token_ranking(ranking())
    with pytest.raises(ValueError, match="smaller than the tree's 8 children per node"):
        Drafter(head, head.draft_vocab(6), parse_tree("dynamic:3,8,16"), None, "torch", 0.25)


def test_save_and_load_keep_the_ranking_and_a_default_size(target, tmp_path):
    head = eagle1_head(target, seed=1, oracle=False)
    cfg = EagleConfig("eagle1", head.config.layer, draft_vocab_size=30)
    reduced = build_head(cfg, target)
    reduced.load_state(list(head.state_items()))
    reduced.set_token_ranking(ranking(7))
    save_head(reduced, str(tmp_path))
    assert json.loads((tmp_path / "config.json").read_text())["draft_vocab_size"] == 30
    loaded = load_head(str(tmp_path), target)
    assert loaded.config.kind == "eagle1" and loaded.config.draft_vocab_size == 30
    assert torch.equal(loaded.token_ranking, ranking(7))
    assert torch.equal(loaded.draft_vocab(None).to_target, ranking(7)[:30].long().sort().values)
    assert loaded.draft_vocab(VOCAB).to_target is None  # a SpecConfig may still ask for all of it


def test_head_forward_gives_the_projection_input(target):
    """``DraftOutput.last`` times the vocabulary's rows is the head's full-vocabulary logits
    restricted to those rows (the drafter's projection changes nothing else)."""
    head = eagle3_head(target, seed=4, draft_vocab=40)
    head.set_token_ranking(ranking(1))
    feats = torch.randn(3, head.config.feature_size)
    out = head(feats, torch.tensor([1, 2, 3]), torch.arange(3), DenseCausalStep(1, 3, 0.25), None)
    vocab = head.draft_vocab(16)
    own = head.draft_to_target().tolist()
    cols = [own.index(t) for t in vocab.to_target.tolist()]
    torch.testing.assert_close(vocab.logits(out.last), head.logits(out)[:, cols])


def test_benchmark_draft_vocab_lists(target):
    assert parse_draft_vocabs("4k,8192, 16K,full,default") == [4096, 8192, 16384, FULL_VOCAB, None]
    assert parse_draft_vocabs("") == [None]
    # "full" is the head's whole vocabulary even where its config drafts over fewer by default
    # (as the shipped head's does).
    head = eagle1_head(target, seed=1, oracle=False)
    reduced = build_head(EagleConfig("eagle1", head.config.layer, draft_vocab_size=30), target)
    assert [draft_vocab_size_for(n, reduced) for n in (FULL_VOCAB, None, 8)] == [VOCAB, None, 8]
    for bad in ("0", "big", "-4k"):
        with pytest.raises(ValueError, match="--draft-vocab"):
            parse_draft_vocabs(bad)
