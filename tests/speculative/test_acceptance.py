"""Tests of speculative/acceptance.py: hand-made trees, special cases, and the lossless property.

The lossless test runs a tiny speculative generator: the target is a second-order Markov model
over 8 tokens (a logits table indexed by the last two tokens), the draft a perturbed copy. Each
of 20000 rows (one seed each) builds a tree from the draft, verifies it with an acceptance op,
and repeats from the new context until it has its first tokens. Their empirical joint
distribution must match the target's, computed exactly by enumeration (chi-square, p = 1e-3).
Two wrong rules must fail the same test, which shows it has the power to notice a bias.
"""

from __future__ import annotations

import functools

import math
import statistics
import sys
from dataclasses import replace

import pytest
import torch

from eaglespec.ops.sampling import (STREAM_DRAFT, SamplingTensors, sample, sample_from_probs,
                                    target_probs)
from eaglespec.speculative import acceptance, verifier
from eaglespec.speculative.acceptance import (AcceptResult, accept_by_target_draws, accept_greedy,
                                              accept_sampled_by_rows, accept_sampled_children, accept_stream,
                                              accept_topk_children)
from eaglespec.speculative.tree import TreeBatch, ancestor_bits_from_parents
from eaglespec.speculative.verifier import accept_tree
from eaglespec.train.token_ranking import rank_tokens

# ----------------------------------------------------------------------------- helpers


def chi_square_threshold(df: int, alpha: float = 1e-3) -> float:
    """Upper alpha quantile of chi-square(df), Wilson-Hilferty approximation."""
    z = statistics.NormalDist().inv_cdf(1.0 - alpha)
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


def chi_square(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> tuple[float, float]:
    """(statistic, threshold at p = 1e-3) for observed counts against exact bin probabilities.

    Bins expected to hold fewer than ``min_expected`` samples are pooled into one; a sample in
    a bin of probability zero makes the statistic infinite.
    """
    counts, probs = counts.double().flatten(), probs.double().flatten()
    if float(counts[probs == 0].sum()) > 0:
        return math.inf, 0.0
    expected = probs * counts.sum()
    large = expected >= min_expected
    obs = counts[large].tolist()
    exp = expected[large].tolist()
    pooled_obs, pooled_exp = float(counts[~large].sum()), float(expected[~large].sum())
    if pooled_exp >= min_expected:
        obs.append(pooled_obs)
        exp.append(pooled_exp)
    elif pooled_exp > 0:  # too small on its own: fold it into the smallest kept bin
        i = min(range(len(exp)), key=exp.__getitem__)
        obs[i] += pooled_obs
        exp[i] += pooled_exp
    stat = sum((o - e) ** 2 / e for o, e in zip(obs, exp))
    return stat, chi_square_threshold(len(obs) - 1)


def uniform_settings(rows: int, temperature: float, top_k: int = 0, top_p: float = 1.0,
                     first_seed: int = 0) -> SamplingTensors:
    return SamplingTensors(
        temperature=torch.full((rows,), temperature, dtype=torch.float32),
        top_k=torch.full((rows,), top_k, dtype=torch.int32),
        top_p=torch.full((rows,), top_p, dtype=torch.float32),
        seeds=torch.arange(first_seed, first_seed + rows, dtype=torch.int64),
        offsets=torch.zeros(rows, dtype=torch.int64),
    )


def tree_tensors(parent_list: list[int], tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(tokens, parents, depth, valid) for one tree shape shared by every row."""
    rows = tokens.shape[0]
    depth_list = []
    for p in parent_list:
        depth_list.append(0 if p < 0 else depth_list[p] + 1)
    parents = torch.tensor(parent_list, dtype=torch.int64).expand(rows, -1).clone()
    depth = torch.tensor(depth_list, dtype=torch.int64).expand(rows, -1).clone()
    valid = torch.ones(rows, len(parent_list), dtype=torch.bool)
    return tokens, parents, depth, valid


def sibling_ranks(parent_list: list[int]) -> list[int]:
    return [sum(1 for q in parent_list[:i] if q == p) for i, p in enumerate(parent_list)]


# ----------------------------------------------------------------------------- toy models

VOCAB = 8
CONTEXT = (3, 5)
CHAIN3 = [-1, 0, 1, 2]
IRREGULAR3 = [-1, 0, 0, 1, 1, 2, 3, 3]  # 2, 2, 1, 2 children: depth 3
BINARY3 = [-1, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6]
ROWS = 20000


def toy_tables() -> tuple[torch.Tensor, torch.Tensor]:
    """Target and draft logits, [prev, last, next] over 8 tokens."""
    gen = torch.Generator().manual_seed(1234)
    target = torch.randn(VOCAB, VOCAB, VOCAB, generator=gen) * 1.5
    draft = target + torch.randn(VOCAB, VOCAB, VOCAB, generator=gen)
    return target, draft


def reduced_draft_vocab(target: torch.Tensor, size: int | None) -> torch.Tensor | None:
    """The ``size`` tokens the target picks most often (as a head's token ranking would give),
    in id order: draft id i is target id keep[i]. None: the draft scores every token."""
    if size is None:
        return None
    return rank_tokens(torch.bincount(target.argmax(-1).reshape(-1), minlength=VOCAB))[:size].long().sort().values


def draft_distribution(draft_rows: torch.Tensor, st: SamplingTensors, keep: torch.Tensor | None) -> torch.Tensor:
    """The draft's distribution over its own vocabulary: [R, N] from target-vocabulary logits [R, V]."""
    return target_probs(draft_rows if keep is None else draft_rows[:, keep], st)


def to_target_ids(draft_ids: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    return draft_ids if keep is None else keep[draft_ids]


def in_target_vocab(q: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """q [R, N] as the target's vocabulary sees it: zero for tokens outside the draft's."""
    return q if keep is None else torch.zeros(q.shape[0], VOCAB).index_copy_(1, keep, q)


def build_tree(parent_list: list[int], children: str, prev: torch.Tensor, last: torch.Tensor,
               st: SamplingTensors, target: torch.Tensor, draft: torch.Tensor, keep: torch.Tensor | None = None):
    """Draft a tree from context (prev, last) per row; children "sampled" (iid from q) or "topk";
    ``keep``: the draft's reduced vocabulary (target ids), None for all tokens.

    Returns tree tensors and p, q [B, N, V] (target / draft distributions at each node).
    """
    rows, nodes = prev.shape[0], len(parent_list)
    tokens = torch.zeros(rows, nodes, dtype=torch.int64)
    before = torch.zeros(rows, nodes, dtype=torch.int64)  # the token preceding each node
    tokens[:, 0], before[:, 0] = last, prev
    ranks = sibling_ranks(parent_list)
    q_at: dict[int, torch.Tensor] = {}
    for i in range(1, nodes):
        j = parent_list[i]
        if j not in q_at:
            q_at[j] = draft_distribution(draft[before[:, j], tokens[:, j]], st, keep)
        if children == "sampled":
            draft_ids = sample_from_probs(q_at[j], st.seeds, st.offsets, STREAM_DRAFT + i)
        else:
            draft_ids = q_at[j].sort(dim=-1, descending=True, stable=True).indices[:, ranks[i]]
        tokens[:, i] = to_target_ids(draft_ids, keep)
        before[:, i] = tokens[:, j]
    per_node = st.expand(nodes)
    p = target_probs(target[before, tokens].reshape(-1, VOCAB), per_node).reshape(rows, nodes, VOCAB)
    q = in_target_vocab(draft_distribution(draft[before, tokens].reshape(-1, VOCAB), per_node, keep), keep)
    q = q.reshape(rows, nodes, VOCAB)
    return tree_tensors(parent_list, tokens), p, q


def generate(n_tokens: int, parent_list: list[int], children: str, rule, st: SamplingTensors,
             tables, keep: torch.Tensor | None = None) -> tuple[torch.Tensor, list[float]]:
    """The first n_tokens each row emits by repeated speculative steps: [B, n_tokens].

    Also returns the mean tokens emitted by the first step (a tree that never accepts anything
    would make the test vacuous)."""
    target, draft = tables
    rows = st.num_rows
    prev = torch.full((rows,), CONTEXT[0], dtype=torch.int64)
    last = torch.full((rows,), CONTEXT[1], dtype=torch.int64)
    emitted = torch.full((rows, n_tokens), -1, dtype=torch.int64)
    count = torch.zeros(rows, dtype=torch.int64)
    mean_emitted = []
    max_depth = max(tree_tensors(parent_list, torch.zeros(1, len(parent_list)))[2][0].tolist())
    while bool((count < n_tokens).any()):
        step_st = replace(st, offsets=count.clone())  # a new counter each step: fresh noise
        tree, p, q = build_tree(parent_list, children, prev, last, step_st, target, draft, keep)
        result: AcceptResult = rule(tree, p, q, step_st, max_depth)
        mean_emitted.append(float(result.num_emitted.double().mean()))
        for j in range(max_depth + 1):
            pos = count + j
            ok = (j < result.num_emitted) & (pos < n_tokens)
            emitted[ok, pos[ok]] = result.tokens[ok, j]
        count = count + result.num_emitted
        history = torch.cat([torch.tensor(CONTEXT).expand(rows, 2), emitted], dim=1)
        end = (count + 2).clamp(max=n_tokens + 2)
        prev = history.gather(1, (end - 2)[:, None]).squeeze(1)
        last = history.gather(1, (end - 1)[:, None]).squeeze(1)
    return emitted, mean_emitted


def exact_distribution(n_tokens: int, st_one: SamplingTensors, target: torch.Tensor) -> torch.Tensor:
    """P(first n_tokens) from CONTEXT by enumeration: [V] * n_tokens."""
    # next[a, b] = the target's shaped distribution after context (a, b)
    next_dist = target_probs(target.reshape(-1, VOCAB), st_one.expand(VOCAB * VOCAB)).reshape(VOCAB, VOCAB, VOCAB)
    joint = next_dist[CONTEXT[0], CONTEXT[1]].double()  # [V]
    last_two = (torch.full((VOCAB,), CONTEXT[1]), torch.arange(VOCAB))
    for _ in range(n_tokens - 1):
        step = next_dist[last_two[0], last_two[1]].double()  # [..., V]
        joint = joint[..., None] * step.reshape(joint.shape + (VOCAB,))
        shape = joint.shape
        grid = torch.meshgrid(*[torch.arange(VOCAB)] * len(shape), indexing="ij")
        last_two = (grid[-2].flatten(), grid[-1].flatten())
    return joint


# Rules as used by the generator: (tree, p, q, settings, max_depth) -> AcceptResult.
def rule_topk(tree, p, q, st, max_depth):
    return accept_topk_children(*tree, p, st.seeds, st.offsets, max_depth)


def rule_sampled(tree, p, q, st, max_depth):
    return accept_sampled_children(*tree, p, q, st.seeds, st.offsets, max_depth, max_children=2)


def rule_verify(tree, p, q, st, max_depth, visited_draws_from):
    """What the engine's verifier runs: the target's seeded draw at every node at once (or, from
    ``visited_draws_from`` tree rows on, at the nodes the walk visits), then the greedy walk
    against those draws. p is already shaped by the settings, so it is passed as logits log(p)
    with neutral settings (the seeds and counters are kept)."""
    tokens, parents, depth, _ = tree
    rows, nodes = tokens.shape
    batch = TreeBatch(tokens, parents, depth, ancestor_bits_from_parents(parents, max_depth), depth)
    neutral = replace(st, temperature=torch.ones(rows), top_k=torch.zeros(rows, dtype=torch.int32),
                      top_p=torch.ones(rows), sort_width=0)
    accept, _ = accept_tree(batch, p.log().reshape(rows * nodes, -1), neutral, False, max_depth,
                            torch.zeros(rows, dtype=torch.int64), torch.zeros(rows, 1, dtype=torch.int32), 16,
                            "torch", visited_draws_from=visited_draws_from)
    return accept


CONFIGS = {"t1": (1.0, 0, 1.0), "t07_k4": (0.7, 4, 1.0), "p08": (1.0, 0, 0.8)}
TREES = {"chain_sampled": (CHAIN3, "sampled", rule_sampled),
         "tree_sampled": (IRREGULAR3, "sampled", rule_sampled),
         "tree_topk": (BINARY3, "topk", rule_topk),
         "tree_topk_verifier": (BINARY3, "topk", functools.partial(rule_verify, visited_draws_from=1 << 62)),
         "tree_topk_verifier_visited": (BINARY3, "topk", functools.partial(rule_verify, visited_draws_from=0))}


def run_lossless(config: str, tree: str, n_tokens: int = 2, draft_vocab: int | None = None):
    temperature, top_k, top_p = CONFIGS[config]
    parent_list, children, rule = TREES[tree]
    tables = toy_tables()
    st = uniform_settings(ROWS, temperature, top_k, top_p)
    keep = reduced_draft_vocab(tables[0], draft_vocab)
    emitted, mean_emitted = generate(n_tokens, parent_list, children, rule, st, tables, keep)
    index = torch.zeros(ROWS, dtype=torch.int64)
    for j in range(n_tokens):
        index = index * VOCAB + emitted[:, j]
    counts = torch.bincount(index, minlength=VOCAB ** n_tokens)
    exact = exact_distribution(n_tokens, uniform_settings(1, temperature, top_k, top_p), tables[0])
    stat, threshold = chi_square(counts, exact)
    return stat, threshold, mean_emitted


# ----------------------------------------------------------------------------- lossless


@pytest.mark.parametrize("draft_vocab", [None, 5], ids=["full_vocab", "draft_vocab_5"])
@pytest.mark.parametrize("tree", list(TREES))
@pytest.mark.parametrize("config", list(CONFIGS))
def test_speculative_sampling_is_lossless(config, tree, draft_vocab):
    # draft_vocab 5: the draft scores 5 of the 8 tokens (q = 0 for the other 3, which the
    # target still emits).
    stat, threshold, mean_emitted = run_lossless(config, tree, draft_vocab=draft_vocab)
    assert mean_emitted[0] > 1.4, "the drafts are almost never accepted: the test would be vacuous"
    assert stat < threshold, f"chi-square {stat:.1f} >= {threshold:.1f}: not the target's distribution"


def test_lossless_over_three_tokens():
    # Three tokens reach depth-3 acceptances of the first step.
    stat, threshold, _ = run_lossless("t1", "tree_sampled", n_tokens=3)
    assert stat < threshold


def test_power_without_the_residual(monkeypatch):
    # min(1, p/q) but the rejected draft mass is not taken out of p: biased toward q's favourites.
    stat, threshold, _ = run_lossless("t1", "chain_sampled")
    assert stat < threshold
    monkeypatch.setattr(acceptance, "_residual_after_rejection", lambda p, q: p)
    stat, threshold, _ = run_lossless("t1", "chain_sampled")
    assert stat > threshold


def test_power_draft_ids_not_mapped_to_target_ids(monkeypatch):
    # A reduced vocabulary whose draft ids are taken for target ids: the children are not the
    # tokens q describes, so min(1, p/q) accepts the wrong tokens.
    stat, threshold, _ = run_lossless("t1", "chain_sampled", draft_vocab=5)
    assert stat < threshold
    monkeypatch.setattr(sys.modules[__name__], "to_target_ids", lambda ids, keep: ids)
    stat, threshold, _ = run_lossless("t1", "chain_sampled", draft_vocab=5)
    assert stat > threshold


@pytest.mark.parametrize("tree", ["tree_topk_verifier", "tree_topk_verifier_visited"])
def test_power_verifier_draws_without_the_depth_in_the_counter(tree, monkeypatch):
    # Every node drawing with the request's counter alone: the tokens of one step share their
    # noise, so consecutive tokens are correlated.
    stat, threshold, _ = run_lossless("t1", tree)
    assert stat < threshold
    monkeypatch.setattr(verifier, "per_node_sampling", lambda st, depth: st.expand(depth.shape[1]))
    monkeypatch.setattr(verifier, "sampling_at_depth", lambda st, d: st)
    stat, threshold, _ = run_lossless("t1", tree)
    assert stat > threshold


def test_power_sampled_rule_on_topk_children(monkeypatch):
    # min(1, p/q) assumes children drawn from q; on deterministic top-k children it is biased.
    monkeypatch.setitem(TREES, "tree_topk", (BINARY3, "topk", rule_sampled))
    stat, threshold, _ = run_lossless("t1", "tree_topk")
    assert stat > threshold


# ----------------------------------------------------------------------------- hand-made trees


def small_tree(rows: int = 2):
    """Root 9 -> (1, 2); 1 -> 3; 2 -> (4, 4 duplicate); node 6 is invalid padding carrying 5."""
    tokens = torch.tensor([9, 1, 2, 3, 4, 4, 5]).expand(rows, -1).clone()
    parents = torch.tensor([-1, 0, 0, 1, 2, 2, 0]).expand(rows, -1).clone()
    depth = torch.tensor([0, 1, 1, 2, 2, 2, 1]).expand(rows, -1).clone()
    valid = torch.tensor([True] * 6 + [False]).expand(rows, -1).clone()
    return tokens, parents, depth, valid


def logits_with_argmax(argmax: list[list[int]], vocab: int = 10) -> torch.Tensor:
    """[B, N, vocab] logits whose argmax at node i of row b is argmax[b][i]."""
    gen = torch.Generator().manual_seed(5)
    out = torch.randn(len(argmax), len(argmax[0]), vocab, generator=gen)
    for b, row in enumerate(argmax):
        for i, t in enumerate(row):
            out[b, i, t] = 10.0
    return out


def test_greedy_on_a_hand_made_tree():
    tree = small_tree()
    logits = logits_with_argmax([[2, 0, 4, 0, 7, 0, 0],  # root->2 (node 2), 2->4 (node 4 first), bonus 7
                                 [5, 0, 0, 0, 0, 0, 0]])  # 5 only on the invalid node: bonus 5
    res = accept_greedy(*tree, logits, max_depth=3)
    assert res.tokens.tolist() == [[2, 4, 7, -1], [5, -1, -1, -1]]
    assert res.num_emitted.tolist() == [3, 1]
    assert res.path.tolist() == [[0, 2, 4, -1], [0, -1, -1, -1]]


def test_greedy_stops_at_max_depth():
    tokens = torch.tensor([[0, 1, 2, 3]])
    tree = tree_tensors(CHAIN3, tokens)
    logits = logits_with_argmax([[1, 2, 3, 6]])
    res = accept_greedy(*tree, logits, max_depth=3)
    assert res.tokens.tolist() == [[1, 2, 3, 6]] and res.num_emitted.tolist() == [4]
    assert res.path.tolist() == [[0, 1, 2, 3]]
    res = accept_greedy(*tree, logits, max_depth=1)  # deeper nodes are not considered
    assert res.tokens.tolist() == [[1, 2]] and res.path.tolist() == [[0, 1]]


def random_trees(rows: int, nodes: int, vocab: int, seed: int):
    """Random tree shapes with duplicate tokens and padding, and logits that often follow a child."""
    gen = torch.Generator().manual_seed(seed)
    parents = torch.full((rows, nodes), -1, dtype=torch.int64)
    depth = torch.zeros(rows, nodes, dtype=torch.int64)
    valid = torch.zeros(rows, nodes, dtype=torch.bool)
    tokens = torch.full((rows, nodes), -1, dtype=torch.int64)
    logits = torch.randn(rows, nodes, vocab, generator=gen)
    for b in range(rows):
        used = int(torch.randint(1, nodes + 1, (1,), generator=gen))
        valid[b, :used] = True
        tokens[b, 0] = int(torch.randint(vocab, (1,), generator=gen))
        for i in range(1, used):
            parents[b, i] = int(torch.randint(i, (1,), generator=gen))
            depth[b, i] = depth[b, parents[b, i]] + 1
            tokens[b, i] = int(torch.randint(vocab, (1,), generator=gen))
        for i in range(used):
            kids = [j for j in range(used) if parents[b, j] == i]
            if kids and float(torch.rand(1, generator=gen)) < 0.8:
                logits[b, i, tokens[b, kids[int(torch.randint(len(kids), (1,), generator=gen))]]] += 6.0
    max_depth = int(depth.max())
    return (tokens, parents, depth, valid), logits, max_depth


def assert_same_result(a: AcceptResult, b: AcceptResult) -> None:
    assert torch.equal(a.tokens, b.tokens)
    assert torch.equal(a.num_emitted, b.num_emitted)
    assert torch.equal(a.path, b.path)


def test_greedy_is_special_case_of_topk_and_sampled_children():
    rows, nodes, vocab = 200, 12, 6
    tree, logits, max_depth = random_trees(rows, nodes, vocab, seed=7)
    greedy = accept_greedy(*tree, logits, max_depth)
    assert float(greedy.num_emitted.double().mean()) > 2.0  # the trees get accepted into
    greedy_rows = uniform_settings(rows * nodes, 0.0)
    one_hot = target_probs(logits.reshape(-1, vocab), greedy_rows).reshape(rows, nodes, vocab)
    seeds = torch.arange(rows, dtype=torch.int64)
    assert_same_result(accept_topk_children(*tree, one_hot, seeds, seeds, max_depth), greedy)
    q = torch.softmax(torch.randn(rows, nodes, vocab, generator=torch.Generator().manual_seed(8)), -1)
    q[:5] = one_hot[:5]  # includes p == q with a rejected child: the zero-residual case
    sampled = accept_sampled_children(*tree, one_hot, q, seeds, seeds, max_depth, max_children=nodes)
    assert_same_result(sampled, greedy)


def test_outputs_are_consistent():
    rows, nodes, vocab = 100, 12, 6
    tree, logits, max_depth = random_trees(rows, nodes, vocab, seed=9)
    p = torch.softmax(logits, -1)
    q = torch.softmax(torch.randn(rows, nodes, vocab, generator=torch.Generator().manual_seed(10)), -1)
    seeds = torch.arange(rows, dtype=torch.int64)
    tokens, parents = tree[0], tree[1]
    for res in (accept_topk_children(*tree, p, seeds, seeds, max_depth),
                accept_sampled_children(*tree, p, q, seeds, seeds, max_depth, max_children=nodes)):
        assert res.tokens.shape == res.path.shape == (rows, max_depth + 1)
        n = res.num_emitted
        assert ((res.tokens >= 0).sum(1) == n).all() and ((res.path >= 0).sum(1) == n).all()
        for b in range(rows):
            k = int(n[b])
            path = res.path[b, :k].tolist()
            assert path[0] == 0 and res.tokens[b, k:].eq(-1).all() and res.path[b, k:].eq(-1).all()
            for j in range(1, k):  # each accepted node is a child of the previous and carries its token
                assert int(parents[b, path[j]]) == path[j - 1]
                assert int(tokens[b, path[j]]) == int(res.tokens[b, j - 1])


def test_lazy_variants_match():
    # Cutting the target only at the visited rows (what a verifier does) gives the same result
    # as cutting every node first.
    rows, nodes, vocab = 50, 10, 30
    tree, logits, max_depth = random_trees(rows, nodes, vocab, seed=14)
    st = replace(uniform_settings(rows, 0.8, 10, 0.9), offsets=torch.arange(rows, dtype=torch.int64))
    p = target_probs(logits.reshape(-1, vocab), st.expand(nodes)).reshape(rows, nodes, vocab)
    q = torch.softmax(logits.flip(-1), -1)

    def p_at(d, node):
        return target_probs(logits[torch.arange(rows), node], st)

    def draw(d, node):
        return sample(logits[torch.arange(rows), node], st, stream=accept_stream(d, 0))

    assert_same_result(accept_by_target_draws(*tree, max_depth, draw),
                       accept_topk_children(*tree, p, st.seeds, st.offsets, max_depth))
    lazy = accept_sampled_by_rows(*tree, p_at, lambda d, node: q[torch.arange(rows), node],
                                  st.seeds, st.offsets, max_depth, max_children=4)
    assert_same_result(lazy, accept_sampled_children(*tree, p, q, st.seeds, st.offsets, max_depth, 4))


def test_sampled_children_accept_all_when_draft_equals_target():
    rows = 500
    gen = torch.Generator().manual_seed(11)
    p = torch.softmax(torch.randn(rows, 4, VOCAB, generator=gen), -1)
    tokens = torch.randint(VOCAB, (rows, 4), generator=gen)
    seeds = torch.arange(rows, dtype=torch.int64)
    res = accept_sampled_children(*tree_tensors(CHAIN3, tokens), p, p, seeds, seeds, 3, max_children=1)
    assert (res.num_emitted == 4).all()
    assert torch.equal(res.tokens[:, :3], tokens[:, 1:])


def test_zero_residual_keeps_the_target():
    # p = q = one-hot at 2; the first child (4) has no draft mass: rejected, and max(p - q, 0)
    # is all zero. p must be kept (not NaN), so the second child (2) is accepted, and a lone
    # child 4 gives the bonus 2.
    one_hot = torch.zeros(2, 3, VOCAB)
    one_hot[:, :, 2] = 1.0
    tokens = torch.tensor([[0, 4, 2], [0, 4, -1]])
    parents = torch.tensor([[-1, 0, 0], [-1, 0, -1]])
    depth = torch.tensor([[0, 1, 1], [0, 1, 0]])
    valid = torch.tensor([[True, True, True], [True, True, False]])
    seeds = torch.arange(2, dtype=torch.int64)
    res = accept_sampled_children(tokens, parents, depth, valid, one_hot, one_hot, seeds, seeds, 1, 2)
    assert res.tokens.tolist() == [[2, 2], [2, -1]]
    assert res.path.tolist() == [[0, 2], [0, -1]]


def test_results_do_not_depend_on_batch_composition():
    rows, nodes, vocab = 60, 10, 6
    tree, logits, max_depth = random_trees(rows, nodes, vocab, seed=12)
    p = torch.softmax(logits, -1)
    q = torch.softmax(logits.flip(-1), -1)
    seeds = torch.arange(100, 100 + rows, dtype=torch.int64)
    offsets = torch.arange(rows, dtype=torch.int64) * 3
    pick = torch.tensor([41, 3, 17])
    sub = tuple(t[pick] for t in tree)
    full = accept_topk_children(*tree, p, seeds, offsets, max_depth)
    part = accept_topk_children(*sub, p[pick], seeds[pick], offsets[pick], max_depth)
    assert torch.equal(full.tokens[pick], part.tokens) and torch.equal(full.path[pick], part.path)
    full = accept_sampled_children(*tree, p, q, seeds, offsets, max_depth, 4)
    part = accept_sampled_children(*sub, p[pick], q[pick], seeds[pick], offsets[pick], max_depth, 4)
    assert torch.equal(full.tokens[pick], part.tokens) and torch.equal(full.path[pick], part.path)


def test_bad_inputs_raise():
    tree = small_tree()
    probs = torch.full((2, 7, 10), 0.1)
    seeds = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match="target_logits"):
        accept_greedy(*tree, probs[:, :5], max_depth=2)
    with pytest.raises(ValueError, match="parents"):
        accept_greedy(tree[0], tree[1][:, :3], tree[2], tree[3], probs, max_depth=2)
    with pytest.raises(ValueError, match="valid"):
        accept_greedy(*tree[:3], tree[3].long(), probs, max_depth=2)
    with pytest.raises(ValueError, match="max_depth"):
        accept_greedy(*tree, probs, max_depth=-1)
    with pytest.raises(ValueError, match="seeds"):
        accept_topk_children(*tree, probs, seeds[:1], seeds, max_depth=2)
    with pytest.raises(ValueError, match="draft_probs"):
        accept_sampled_children(*tree, probs, probs[..., :5], seeds, seeds, 2, 2)
    with pytest.raises(ValueError, match="max_children"):
        accept_sampled_children(*tree, probs, probs, seeds, seeds, 2, 0)


# ----------------------------------------------------------------------------- CUDA graphs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_no_host_sync_and_graph_capture_on_cuda():
    rows, nodes, vocab = 16, 12, 50
    tree, logits, max_depth = random_trees(rows, nodes, vocab, seed=13)
    dev = torch.device("cuda")
    tree = tuple(t.to(dev) for t in tree)
    logits = logits.to(dev)
    st = uniform_settings(rows, 0.8, 20, 0.9)
    st = replace(st, **{f: getattr(st, f).to(dev) for f in ("temperature", "top_k", "top_p", "seeds", "offsets")})
    per_node = st.expand(nodes)

    def step():
        p = target_probs(logits.reshape(-1, vocab), per_node).reshape(rows, nodes, vocab)
        return (accept_greedy(*tree, logits, max_depth),
                accept_topk_children(*tree, p, st.seeds, st.offsets, max_depth),
                accept_sampled_children(*tree, p, torch.softmax(logits, -1), st.seeds, st.offsets,
                                        max_depth, max_children=nodes))

    eager = step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up on a side stream before capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(eager, captured):
        assert_same_result(a, b)


def test_out_of_vocabulary_children_act_as_padding():
    """A draft that proposes ids outside the vocabulary (or negative ones) must not change what
    any rule emits: such children behave exactly like padding nodes, under every rule."""
    rows, nodes, vocab = 40, 9, 6
    (tokens, parents, depth, valid), logits, max_depth = random_trees(rows, nodes, vocab, seed=21)
    gen = torch.Generator().manual_seed(3)
    broken = valid & (torch.arange(nodes) > 0) & (torch.rand(rows, nodes, generator=gen) < 0.3)
    oov = torch.where(broken, torch.where(torch.rand(rows, nodes, generator=gen) < 0.5, vocab + 2, -5), tokens)
    p = torch.softmax(logits, -1)
    q = torch.softmax(logits.flip(-1), -1)
    seeds = torch.arange(rows, dtype=torch.int64)
    as_oov = (oov, parents, depth, valid)
    as_padding = (tokens, parents, depth, valid & ~broken)
    assert_same_result(accept_greedy(*as_oov, logits, max_depth), accept_greedy(*as_padding, logits, max_depth))
    assert_same_result(accept_topk_children(*as_oov, p, seeds, seeds, max_depth),
                       accept_topk_children(*as_padding, p, seeds, seeds, max_depth))
    assert_same_result(accept_sampled_children(*as_oov, p, q, seeds, seeds, max_depth, 4),
                       accept_sampled_children(*as_padding, p, q, seeds, seeds, max_depth, 4))
    assert bool(broken.any())
