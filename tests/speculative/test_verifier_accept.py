"""Tests of speculative/verifier.py's acceptance (``accept_tree``): one draw at every tree node
and one walk give what the per-depth walk gave (a draw at the current node, depth by depth),
temperature-0 rows stay greedy, and the K/V destinations follow the accepted path."""

from __future__ import annotations

from dataclasses import fields, is_dataclass, replace

import pytest
import torch

from eaglespec.ops.greedy_accept import AcceptResult, commit_indices
from eaglespec.ops.sampling import SamplingTensors, sample
from eaglespec.speculative.acceptance import accept_by_target_draws
from eaglespec.speculative.tree import TreeBatch, ancestor_bits_from_parents
from eaglespec.speculative.verifier import accept_tree, per_node_sampling
from tests.conftest import DEVICE, needs_triton_kernels

BLOCK_SIZE = 4
EVERY_NODE = 1 << 62  # accept_tree's visited_draws_from: draw at every node whatever the size
BACKENDS = ["torch", pytest.param("triton", marks=needs_triton_kernels)]


def random_tree_batch(rows: int, nodes: int, vocab: int, seed: int, duplicate_siblings: bool = False):
    """Random trees (sibling tokens distinct unless ``duplicate_siblings``), trailing padding
    (parent -1, token -1), and logits [B, N, V] that often favour one child's token.

    With ``duplicate_siblings`` some nodes copy an earlier sibling's token, and every node's
    logits are a function of its path of tokens, as a target's are: equal paths, equal logits."""
    gen = torch.Generator().manual_seed(seed)
    parents = torch.full((rows, nodes), -1, dtype=torch.int64)
    depth = torch.zeros(rows, nodes, dtype=torch.int64)
    tokens = torch.full((rows, nodes), -1, dtype=torch.int64)
    logits = torch.randn(rows, nodes, vocab, generator=gen) * 2.0
    for b in range(rows):
        used = int(torch.randint(1, nodes + 1, (1,), generator=gen))
        tokens[b, 0] = int(torch.randint(vocab, (1,), generator=gen))
        for i in range(1, used):
            p = int(torch.randint(i, (1,), generator=gen))
            parents[b, i], depth[b, i] = p, depth[b, p] + 1
            taken = [int(tokens[b, j]) for j in range(1, i) if parents[b, j] == p]
            if duplicate_siblings and taken and float(torch.rand(1, generator=gen)) < 0.5:
                tokens[b, i] = taken[0]
            else:
                free = [t for t in range(vocab) if t not in taken]
                tokens[b, i] = free[int(torch.randint(len(free), (1,), generator=gen))]
        for i in range(used):
            kids = [j for j in range(used) if parents[b, j] == i]
            if kids and float(torch.rand(1, generator=gen)) < 0.85:
                logits[b, i, tokens[b, kids[int(torch.randint(len(kids), (1,), generator=gen))]]] += 5.0
        if duplicate_siblings:  # logits from the path of tokens: one random row per distinct path
            paths: dict[tuple[int, ...], torch.Tensor] = {}
            for i in range(used):
                key, j = [], i
                while j >= 0:
                    key.append(int(tokens[b, j]))
                    j = int(parents[b, j])
                logits[b, i] = paths.setdefault(tuple(key), logits[b, i].clone())
    max_depth = int(depth.max())
    tree = TreeBatch(tokens, parents, depth, ancestor_bits_from_parents(parents, max_depth), depth.clone())
    return tree, logits, max_depth


def mixed_settings(rows: int, seed: int) -> SamplingTensors:
    """Rows at temperature 0.7 / top-p 0.9, 1.0 / top-k 5, 1.3 / no cut and 0 (greedy), with
    random seeds and counters."""
    gen = torch.Generator().manual_seed(seed)
    kinds = torch.arange(rows) % 4
    return SamplingTensors(
        temperature=torch.tensor([0.7, 1.0, 1.3, 0.0])[kinds],
        top_k=torch.tensor([0, 5, 0, 0], dtype=torch.int32)[kinds],
        top_p=torch.tensor([0.9, 1.0, 1.0, 1.0])[kinds],
        seeds=torch.randint(0, 2**62, (rows,), generator=gen),
        offsets=torch.randint(0, 1000, (rows,), generator=gen))


def per_depth_walk_ref(tree: TreeBatch, logits: torch.Tensor, st: SamplingTensors, max_depth: int) -> AcceptResult:
    """The sampled acceptance the verifier ran before (one full sampling pass per depth at each
    row's current node, noise counter offset + depth): the reference the batched draw must equal."""
    rows = torch.arange(tree.tokens.shape[0], device=tree.tokens.device)
    valid = (tree.parents >= 0) | (torch.arange(tree.tokens.shape[1], device=tree.tokens.device) == 0)
    return accept_by_target_draws(tree.tokens, tree.parents, tree.depth, valid, max_depth,
                                  lambda d, node: sample(logits[rows, node], replace(st, offsets=st.offsets + d)))


def block_tables_for(rows: int, max_depth: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached lengths [B] and shuffled block tables [B, blocks] int32 with room for the path."""
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(0, 9, (rows,), generator=gen)
    blocks = (8 + max_depth + 1) // BLOCK_SIZE + 1
    tables = torch.randperm(rows * blocks, generator=gen).reshape(rows, blocks).to(torch.int32) + 1
    return lens, tables


def moved(obj, device):
    """A tensor, or a dataclass of tensors, on ``device``."""
    if is_dataclass(obj):
        return type(obj)(*(moved(getattr(obj, f.name), device) for f in fields(obj)))
    return obj.to(device) if isinstance(obj, torch.Tensor) else obj


def on_backend(backend: str, *args):
    """The arguments where the backend runs: the kernels' device for "triton" (CUDA on a GPU
    machine, the CPU under the interpreter), the CPU for the torch reference."""
    return [moved(a, DEVICE if backend == "triton" else "cpu") for a in args]


def assert_same_accept(a: AcceptResult, b: AcceptResult) -> None:
    assert torch.equal(a.tokens, b.tokens)
    assert torch.equal(a.num_emitted, b.num_emitted)
    assert torch.equal(a.path, b.path)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_draw_for_all_nodes_equals_the_per_depth_walk(backend, seed):
    rows, nodes, vocab = 48, 13, 23
    tree, logits, max_depth = random_tree_batch(rows, nodes, vocab, seed=seed)
    st = mixed_settings(rows, seed=seed + 100)
    lens, tables = block_tables_for(rows, max_depth, seed)
    tree, logits, st, lens, tables = on_backend(backend, tree, logits, st, lens, tables)
    accept, where = accept_tree(tree, logits.reshape(rows * nodes, vocab), st, False, max_depth, lens, tables,
                                BLOCK_SIZE, backend, visited_draws_from=EVERY_NODE)
    ref = per_depth_walk_ref(tree, logits, st, max_depth)  # sampled on the same device: the same draws
    assert_same_accept(accept, ref)
    ref_where = commit_indices(ref.path, lens, tables, BLOCK_SIZE, nodes)
    assert torch.equal(where.slots, ref_where.slots) and torch.equal(where.rows, ref_where.rows)
    # Not vacuous: drafts get accepted, and some rows go deeper than one token.
    assert float(accept.num_emitted.double().mean()) > 1.5 and int(accept.num_emitted.max()) >= 3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed,duplicate_siblings", [(0, False), (1, False), (9, True)])
def test_draws_at_the_visited_nodes_only_equal_the_per_depth_walk(backend, seed, duplicate_siblings, monkeypatch):
    """From VISITED_DRAWS_MIN_ROWS tree rows on the verifier draws only where the walk goes: the
    same acceptance and K/V destinations as the per-depth walk, duplicate siblings included
    (there the first child's chain is taken, as the walk takes it)."""
    from eaglespec.speculative import verifier

    rows, nodes, vocab = 48, 13, 23
    tree, logits, max_depth = random_tree_batch(rows, nodes, vocab, seed=seed, duplicate_siblings=duplicate_siblings)
    st = mixed_settings(rows, seed=seed + 100)
    lens, tables = block_tables_for(rows, max_depth, seed)
    tree, logits, st, lens, tables = on_backend(backend, tree, logits, st, lens, tables)
    flat = logits.reshape(rows * nodes, vocab)
    assert_same_accept(verifier.accept_at_visited_nodes(tree, flat, st, max_depth),
                       per_depth_walk_ref(tree, logits, st, max_depth))
    monkeypatch.setattr(verifier, "VISITED_DRAWS_MIN_ROWS", rows * nodes)  # the default, reached
    accept, where = accept_tree(tree, flat, st, False, max_depth, lens, tables, BLOCK_SIZE, backend)
    ref = per_depth_walk_ref(tree, logits, st, max_depth)
    assert_same_accept(accept, ref)
    ref_where = commit_indices(ref.path, lens, tables, BLOCK_SIZE, nodes)
    assert torch.equal(where.slots, ref_where.slots) and torch.equal(where.rows, ref_where.rows)
    assert float(accept.num_emitted.double().mean()) > 1.5 and int(accept.num_emitted.max()) >= 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_temperature_zero_rows_are_greedy_in_a_sampled_batch(backend):
    rows, nodes, vocab = 40, 11, 17
    tree, logits, max_depth = random_tree_batch(rows, nodes, vocab, seed=5)
    st = mixed_settings(rows, seed=6)
    lens, tables = block_tables_for(rows, max_depth, 7)
    tree, logits, st, lens, tables = on_backend(backend, tree, logits, st, lens, tables)
    flat = logits.reshape(rows * nodes, vocab)
    sampled, _ = accept_tree(tree, flat, st, False, max_depth, lens, tables, BLOCK_SIZE, backend)
    greedy, _ = accept_tree(tree, flat, st, True, max_depth, lens, tables, BLOCK_SIZE, backend)
    cold = st.temperature == 0
    assert int(cold.sum()) == rows // 4
    assert torch.equal(sampled.tokens[cold], greedy.tokens[cold])
    assert torch.equal(sampled.path[cold], greedy.path[cold])
    # The sampled rows do sample: at these temperatures some of them leave the greedy path.
    assert not torch.equal(sampled.tokens[~cold], greedy.tokens[~cold])


@pytest.mark.parametrize("backend", BACKENDS)
def test_duplicate_siblings_continue_the_first_child_walk(backend):
    """Siblings with one token share their context, hence their draws: the walk may follow a
    later copy deeper, and what it emits starts with what the first-child walk emits (the
    same draws, its bonus included)."""
    rows, nodes, vocab = 60, 14, 6
    tree, logits, max_depth = random_tree_batch(rows, nodes, vocab, seed=9, duplicate_siblings=True)
    st = mixed_settings(rows, seed=10)
    lens, tables = block_tables_for(rows, max_depth, 11)
    tree, logits, st, lens, tables = on_backend(backend, tree, logits, st, lens, tables)
    accept, _ = accept_tree(tree, logits.reshape(rows * nodes, vocab), st, False, max_depth, lens, tables,
                            BLOCK_SIZE, backend, visited_draws_from=EVERY_NODE)
    ref = per_depth_walk_ref(tree, logits, st, max_depth)
    assert (accept.num_emitted >= ref.num_emitted).all()
    steps = torch.arange(max_depth + 1, device=ref.tokens.device)
    same_prefix = torch.where(steps < ref.num_emitted[:, None], accept.tokens == ref.tokens, True)
    assert same_prefix.all()
    assert (accept.num_emitted > ref.num_emitted).any(), "no later copy was ever deeper: the test proves little"


def test_per_node_sampling_repeats_each_request_and_adds_the_depth():
    st = mixed_settings(3, seed=1)
    depth = torch.tensor([[0, 1, 1, 2], [0, 1, 2, 3], [0, 0, 0, 0]])
    rows = per_node_sampling(st, depth)
    assert rows.num_rows == 12 and rows.sort_width == st.sort_width
    assert torch.equal(rows.seeds, st.seeds.repeat_interleave(4))
    assert torch.equal(rows.temperature, st.temperature.repeat_interleave(4))
    assert torch.equal(rows.offsets, st.offsets.repeat_interleave(4) + depth.reshape(-1))
    with pytest.raises(ValueError, match="3 rows of sampling settings for 2 trees"):
        per_node_sampling(st, depth[:2])


def test_accept_tree_names_a_wrong_logits_shape():
    tree, logits, max_depth = random_tree_batch(2, 5, 7, seed=3)
    lens, tables = block_tables_for(2, max_depth, 3)
    with pytest.raises(ValueError, match=r"logits must be \[batch \* nodes = 10, vocab\]"):
        accept_tree(tree, logits, mixed_settings(2, 0), False, max_depth, lens, tables, BLOCK_SIZE, "torch")
