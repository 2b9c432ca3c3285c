"""The commit of accepted tree nodes' K/V into the paged cache, in one launch.

A tree forward keeps every layer's tree K/V in two buffers [L, R, Hkv, D] (R = batch x nodes
rows, written there by the fused RoPE kernels). After acceptance, entry e of ``CommitIndices``
copies row ``rows[e]`` of every layer to flat cache slot ``slots[e]``: for K and V, in every
layer, one program per (entry, layer). The PyTorch reference is two gathers and two scatters
(four launches). Fixed shapes, no host synchronisation.
"""

from __future__ import annotations

import torch

from eaglespec.ops.triton_support import jit as _jit, tl, triton  # noqa: F401


def copy_kv_rows_ref(tree_k: torch.Tensor, tree_v: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
                     rows: torch.Tensor, slots: torch.Tensor) -> None:
    """tree_k/v [L, R, Hkv, D] rows ``rows`` [E] -> cache_k/v [L, NB, BS, Hkv, D] flat slots
    ``slots`` [E] (slot = block * BS + offset), every layer; in place."""
    num_layers, _, hkv, d = tree_k.shape
    for src, dst in ((tree_k, cache_k), (tree_v, cache_v)):
        dst.view(num_layers, -1, hkv, d).index_copy_(1, slots, src.index_select(1, rows).to(dst.dtype))


@_jit
def _copy_kv_rows_kernel(src_k, src_v, dst_k, dst_v, rows_ptr, slots_ptr, src_layer_stride, dst_layer_stride,
                         ROW: tl.constexpr, BLOCK: tl.constexpr):
    e = tl.program_id(0)
    layer = tl.program_id(1).to(tl.int64)
    row = tl.load(rows_ptr + e).to(tl.int64)
    slot = tl.load(slots_ptr + e).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    ok = offs < ROW
    src = layer * src_layer_stride + row * ROW + offs
    dst = layer * dst_layer_stride + slot * ROW + offs
    tl.store(dst_k + dst, tl.load(src_k + src, mask=ok).to(dst_k.dtype.element_ty), mask=ok)
    tl.store(dst_v + dst, tl.load(src_v + src, mask=ok).to(dst_v.dtype.element_ty), mask=ok)


def copy_kv_rows(tree_k: torch.Tensor, tree_v: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
                 rows: torch.Tensor, slots: torch.Tensor) -> None:
    """Triton version of ``copy_kv_rows_ref`` (same arguments, same result), one launch. Rows
    and slots are read on the device, not bounds-checked (that would read them on the host)."""
    if tree_k.dim() != 4 or tree_v.shape != tree_k.shape or not (tree_k.is_contiguous() and tree_v.is_contiguous()):
        raise ValueError(f"copy_kv_rows: tree K/V must be contiguous [L, R, Hkv, D] twins, got "
                         f"{tuple(tree_k.shape)} and {tuple(tree_v.shape)}")
    num_layers, _, hkv, d = tree_k.shape
    if (cache_k.dim() != 5 or cache_v.shape != cache_k.shape or cache_k.shape[0] != num_layers
            or tuple(cache_k.shape[3:]) != (hkv, d) or not (cache_k.is_contiguous() and cache_v.is_contiguous())):
        raise ValueError(f"copy_kv_rows: caches must be contiguous [{num_layers}, NB, BS, {hkv}, {d}] twins, got "
                         f"{tuple(cache_k.shape)} and {tuple(cache_v.shape)}")
    if rows.shape != slots.shape or rows.dim() != 1 or rows.dtype != torch.int64 or slots.dtype != torch.int64:
        raise ValueError(f"copy_kv_rows: rows and slots must be [E] int64, got {tuple(rows.shape)} {rows.dtype} "
                         f"and {tuple(slots.shape)} {slots.dtype}")
    if rows.numel() == 0:
        return
    row = hkv * d
    _copy_kv_rows_kernel[(rows.numel(), num_layers)](
        tree_k, tree_v, cache_k, cache_v, rows, slots, tree_k.stride(0), cache_k.stride(0),
        ROW=row, BLOCK=triton.next_power_of_2(row), num_warps=4 if row >= 1024 else 1)
