"""Growing a batch of draft trees on the device: one launch per tree level, one to lay out the tree.

Drafting keeps, per sequence, a pool of candidate nodes (every child proposed so far) and a
frontier (the nodes the head runs next). After the head has scored the frontier's children
(``draft_topk``: k per frontier row, best first), ``expand_level``:
  - scores each child: its parent's cumulative log-probability + its own;
  - appends the children to the pool (all of them, or the fixed columns of a static tree);
  - picks the next frontier: the ``width`` best children (or the static columns), with their
    tokens, scores, pool index, the flat row of their parent among this level's head rows
    (whose hidden state they read next) and their attention bits over the draft side slots
    (the parent's bits plus their own slot).
``select_tree`` then takes the ``num_nodes`` best pool candidates per sequence and lays them out
as the verified tree: root first, nodes by depth then score, parent indices, depths and ancestor
bitmasks, in one launch.

Ties (equal scores) go to the lowest candidate index in the kernels and in the references (stable
sorts), so both build the same trees. Fixed shapes, no host synchronisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from eaglespec.ops.triton_support import jit as _jit, tl, triton  # noqa: F401


@dataclass(slots=True)
class CandidatePool:
    """Every candidate proposed so far, per sequence (filled level by level, in place)."""

    tokens: torch.Tensor  # [B, P] int64 target token ids
    scores: torch.Tensor  # [B, P] fp32 cumulative draft log-probability
    parents: torch.Tensor  # [B, P] int64 pool index of the parent, -1 for a child of the root
    depth: torch.Tensor  # [P] int64 depth of each pool column (>= 1), the same for every sequence

    @classmethod
    def allocate(cls, batch: int, depth: torch.Tensor) -> "CandidatePool":
        size, dev = depth.shape[0], depth.device
        return cls(torch.empty(batch, size, dtype=torch.int64, device=dev),
                   torch.empty(batch, size, dtype=torch.float32, device=dev),
                   torch.empty(batch, size, dtype=torch.int64, device=dev), depth)


@dataclass(slots=True)
class Frontier:
    """The nodes the head runs at the next level, W per sequence."""

    tokens: torch.Tensor  # [B, W] int64
    scores: torch.Tensor  # [B, W] fp32 cumulative log-probability
    pool_index: torch.Tensor  # [B, W] int64 where each sits in the pool
    rows: torch.Tensor  # [B * W] int64 flat row of the parent among the level's head rows
    bits: torch.Tensor  # [B, W] int64 draft side slots each may attend to (its own included)


@dataclass(slots=True)
class Level:
    """How one level grows (host values, fixed for a tree shape)."""

    offset: int  # first pool column of this level's candidates
    width: int  # frontier nodes chosen for the next level
    slot: int  # first draft side slot of that next frontier
    static_columns: torch.Tensor | None = None  # [width] int64: a static tree's kept candidates


def _candidates(child_values, child_tokens, parent: Frontier | None, branch: int):
    """Scores, parents' pool indices and parents' bits of every candidate [B, F * k]."""
    bsz, count = child_values.shape
    if parent is None:
        zeros = torch.zeros_like(child_tokens)
        return child_values, zeros - 1, zeros
    local = torch.arange(count, device=child_values.device) // branch
    scores = child_values + parent.scores.index_select(1, local)
    return scores, parent.pool_index.index_select(1, local), parent.bits.index_select(1, local)


def expand_level_ref(child_values: torch.Tensor, child_tokens: torch.Tensor, parent: Frontier | None,
                     pool: CandidatePool, level: Level, branch: int) -> Frontier:
    """child_values/child_tokens [B, F * k] (k = branch children per frontier row, best first;
    the root level: F = 1 and ``parent`` None). Writes the level's candidates into ``pool``
    and returns the next frontier."""
    bsz, count = child_values.shape
    dev = child_values.device
    scores, parents, bits = _candidates(child_values, child_tokens, parent, branch)
    if level.static_columns is not None:
        chosen = level.static_columns.expand(bsz, -1)
        kept = chosen
        pool_index = torch.arange(level.width, device=dev).expand(bsz, -1) + level.offset
    else:
        chosen = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :level.width]
        kept = torch.arange(count, device=dev).expand(bsz, -1)
        pool_index = chosen + level.offset
    end = level.offset + kept.shape[1]
    pool.tokens[:, level.offset:end] = torch.gather(child_tokens, 1, kept)
    pool.scores[:, level.offset:end] = torch.gather(scores, 1, kept)
    pool.parents[:, level.offset:end] = torch.gather(parents, 1, kept)
    own = torch.ones((), dtype=torch.int64, device=dev) << (level.slot + torch.arange(level.width, device=dev))
    frows = count // branch
    rows = torch.arange(bsz, device=dev)[:, None] * frows + chosen // branch
    return Frontier(torch.gather(child_tokens, 1, chosen), torch.gather(scores, 1, chosen), pool_index,
                    rows.reshape(-1), torch.gather(bits, 1, chosen) | own)


def select_tree_ref(pool: CandidatePool, root_tokens: torch.Tensor, num_nodes: int,
                    max_depth: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``num_nodes`` best candidates of each pool laid out as a tree, root first.

    Returns tokens, parents (-1 for the root), depth and ancestor bits, each [B, num_nodes + 1]
    int64. Nodes come ordered by depth, then by score (lowest pool index on ties), so every
    parent precedes its children and siblings are tried best first.
    """
    bsz = pool.tokens.shape[0]
    dev = pool.tokens.device
    depth = pool.depth.expand(bsz, -1)
    # A tiny depth penalty breaks ties towards parents: a child's key is then strictly smaller.
    key = pool.scores - 1e-4 * depth.float()
    chosen = torch.sort(key, dim=1, descending=True, stable=True).indices[:, :num_nodes]
    order = torch.sort(torch.gather(depth, 1, chosen), dim=1, stable=True).indices
    chosen = torch.gather(chosen, 1, order)
    node_of_candidate = torch.full_like(pool.tokens, -1)
    node_of_candidate.scatter_(1, chosen, torch.arange(1, num_nodes + 1, device=dev).expand(bsz, -1))
    cand_parent = torch.gather(pool.parents, 1, chosen)
    parent_node = torch.where(cand_parent >= 0, torch.gather(node_of_candidate, 1, cand_parent.clamp_min(0)),
                              torch.zeros_like(cand_parent))
    minus_one = torch.full((bsz, 1), -1, dtype=torch.int64, device=dev)
    parents = torch.cat([minus_one, parent_node], dim=1)
    tokens = torch.cat([root_tokens[:, None].long(), torch.gather(pool.tokens, 1, chosen)], dim=1)
    depths = torch.cat([torch.zeros_like(minus_one), torch.gather(depth, 1, chosen)], dim=1)
    return tokens, parents, depths, ancestor_bits_from_parents(parents, max_depth)


def ancestor_bits_from_parents(parents: torch.Tensor, max_depth: int) -> torch.Tensor:
    """[B, N] parents (parents before children, -1 = none) -> [B, N] int64 ancestor bitmasks
    (bit j of row i set when node j is i or one of its ancestors)."""
    n = parents.shape[1]
    own = torch.ones((), dtype=torch.int64, device=parents.device) << torch.arange(n, device=parents.device)
    bits = own.expand_as(parents).clone()
    has_parent = parents >= 0
    safe = parents.clamp_min(0)
    for _ in range(max_depth):  # each pass pulls in one more generation
        inherited = torch.gather(bits, 1, safe)
        bits = torch.where(has_parent, own | inherited, own)
    return bits


# ----------------------------------------------------------------------------- kernels

_BIG = tl.constexpr(2147483647) if tl is not None else 2147483647  # past every candidate index (Triton globals must be constexprs)


@_jit
def _expand_level_kernel(
    val_ptr, tok_ptr, f_score_ptr, f_pool_ptr, f_bits_ptr, cols_ptr,
    pool_tok_ptr, pool_score_ptr, pool_parent_ptr,
    out_tok_ptr, out_score_ptr, out_pool_ptr, out_rows_ptr, out_bits_ptr,
    C, F, P, offset, slot,
    K: tl.constexpr, W: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr,
    ROOT: tl.constexpr, STATIC: tl.constexpr,
):
    """Program (sequence): score the level's candidates, fill the pool, pick the next frontier."""
    b = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK_C)
    c_ok = c < C
    val = tl.load(val_ptr + b * C + c, mask=c_ok, other=float("-inf"))
    tok = tl.load(tok_ptr + b * C + c, mask=c_ok, other=0)
    f = c // K
    if ROOT:
        score = val
        parent = tl.full((BLOCK_C,), -1, tl.int64)
        pbits = tl.zeros((BLOCK_C,), tl.int64)
    else:
        score = val + tl.load(f_score_ptr + b * F + f, mask=c_ok, other=0.0)
        parent = tl.load(f_pool_ptr + b * F + f, mask=c_ok, other=-1)
        pbits = tl.load(f_bits_ptr + b * F + f, mask=c_ok, other=0)
    j = tl.arange(0, BLOCK_W)
    j_ok = j < W
    if STATIC:
        chosen = tl.load(cols_ptr + j, mask=j_ok, other=0)
        pool_col = offset + j
        # The pool gets exactly the frontier: gather the chosen candidates from memory.
        c_score = tl.load(val_ptr + b * C + chosen, mask=j_ok, other=0.0)
        if not ROOT:
            c_score += tl.load(f_score_ptr + b * F + chosen // K, mask=j_ok, other=0.0)
        c_tok = tl.load(tok_ptr + b * C + chosen, mask=j_ok, other=0)
        if ROOT:
            c_parent = tl.full((BLOCK_W,), -1, tl.int64)
            c_pbits = tl.zeros((BLOCK_W,), tl.int64)
        else:
            c_parent = tl.load(f_pool_ptr + b * F + chosen // K, mask=j_ok, other=-1)
            c_pbits = tl.load(f_bits_ptr + b * F + chosen // K, mask=j_ok, other=0)
        tl.store(pool_tok_ptr + b * P + pool_col, c_tok, mask=j_ok)
        tl.store(pool_score_ptr + b * P + pool_col, c_score, mask=j_ok)
        tl.store(pool_parent_ptr + b * P + pool_col, c_parent, mask=j_ok)
    else:
        tl.store(pool_tok_ptr + b * P + offset + c, tok, mask=c_ok)
        tl.store(pool_score_ptr + b * P + offset + c, score, mask=c_ok)
        tl.store(pool_parent_ptr + b * P + offset + c, parent, mask=c_ok)
        # The W best by score, lowest index on ties (repeated extraction).
        chosen = tl.zeros((BLOCK_W,), tl.int32)
        left = tl.where(c_ok, score, float("-inf"))
        index = tl.where(c_ok, c, _BIG)
        for it in tl.static_range(W):
            best = tl.max(left, axis=0)
            pick = tl.min(tl.where(left == best, index, _BIG), axis=0)
            chosen = tl.where(j == it, pick, chosen)
            left = tl.where(index == pick, float("-inf"), left)
            index = tl.where(index == pick, _BIG, index)
        hit = chosen[:, None] == c[None, :]
        c_score = tl.sum(tl.where(hit, score[None, :], 0.0), axis=1)
        c_tok = tl.sum(tl.where(hit, tok[None, :], 0), axis=1)
        c_pbits = tl.sum(tl.where(hit, pbits[None, :], 0), axis=1)
        pool_col = offset + chosen
    one = tl.full((BLOCK_W,), 1, tl.int64)
    tl.store(out_tok_ptr + b * W + j, c_tok, mask=j_ok)
    tl.store(out_score_ptr + b * W + j, c_score, mask=j_ok)
    tl.store(out_pool_ptr + b * W + j, pool_col.to(tl.int64), mask=j_ok)
    tl.store(out_rows_ptr + b * W + j, b * (C // K) + (chosen // K).to(tl.int64), mask=j_ok)
    tl.store(out_bits_ptr + b * W + j, c_pbits | (one << (slot + j).to(tl.int64)), mask=j_ok)


@_jit
def _select_tree_kernel(
    pool_tok_ptr, pool_score_ptr, pool_parent_ptr, pool_depth_ptr, root_ptr,
    tokens_ptr, parents_ptr, depth_ptr, bits_ptr,
    P, MAX_DEPTH,
    K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Program (sequence): the K best candidates, ordered by depth then score, as a tree."""
    b = tl.program_id(0).to(tl.int64)
    N = K + 1
    p = tl.arange(0, BLOCK_P)
    p_ok = p < P
    depth = tl.load(pool_depth_ptr + p, mask=p_ok, other=0)
    key = tl.load(pool_score_ptr + b * P + p, mask=p_ok, other=0.0) - 1e-4 * depth.to(tl.float32)
    key = tl.where(p_ok, key, float("-inf"))
    index = tl.where(p_ok, p, _BIG)
    i = tl.arange(0, BLOCK_K)
    i_ok = i < K
    chosen = tl.zeros((BLOCK_K,), tl.int32)
    for it in range(K):
        best = tl.max(key, axis=0)
        pick = tl.min(tl.where(key == best, index, _BIG), axis=0)
        chosen = tl.where(i == it, pick, chosen)
        key = tl.where(index == pick, float("-inf"), key)
        index = tl.where(index == pick, _BIG, index)
    c_depth = tl.load(pool_depth_ptr + chosen, mask=i_ok, other=0)
    c_tok = tl.load(pool_tok_ptr + b * P + chosen, mask=i_ok, other=0)
    c_parent = tl.load(pool_parent_ptr + b * P + chosen, mask=i_ok, other=-1)
    # Node index: 1 + rank by (depth, order of choice), a stable sort by depth.
    ii = i[:, None]
    jj = i[None, :]
    before = ((c_depth[None, :] < c_depth[:, None]) | ((c_depth[None, :] == c_depth[:, None]) & (jj < ii)))
    node = 1 + tl.sum((before & (jj < K)).to(tl.int64), axis=1)
    # Parent node: the chosen candidate that is this one's parent (0 = the root).
    is_parent = (chosen[None, :] == c_parent[:, None]) & (jj < K)
    parent_node = tl.sum(tl.where(is_parent, node[None, :], 0), axis=1)
    one = tl.full((BLOCK_K,), 1, tl.int64)
    own = (one << node) | 1
    bits = own
    for _ in range(MAX_DEPTH):  # each pass pulls in one more generation (one parent at most: sum = or)
        bits = own | tl.sum(tl.where(is_parent, bits[None, :], 0), axis=1)
    root = tl.load(root_ptr + b)
    tl.store(tokens_ptr + b * N, root.to(tl.int64))
    tl.store(parents_ptr + b * N, -1)
    tl.store(depth_ptr + b * N, 0)
    tl.store(bits_ptr + b * N, 1)
    tl.store(tokens_ptr + b * N + node, c_tok, mask=i_ok)
    tl.store(parents_ptr + b * N + node, parent_node, mask=i_ok)
    tl.store(depth_ptr + b * N + node, c_depth, mask=i_ok)
    tl.store(bits_ptr + b * N + node, bits, mask=i_ok)


# ----------------------------------------------------------------------------- launchers


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _check_int(name: str, t: torch.Tensor, shape: tuple, dtype=torch.int64) -> None:
    _check(isinstance(t, torch.Tensor) and tuple(t.shape) == shape and t.dtype == dtype and t.is_contiguous(),
           f"{name} must be a contiguous {dtype} tensor of shape {shape}, got "
           f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")


def _check_pool(pool: CandidatePool, bsz: int) -> int:
    size = pool.depth.shape[0] if isinstance(pool.depth, torch.Tensor) else -1
    _check_int("pool.depth", pool.depth, (size,))
    _check_int("pool.tokens", pool.tokens, (bsz, size))
    _check_int("pool.parents", pool.parents, (bsz, size))
    _check_int("pool.scores", pool.scores, (bsz, size), torch.float32)
    return size


def _require_triton(t: torch.Tensor) -> None:
    if triton is None:
        raise RuntimeError("triton is not installed: use the *_ref functions")
    _check(t.is_cuda or type(_select_tree_kernel).__name__ == "InterpretedFunction",
           f"tree kernels need CUDA tensors (got {t.device}); set TRITON_INTERPRET=1 to run them on the CPU")


def expand_level(child_values: torch.Tensor, child_tokens: torch.Tensor, parent: Frontier | None,
                 pool: CandidatePool, level: Level, branch: int) -> Frontier:
    """Triton version of ``expand_level_ref`` (same arguments and results), one launch."""
    _check(isinstance(child_values, torch.Tensor) and child_values.dim() == 2,
           "child_values must be [batch, frontier * branch]")
    bsz, count = child_values.shape
    _check_int("child_values", child_values, (bsz, count), torch.float32)
    _check_int("child_tokens", child_tokens, (bsz, count))
    _check(isinstance(branch, int) and branch >= 1 and count % branch == 0,
           f"branch must divide the {count} candidates per sequence, got {branch!r}")
    size = _check_pool(pool, bsz)
    frows = count // branch
    width = level.width
    if parent is None:
        _check(frows == 1, f"the root level has one frontier row per sequence, got {frows}")
    else:
        for name in ("tokens", "pool_index", "bits"):
            _check_int(f"parent.{name}", getattr(parent, name), (bsz, frows))
        _check_int("parent.scores", parent.scores, (bsz, frows), torch.float32)
    static = level.static_columns
    if static is not None:
        _check_int("level.static_columns", static, (width,))
        end = level.offset + width
    else:
        _check(1 <= width <= count, f"level.width must be in [1, {count}], got {width}")
        end = level.offset + count
    _check(0 <= level.offset and end <= size, f"level writes pool columns [{level.offset}, {end}), pool has {size}")
    _check(0 <= level.slot and level.slot + width <= 63, f"level.slot + width must be <= 63, got {level.slot + width}")
    _require_triton(child_values)
    dev = child_values.device
    out = Frontier(torch.empty(bsz, width, dtype=torch.int64, device=dev),
                   torch.empty(bsz, width, dtype=torch.float32, device=dev),
                   torch.empty(bsz, width, dtype=torch.int64, device=dev),
                   torch.empty(bsz * width, dtype=torch.int64, device=dev),
                   torch.empty(bsz, width, dtype=torch.int64, device=dev))
    if bsz == 0:
        return out
    ref = parent if parent is not None else out  # placeholders for the root level
    _expand_level_kernel[(bsz,)](
        child_values, child_tokens, ref.scores, ref.pool_index, ref.bits,
        static if static is not None else ref.pool_index,
        pool.tokens, pool.scores, pool.parents,
        out.tokens, out.scores, out.pool_index, out.rows, out.bits,
        count, frows, size, level.offset, level.slot,
        K=branch, W=width, BLOCK_C=max(16, _pow2(count)), BLOCK_W=max(16, _pow2(width)),
        ROOT=parent is None, STATIC=static is not None, num_warps=4)
    return out


def select_tree(pool: CandidatePool, root_tokens: torch.Tensor, num_nodes: int,
                max_depth: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton version of ``select_tree_ref`` (same arguments and results), one launch."""
    bsz = root_tokens.shape[0] if isinstance(root_tokens, torch.Tensor) else -1
    _check_int("root_tokens", root_tokens, (bsz,))
    size = _check_pool(pool, bsz)
    _check(isinstance(num_nodes, int) and 1 <= num_nodes <= min(size, 63),
           f"num_nodes must be in [1, min(pool size {size}, 63)], got {num_nodes!r}")
    _check(isinstance(max_depth, int) and max_depth >= 1, f"max_depth must be a host int >= 1, got {max_depth!r}")
    _require_triton(root_tokens)
    dev = root_tokens.device
    n = num_nodes + 1
    tokens, parents, depth, bits = (torch.empty(bsz, n, dtype=torch.int64, device=dev) for _ in range(4))
    if bsz == 0:
        return tokens, parents, depth, bits
    _select_tree_kernel[(bsz,)](
        pool.tokens, pool.scores, pool.parents, pool.depth, root_tokens,
        tokens, parents, depth, bits, size, max_depth,
        K=num_nodes, BLOCK_P=max(16, _pow2(size)), BLOCK_K=max(16, _pow2(num_nodes)), num_warps=4)
    return tokens, parents, depth, bits
