"""Greedy acceptance of a verified tree and where its accepted K/V go, in one launch.

Given the target's argmax at every tree node, a node is *correct* when its token is its
parent's argmax; the accepted node is the deepest one whose whole ancestor chain is correct
(lowest index among equals: siblings are tried in index order). Emitted: the accepted path's
draft tokens, then the bonus token (the argmax at the accepted node). The same launch also
says where the path's K/V go: path entry i of a sequence lands at cache position L + i (flat
slot through the block table; the scratch slot 0 for entries past the path) and comes from
flat tree row b * N + node — so committing is two copies and the next step's features one
row gather.

``accept_greedy_by_masks`` is the PyTorch reference of the acceptance (~20 batched ops, no
per-depth walk); ``commit_indices`` the one of the K/V destinations. Fixed shapes, no host
synchronisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from eaglespec.ops.triton_support import jit as _jit, tl, triton  # noqa: F401


@dataclass
class AcceptResult:
    """What one verify step emits per sequence (fixed shapes, -1 padded)."""

    tokens: torch.Tensor  # [B, max_depth + 1] int64: accepted draft tokens, then the bonus token
    num_emitted: torch.Tensor  # [B] int64: accepted + 1
    path: torch.Tensor  # [B, max_depth + 1] int64: root, then accepted nodes (num_emitted entries)


@dataclass(slots=True)
class CommitIndices:
    """Where the K/V of chosen tree nodes go: entry i of sequence b -> cache position L_b + i."""

    slots: torch.Tensor  # [B * W] int64 flat cache slot (scratch slot 0 for entries with no node)
    rows: torch.Tensor  # [B * W] int64 flat tree row b * N + node (node 0 for entries with no node)


# ----------------------------------------------------------------------------- references


def accept_greedy_by_masks(tokens: torch.Tensor, parents: torch.Tensor, depth: torch.Tensor,
                           ancestor_bits: torch.Tensor, best: torch.Tensor, max_depth: int) -> AcceptResult:
    """Greedy acceptance without a walk: ~20 batched ops whatever the depth.

    best [B, N] is the target's argmax at every node; ancestor_bits [B, N] as in TreeBatch (a
    node's own bit and its ancestors'). This equals the walk when siblings carry distinct
    tokens (at most one child of a node can then match), which holds for trees of top-k
    children; with duplicate siblings the walk would take the first.
    """
    batch, nodes = tokens.shape
    device = tokens.device
    index = torch.arange(nodes, device=device)
    parent_best = torch.gather(best, 1, parents.clamp_min(0))
    # Only node 0 is the root: any other node without a parent (an orphan, which a tree built
    # from degenerate draft scores can hold) is never accepted, as in the walk.
    correct = torch.where(index == 0, True, (tokens == parent_best) & (parents >= 0))
    one = torch.ones((), dtype=torch.int64, device=device)
    correct_bits = (correct.long() * (one << index)).sum(dim=1)  # distinct bits: the sum is an OR
    chain_ok = (ancestor_bits & ~correct_bits[:, None]) == 0
    # Deepest correct chain; among equals the lowest index (siblings are tried in index order).
    score = torch.where(chain_ok, depth * (nodes + 1) + (nodes - index), torch.full_like(depth, -1))
    last = score.argmax(dim=1)  # [B]
    accepted = torch.gather(depth, 1, last[:, None])[:, 0]
    on_path = ((torch.gather(ancestor_bits, 1, last[:, None]) >> index) & 1) == 1  # [B, N]
    width = max_depth + 1
    # path[b, depth of node] = node for nodes on the accepted path; others go to a spare column.
    column = torch.where(on_path, depth.clamp(max=max_depth), torch.full_like(depth, width))
    path = torch.full((batch, width + 1), -1, dtype=torch.int64, device=device)
    path.scatter_(1, column, torch.where(on_path, index.expand(batch, -1), torch.full_like(depth, -1)))
    path = path[:, :width]
    # Emitted: the tokens of path[1..accepted], then the bonus (best at the last node).
    steps = torch.arange(width, device=device)
    next_node = torch.cat([path[:, 1:], torch.full((batch, 1), -1, dtype=torch.int64, device=device)], dim=1)
    drafted = torch.gather(tokens, 1, next_node.clamp_min(0))
    bonus = torch.gather(best, 1, last[:, None])
    out = torch.where(steps < accepted[:, None], drafted, torch.where(steps == accepted[:, None], bonus,
                                                                        torch.full_like(drafted, -1)))
    return AcceptResult(tokens=out, num_emitted=accepted + 1, path=path)


def commit_indices(nodes: torch.Tensor, start_pos: torch.Tensor, block_tables: torch.Tensor, block_size: int,
                   tree_nodes: int) -> CommitIndices:
    """nodes [B, W] node index of each entry to keep (-1: none), start_pos [B] (L), block
    tables [B, max_blocks] int32, tree_nodes = N -> the flat slots and tree rows of every entry."""
    bsz, width = nodes.shape
    pos = start_pos[:, None].long() + torch.arange(width, device=nodes.device)
    col = (pos // block_size).clamp(max=block_tables.shape[1] - 1)
    block = torch.gather(block_tables.long(), 1, col)
    slots = torch.where(nodes >= 0, block * block_size + pos % block_size, torch.zeros_like(pos))
    rows = torch.arange(bsz, device=nodes.device)[:, None] * tree_nodes + nodes.clamp_min(0)
    return CommitIndices(slots.reshape(-1), rows.reshape(-1))


def greedy_accept_ref(tokens: torch.Tensor, parents: torch.Tensor, depth: torch.Tensor, ancestor_bits: torch.Tensor,
                      best: torch.Tensor, max_depth: int, cached_lens: torch.Tensor, block_tables: torch.Tensor,
                      block_size: int) -> tuple[AcceptResult, CommitIndices]:
    """The accepted path (``accept_greedy_by_masks``) and where its K/V go (``commit_indices``)."""
    accept = accept_greedy_by_masks(tokens, parents, depth, ancestor_bits, best, max_depth)
    return accept, commit_indices(accept.path, cached_lens, block_tables, block_size, tokens.shape[1])


# ----------------------------------------------------------------------------- kernel

_BIG = tl.constexpr(2147483647) if tl is not None else 2147483647  # Triton globals must be constexprs


@_jit
def _greedy_accept_kernel(
    tok_ptr, par_ptr, dep_ptr, bits_ptr, best_ptr, lens_ptr, table_ptr,
    out_tok_ptr, out_num_ptr, out_path_ptr, out_slot_ptr, out_row_ptr,
    N, W, max_blocks, stride_table, block_size,
    BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """Program (sequence): accepted path, emitted tokens and the path's commit indices."""
    b = tl.program_id(0).to(tl.int64)
    n = tl.arange(0, BLOCK_N)
    ok = n < N
    tok = tl.load(tok_ptr + b * N + n, mask=ok, other=0)
    par = tl.load(par_ptr + b * N + n, mask=ok, other=-1)
    dep = tl.load(dep_ptr + b * N + n, mask=ok, other=0)
    bits = tl.load(bits_ptr + b * N + n, mask=ok, other=0)
    best = tl.load(best_ptr + b * N + n, mask=ok, other=0)
    parent_best = tl.load(best_ptr + b * N + tl.maximum(par, 0), mask=ok, other=0)
    correct = ((n == 0) | ((tok == parent_best) & (par >= 0))) & ok
    one = tl.full((BLOCK_N,), 1, tl.int64)
    correct_bits = tl.sum(tl.where(correct, one << n.to(tl.int64), 0), axis=0)
    chain_ok = ((bits & (correct_bits ^ -1)) == 0) & ok
    score = tl.where(chain_ok, dep * (N + 1) + (N - n), -1)
    top = tl.max(score, axis=0)
    last = tl.min(tl.where(score == top, n, _BIG), axis=0)
    at_last = n == last
    accepted = tl.sum(tl.where(at_last, dep, 0), axis=0)
    last_bits = tl.sum(tl.where(at_last, bits, 0), axis=0)
    bonus = tl.sum(tl.where(at_last, best, 0), axis=0)
    on_path = (((last_bits >> n.to(tl.int64)) & 1) == 1) & ok
    w = tl.arange(0, BLOCK_W)
    w_ok = w < W
    here = on_path[None, :] & (dep[None, :] == w[:, None])
    path = tl.where(tl.max(here.to(tl.int32), axis=1) > 0, tl.sum(tl.where(here, n[None, :], 0), axis=1), -1)
    following = on_path[None, :] & (dep[None, :] == w[:, None] + 1)
    drafted = tl.sum(tl.where(following, tok[None, :], 0), axis=1)
    out = tl.where(w < accepted, drafted, tl.where(w == accepted, bonus, -1))
    pos = tl.load(lens_ptr + b).to(tl.int64) + w
    col = tl.minimum(pos // block_size, max_blocks - 1)
    block = tl.load(table_ptr + b * stride_table + col, mask=w_ok, other=0).to(tl.int64)
    slot = tl.where(path >= 0, block * block_size + pos % block_size, 0)
    tl.store(out_tok_ptr + b * W + w, out, mask=w_ok)
    tl.store(out_path_ptr + b * W + w, path.to(tl.int64), mask=w_ok)
    tl.store(out_slot_ptr + b * W + w, slot, mask=w_ok)
    tl.store(out_row_ptr + b * W + w, b * N + tl.maximum(path, 0).to(tl.int64), mask=w_ok)
    tl.store(out_num_ptr + b, (accepted + 1).to(tl.int64))


# ----------------------------------------------------------------------------- launcher


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def greedy_accept(tokens: torch.Tensor, parents: torch.Tensor, depth: torch.Tensor, ancestor_bits: torch.Tensor,
                  best: torch.Tensor, max_depth: int, cached_lens: torch.Tensor, block_tables: torch.Tensor,
                  block_size: int) -> tuple[AcceptResult, CommitIndices]:
    """Triton version of ``greedy_accept_ref`` (same arguments and results), one launch.

    tokens/parents/depth/ancestor_bits/best [B, N] int64 contiguous (N <= 64), cached_lens [B]
    int32 or int64, block_tables [B, max_blocks] int32 (rows may be strided)."""
    _check(isinstance(tokens, torch.Tensor) and tokens.dim() == 2, "tokens must be a [batch, nodes] tensor")
    bsz, nodes = tokens.shape
    for name, t in (("tokens", tokens), ("parents", parents), ("depth", depth), ("ancestor_bits", ancestor_bits),
                    ("best", best)):
        _check(isinstance(t, torch.Tensor) and tuple(t.shape) == (bsz, nodes) and t.dtype == torch.int64
               and t.is_contiguous(), f"{name} must be a contiguous int64 tensor of shape {(bsz, nodes)}, got "
               f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
        _check(t.device == tokens.device, f"{name} is on {t.device}, tokens on {tokens.device}")
    _check(1 <= nodes <= 64, f"trees have 1..64 nodes (int64 ancestor masks), got {nodes}")
    _check(isinstance(max_depth, int) and max_depth >= 0, f"max_depth must be a host int >= 0, got {max_depth!r}")
    _check(cached_lens.shape == (bsz,) and cached_lens.dtype in (torch.int32, torch.int64) and cached_lens.is_contiguous(),
           f"cached_lens must be a contiguous int32/int64 [{bsz}] tensor, got {cached_lens.dtype} {tuple(cached_lens.shape)}")
    _check(block_tables.dim() == 2 and block_tables.shape[0] == bsz and block_tables.dtype == torch.int32
           and block_tables.stride(1) == 1, f"block_tables must be int32 [{bsz}, max_blocks] with unit inner stride, "
                                            f"got {block_tables.dtype} {tuple(block_tables.shape)}")
    _check(isinstance(block_size, int) and block_size >= 1, f"block_size must be a positive int, got {block_size!r}")
    if triton is None:
        raise RuntimeError("triton is not installed: use greedy_accept_ref")
    _check(tokens.is_cuda or type(_greedy_accept_kernel).__name__ == "InterpretedFunction",
           f"greedy_accept needs CUDA tensors (got {tokens.device}); set TRITON_INTERPRET=1 to run it on the CPU")
    dev = tokens.device
    width = max_depth + 1
    out_tokens = torch.empty(bsz, width, dtype=torch.int64, device=dev)
    num = torch.empty(bsz, dtype=torch.int64, device=dev)
    path = torch.empty(bsz, width, dtype=torch.int64, device=dev)
    slots = torch.empty(bsz * width, dtype=torch.int64, device=dev)
    rows = torch.empty(bsz * width, dtype=torch.int64, device=dev)
    if bsz:
        _greedy_accept_kernel[(bsz,)](
            tokens, parents, depth, ancestor_bits, best, cached_lens, block_tables,
            out_tokens, num, path, slots, rows,
            nodes, width, block_tables.shape[1], block_tables.stride(0), block_size,
            BLOCK_N=max(16, _pow2(nodes)), BLOCK_W=max(16, _pow2(width)), num_warps=1)
    return AcceptResult(out_tokens, num, path), CommitIndices(slots, rows)


# ----------------------------------------------------------------------------- the head's extend


@dataclass(slots=True)
class ExtendIndices:
    """Where the head's pending pairs of one step go (W pairs per sequence, the first ``count`` real)."""

    positions: torch.Tensor  # [B * W] int64 position of each pair (prefix_len + i)
    commit: CommitIndices  # pairs past ``count`` go to the scratch slot
    last_rows: torch.Tensor  # [B] int64 flat row b * W + count - 1 of each sequence's last real pair


def extend_indices_ref(counts: torch.Tensor, prefix_lens: torch.Tensor, block_tables: torch.Tensor,
                       block_size: int, width: int) -> ExtendIndices:
    """counts [B] (1..W real pairs), prefix_lens [B] pairs already cached -> ``ExtendIndices``."""
    bsz = counts.shape[0]
    steps = torch.arange(width, device=counts.device)
    positions = prefix_lens[:, None].long() + steps
    nodes = torch.where(steps < counts[:, None], steps, torch.full_like(positions, -1))
    last_rows = torch.arange(bsz, device=counts.device) * width + (counts.long() - 1).clamp_min(0)
    return ExtendIndices(positions.reshape(-1), commit_indices(nodes, prefix_lens, block_tables, block_size, width),
                         last_rows)


@_jit
def _extend_indices_kernel(counts_ptr, lens_ptr, table_ptr, pos_ptr, slot_ptr, row_ptr, last_ptr,
                           W, max_blocks, stride_table, block_size, BLOCK_W: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    w = tl.arange(0, BLOCK_W)
    w_ok = w < W
    count = tl.load(counts_ptr + b).to(tl.int64)
    pos = tl.load(lens_ptr + b).to(tl.int64) + w
    col = tl.minimum(pos // block_size, max_blocks - 1)
    block = tl.load(table_ptr + b * stride_table + col, mask=w_ok, other=0).to(tl.int64)
    real = w < count
    tl.store(pos_ptr + b * W + w, pos, mask=w_ok)
    tl.store(slot_ptr + b * W + w, tl.where(real, block * block_size + pos % block_size, 0), mask=w_ok)
    tl.store(row_ptr + b * W + w, b * W + tl.where(real, w, 0), mask=w_ok)
    tl.store(last_ptr + b, b * W + tl.maximum(count - 1, 0))


def extend_indices(counts: torch.Tensor, prefix_lens: torch.Tensor, block_tables: torch.Tensor,
                   block_size: int, width: int) -> ExtendIndices:
    """Triton version of ``extend_indices_ref`` (same arguments and results), one launch."""
    bsz = counts.shape[0] if isinstance(counts, torch.Tensor) and counts.dim() == 1 else -1
    for name, t in (("counts", counts), ("prefix_lens", prefix_lens)):
        _check(isinstance(t, torch.Tensor) and tuple(t.shape) == (bsz,) and t.dtype in (torch.int32, torch.int64)
               and t.is_contiguous(), f"{name} must be a contiguous int32/int64 [batch] tensor, got "
               f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
    _check(block_tables.dim() == 2 and block_tables.shape[0] == bsz and block_tables.dtype == torch.int32
           and block_tables.stride(1) == 1, f"block_tables must be int32 [{bsz}, max_blocks] with unit inner stride, "
                                            f"got {block_tables.dtype} {tuple(block_tables.shape)}")
    _check(isinstance(width, int) and width >= 1 and isinstance(block_size, int) and block_size >= 1,
           f"width and block_size must be positive ints, got {width!r}, {block_size!r}")
    dev = counts.device
    out = ExtendIndices(torch.empty(bsz * width, dtype=torch.int64, device=dev),
                        CommitIndices(torch.empty(bsz * width, dtype=torch.int64, device=dev),
                                      torch.empty(bsz * width, dtype=torch.int64, device=dev)),
                        torch.empty(bsz, dtype=torch.int64, device=dev))
    if bsz:
        _extend_indices_kernel[(bsz,)](counts, prefix_lens, block_tables, out.positions, out.commit.slots,
                                       out.commit.rows, out.last_rows, width, block_tables.shape[1],
                                       block_tables.stride(0), block_size, BLOCK_W=max(16, _pow2(width)),
                                       num_warps=1)
    return out
