"""The head's pending pairs: a plain decoding step appends its pair to the window, in one launch.

Between speculative steps each sequence keeps, in a state slot, the (target feature, next
token) pairs the head has not cached yet: a window of ``W`` columns, ``count`` of them real
(1..W). A tree step caches them all and refills the window with its accepted path. A plain
decoding step (``tree="auto"`` runs them between tree steps) appends its one pair behind the
others, so the next tree step caches every position; a full window drops its oldest pair, which
leaves one position of the head's cache unwritten (acceptance drops, outputs never change).
With every plain step replacing the window instead, the head's cache lost a position per plain
step: on SmolLM2 (CPU, fp32, 8 MT-bench prompts) ``dynamic:4,6,15`` then yielded 2.76 tokens
a step with a plain step in every 4 and 2.45 with one in every 2, against 2.92 with none.

``append_pending_ref`` is the PyTorch reference; ``append_pending`` the Triton kernel (one
program per row). Both update the window in place, with fixed shapes and no host sync. A tree
step reads its rows' windows with ``take_pending`` and refills them with ``store_pending`` (one
launch each, where the references take three and four).
"""

from __future__ import annotations

import torch

from eaglespec.ops.triton_support import interpreted, jit as _jit, tl, triton  # noqa: F401


def append_pending_ref(feats: torch.Tensor, tokens: torch.Tensor, counts: torch.Tensor, slots: torch.Tensor,
                       new_feats: torch.Tensor, new_tokens: torch.Tensor) -> None:
    """feats [S, W, F], tokens [S, W] int64, counts [S] int64: every slot's window; slots [B]
    the rows' slots; new_feats [B, F], new_tokens [B]: each row's new pair, appended to its
    slot's window (the oldest pair dropped from a full one)."""
    width, size = tokens.shape[1], feats.shape[2]
    count = counts.index_select(0, slots)
    at = count.clamp_max(width)  # the new pair's column in a window one wider
    new_feats = new_feats.to(feats.dtype)[:, None]
    wide_feats = torch.cat((feats.index_select(0, slots), new_feats), 1)
    wide_feats = wide_feats.scatter(1, at[:, None, None].expand(-1, 1, size), new_feats)
    wide_tokens = torch.cat((tokens.index_select(0, slots), new_tokens[:, None]), 1)
    wide_tokens = wide_tokens.scatter(1, at[:, None], new_tokens[:, None])
    keep = torch.arange(width, device=slots.device)[None] + (count + 1 - width).clamp_min(0)[:, None]
    feats.index_copy_(0, slots, wide_feats.gather(1, keep[..., None].expand(-1, -1, size)))
    tokens.index_copy_(0, slots, wide_tokens.gather(1, keep))
    counts.index_copy_(0, slots, (count + 1).clamp_max(width))


@_jit
def _append_pending_kernel(feat_ptr, tok_ptr, count_ptr, slot_ptr, new_feat_ptr, new_tok_ptr,
                           W, F, stride_slot, stride_col, stride_new,
                           BLOCK_W: tl.constexpr, BLOCK_F: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + b).to(tl.int64)
    count = tl.load(count_ptr + slot)
    w = tl.arange(0, BLOCK_W)
    src = w + tl.maximum(count + 1 - W, 0)  # column w takes column w + 1 of a full window
    at = tl.minimum(count, W - 1)  # the new pair's column after the shift
    from_old = (w < W) & (src < W)
    old_tok = tl.load(tok_ptr + slot * W + src, mask=from_old, other=0)
    tok = tl.where(w == at, tl.load(new_tok_ptr + b), old_tok)
    for f0 in range(0, F, BLOCK_F):
        f = f0 + tl.arange(0, BLOCK_F)
        f_ok = f < F
        window = feat_ptr + slot * stride_slot
        old = tl.load(window + src[:, None] * stride_col + f[None, :], mask=from_old[:, None] & f_ok[None, :],
                      other=0.0)
        new = tl.load(new_feat_ptr + b * stride_new + f, mask=f_ok, other=0.0).to(old.dtype)
        tl.store(window + w[:, None] * stride_col + f[None, :], tl.where((w == at)[:, None], new[None, :], old),
                 mask=(w < W)[:, None] & f_ok[None, :])
    tl.store(tok_ptr + slot * W + w, tok, mask=w < W)
    tl.store(count_ptr + slot, tl.minimum(count + 1, W))


def append_pending(feats: torch.Tensor, tokens: torch.Tensor, counts: torch.Tensor, slots: torch.Tensor,
                   new_feats: torch.Tensor, new_tokens: torch.Tensor) -> None:
    """Triton version of ``append_pending_ref`` (same arguments, same result), one launch.
    Rows sharing a slot (the padding rows' scratch slot) leave it holding one of their pairs."""
    num_slots, width, size = _check_windows(feats, tokens, counts, slots)
    bsz = slots.shape[0]
    _check("new_feats", new_feats, (bsz, size), (feats.dtype, torch.float32, torch.bfloat16, torch.float16),
           feats.device)
    _check("new_tokens", new_tokens, (bsz,), (torch.int64,), feats.device)
    _require_runnable(_append_pending_kernel, feats)
    if bsz:
        _append_pending_kernel[(bsz,)](feats, tokens, counts, slots, new_feats, new_tokens, width, size,
                                       feats.stride(0), feats.stride(1), new_feats.stride(0),
                                       BLOCK_W=max(16, 1 << max(width - 1, 0).bit_length()),
                                       BLOCK_F=min(256, 1 << max(size - 1, 0).bit_length()), num_warps=4)


def take_pending_ref(feats: torch.Tensor, tokens: torch.Tensor, counts: torch.Tensor,
                     slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The windows of slots [B]: feats [B, W, F], tokens [B, W], counts [B] (new tensors)."""
    return feats.index_select(0, slots), tokens.index_select(0, slots), counts.index_select(0, slots)


def store_pending_ref(feats: torch.Tensor, tokens: torch.Tensor, counts: torch.Tensor, slots: torch.Tensor,
                      new_feats: torch.Tensor, new_tokens: torch.Tensor, new_counts: torch.Tensor) -> None:
    """Refill the windows of slots [B]: their first E columns from new_feats [B, E, F] and
    new_tokens [B, E] (-1 padding stored as token 0), their counts from new_counts [B]."""
    emit = new_tokens.shape[1]
    feats[:, :emit].index_copy_(0, slots, new_feats.to(feats.dtype))
    tokens[:, :emit].index_copy_(0, slots, new_tokens.clamp_min(0))
    counts.index_copy_(0, slots, new_counts)


@_jit
def _move_pending_kernel(feat_ptr, tok_ptr, count_ptr, slot_ptr, row_feat_ptr, row_tok_ptr, row_count_ptr,
                         E, F, W, stride_slot, stride_col, stride_row, stride_row_col, stride_row_tok,
                         STORE: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_F: tl.constexpr):
    """Row b and the window of slot slots[b], first E columns and the count: STORE writes the
    window from the row (tokens clamped at 0), else the row from the window."""
    b = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + b).to(tl.int64)
    e = tl.arange(0, BLOCK_E)
    e_ok = e < E
    window_tok = tok_ptr + slot * W + e
    row_tok = row_tok_ptr + b * stride_row_tok + e
    if STORE:
        tl.store(window_tok, tl.maximum(tl.load(row_tok, mask=e_ok, other=0), 0), mask=e_ok)
        tl.store(count_ptr + slot, tl.load(row_count_ptr + b))
    else:
        tl.store(row_tok, tl.load(window_tok, mask=e_ok, other=0), mask=e_ok)
        tl.store(row_count_ptr + b, tl.load(count_ptr + slot))
    for f0 in range(0, F, BLOCK_F):
        f = f0 + tl.arange(0, BLOCK_F)
        ok = e_ok[:, None] & (f < F)[None, :]
        window = feat_ptr + slot * stride_slot + e[:, None] * stride_col + f[None, :]
        row = row_feat_ptr + b * stride_row + e[:, None] * stride_row_col + f[None, :]
        if STORE:
            tl.store(window, tl.load(row, mask=ok, other=0.0).to(feat_ptr.dtype.element_ty), mask=ok)
        else:
            tl.store(row, tl.load(window, mask=ok, other=0.0), mask=ok)


def _check(name: str, t, shape: tuple, dtypes: tuple, device, last_unit: bool = False) -> None:
    """A clear error unless t is a tensor of ``shape`` (-1: any size) and one of ``dtypes`` on
    ``device``, contiguous (``last_unit``: only its last dim need be unit-stride)."""
    ok = (isinstance(t, torch.Tensor) and t.dim() == len(shape) and t.dtype in dtypes
          and all(want in (-1, got) for want, got in zip(shape, t.shape))
          and (t.stride(-1) == 1 if last_unit else t.is_contiguous()))
    if not ok:
        raise ValueError(f"{name} must be a {'' if last_unit else 'contiguous '}{shape} tensor of {dtypes}, got "
                         f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, the windows on {device}")


def _check_windows(feats, tokens, counts, slots) -> tuple[int, int, int]:
    """The windows' (slots, width, feature) sizes, after a clear error for any malformed one."""
    if not (isinstance(feats, torch.Tensor) and feats.dim() == 3 and feats.is_contiguous()):
        raise ValueError(f"feats must be a contiguous [slots, width, feature] tensor, got "
                         f"{tuple(getattr(feats, 'shape', ()))}")
    num_slots, width, size = feats.shape
    _check("tokens", tokens, (num_slots, width), (torch.int64,), feats.device)
    _check("counts", counts, (num_slots,), (torch.int64,), feats.device)
    _check("slots", slots, (-1,), (torch.int32, torch.int64), feats.device)
    return num_slots, width, size


def _require_runnable(kernel, feats: torch.Tensor) -> None:
    if triton is None:
        raise RuntimeError("triton is not installed: use the _ref functions of eaglespec.ops.pending")
    if not (feats.is_cuda or interpreted(kernel)):
        raise ValueError(f"the pending kernels need CUDA tensors (got {feats.device}); set TRITON_INTERPRET=1 to "
                         f"run them on the CPU")


def _move_pending(feats, tokens, counts, slots, row_feats, row_tokens, row_counts, store: bool) -> None:
    _, width, size = _check_windows(feats, tokens, counts, slots)
    bsz, emit = slots.shape[0], row_tokens.shape[1] if row_tokens.dim() == 2 else -1
    if not 0 < emit <= width:
        raise ValueError(f"new_tokens must be [{bsz}, 1..{width}], got {tuple(row_tokens.shape)}")
    _check("new_feats", row_feats, (bsz, emit, size), (feats.dtype, torch.float32, torch.bfloat16, torch.float16),
           feats.device, last_unit=True)
    _check("new_tokens", row_tokens, (bsz, emit), (torch.int64,), feats.device, last_unit=True)
    _check("new_counts", row_counts, (bsz,), (torch.int64,), feats.device)
    _require_runnable(_move_pending_kernel, feats)
    if bsz:
        _move_pending_kernel[(bsz,)](feats, tokens, counts, slots, row_feats, row_tokens, row_counts, emit, size,
                                     width, feats.stride(0), feats.stride(1), row_feats.stride(0),
                                     row_feats.stride(1), row_tokens.stride(0), STORE=store,
                                     BLOCK_E=max(16, 1 << max(emit - 1, 0).bit_length()),
                                     BLOCK_F=min(256, 1 << max(size - 1, 0).bit_length()), num_warps=4)


def take_pending(feats: torch.Tensor, tokens: torch.Tensor, counts: torch.Tensor,
                 slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton version of ``take_pending_ref`` (same arguments, same result), one launch."""
    _check_windows(feats, tokens, counts, slots)
    bsz = slots.shape[0]
    out = (feats.new_empty((bsz, *feats.shape[1:])), tokens.new_empty((bsz, *tokens.shape[1:])),
           counts.new_empty((bsz,)))
    _move_pending(feats, tokens, counts, slots, *out, store=False)
    return out


def store_pending(feats: torch.Tensor, tokens: torch.Tensor, counts: torch.Tensor, slots: torch.Tensor,
                  new_feats: torch.Tensor, new_tokens: torch.Tensor, new_counts: torch.Tensor) -> None:
    """Triton version of ``store_pending_ref`` (same arguments, same result), one launch. Rows
    sharing a slot (the padding rows' scratch slot) leave it holding one of theirs."""
    _move_pending(feats, tokens, counts, slots, new_feats, new_tokens, new_counts, store=True)
