"""Fused element-wise ops of a Llama layer: PyTorch references (any device) and Triton kernels.

A decode step at batch 1 is bound by launch count, not by bandwidth, once the matrix products
are fused; these kernels replace the ~35 small torch ops a layer spends between them:

  rms_norm             : (residual add +) RMSNorm in one pass over the row
  rope_and_cache_write : rotate-half RoPE of q and k (cos/sin tables from rope_cos_sin) and
                         the paged K/V cache store, reading q/k/v straight from the fused
                         qkv projection output
  silu_mul             : silu(gate) * up over the fused gate|up projection output

Each ``*_ref`` is built from the same torch ops as ``eaglespec.models.llama`` and the kernels
repeat their rounding order (fp32 math, a cast to the model dtype wherever torch rounds), so
bf16 results agree with the reference to within one bf16 ulp and are mostly identical. The
launchers only read shapes, strides and dtypes on the host, so they can be captured in CUDA
graphs. CPU tensors run the kernels under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch

from eaglespec.ops.triton_support import jit as _jit, tl, triton  # noqa: F401


_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------- references


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """out = RMSNorm(x + residual) [T, H]; new_residual = x + residual [T, H] (None without residual).

    Same ops as ``llama.RMSNorm.forward``; the add rounds to x.dtype like ``x + attn_out`` does.
    """
    new_residual = None
    if residual is not None:
        x = x + residual
        new_residual = x
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype), new_residual


def rope_and_cache_write_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                             sin: torch.Tensor, k_cache: torch.Tensor | None = None,
                             v_cache: torch.Tensor | None = None,
                             slots: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T,Hq,D], k/v [T,Hkv,D] -> (q_rot, k_rot); stores k_rot and v at ``slots`` [T] of the
    [NB, BS, Hkv, D] caches (flat slot = block * BS + offset) unless slots is None."""
    # Imported here: the model module imports this one.
    from eaglespec.models.llama import apply_rope

    q_rot, k_rot = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if slots is not None:
        hkv, d = k_cache.shape[-2:]
        k_cache.view(-1, hkv, d).index_copy_(0, slots, k_rot.to(k_cache.dtype))
        v_cache.view(-1, hkv, d).index_copy_(0, slots, v.to(v_cache.dtype))
    return q_rot, k_rot


def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2I] (gate | up) -> silu(gate) * up [T, I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


# ----------------------------------------------------------------------------- kernels


@_jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, new_res_ptr,
    n_rows, n_cols, eps,
    stride_x, stride_res, stride_out, stride_new_res,
    HAS_RESIDUAL: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    col_ok = cols < n_cols
    mask = (rows < n_rows)[:, None] & col_ok[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    s = x.to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + rows[:, None] * stride_res + cols[None, :], mask=mask, other=0.0)
        # The sum rounds to the model dtype (as `x + residual` does) before it is normalised.
        s = (s + r.to(tl.float32)).to(x.dtype)
        tl.store(new_res_ptr + rows[:, None] * stride_new_res + cols[None, :], s, mask=mask)
        s = s.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(s * s, axis=1) / n_cols + eps)
    normed = (s * inv_rms[:, None]).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    out = (w[None, :] * normed).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], out, mask=mask)


@_jit
def _rotate_half(x_ptr, stride_head, n_heads, cos, sin, j, j_ok,
                 HALF: tl.constexpr, BLOCK_HEADS: tl.constexpr):
    """Rotate-half RoPE of one token's heads: returns both halves [BLOCK_HEADS, BLOCK_HALF] in
    x's dtype, the head indices and the load mask. Every product and the sum round to x's dtype
    as torch's ``x * cos + rotate_half(x) * sin`` does."""
    h = tl.arange(0, BLOCK_HEADS)
    mask = (h < n_heads)[:, None] & j_ok[None, :]
    ptr = x_ptr + h[:, None] * stride_head + j[None, :]
    x1 = tl.load(ptr, mask=mask, other=0.0)
    x2 = tl.load(ptr + HALF, mask=mask, other=0.0)
    dt = x1.dtype
    c = cos.to(dt).to(tl.float32)[None, :]
    s = sin.to(dt).to(tl.float32)[None, :]
    a1 = x1.to(tl.float32)
    a2 = x2.to(tl.float32)
    out1 = ((a1 * c).to(dt).to(tl.float32) - (a2 * s).to(dt).to(tl.float32)).to(dt)
    out2 = ((a2 * c).to(dt).to(tl.float32) + (a1 * s).to(dt).to(tl.float32)).to(dt)
    return out1, out2, h, mask


@_jit
def _rope_cache_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, q_out_ptr, k_out_ptr,
    k_cache_ptr, v_cache_ptr, slots_ptr,
    n_q_heads, n_kv_heads,
    stride_q_tok, stride_q_head, stride_k_tok, stride_k_head, stride_v_tok, stride_v_head,
    stride_cache_slot, stride_cache_head,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr,
    WRITE_CACHE: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, BLOCK_HALF)
    j_ok = j < HALF
    # cos/sin come from torch (once per forward, shared by all layers): the GPU's fast sin/cos
    # lose accuracy at large angles, and these are then exactly the reference's values.
    cos = tl.load(cos_ptr + t * (2 * HALF) + j, mask=j_ok, other=0.0)
    sin = tl.load(sin_ptr + t * (2 * HALF) + j, mask=j_ok, other=0.0)

    q1, q2, hq, q_mask = _rotate_half(q_ptr + t * stride_q_tok, stride_q_head, n_q_heads, cos, sin, j, j_ok,
                                      HALF, BLOCK_HQ)
    q_out = q_out_ptr + t * n_q_heads * (2 * HALF) + hq[:, None] * (2 * HALF) + j[None, :]
    tl.store(q_out, q1, mask=q_mask)
    tl.store(q_out + HALF, q2, mask=q_mask)

    k1, k2, hk, kv_mask = _rotate_half(k_ptr + t * stride_k_tok, stride_k_head, n_kv_heads, cos, sin, j, j_ok,
                                       HALF, BLOCK_HKV)
    k_out = k_out_ptr + t * n_kv_heads * (2 * HALF) + hk[:, None] * (2 * HALF) + j[None, :]
    tl.store(k_out, k1, mask=kv_mask)
    tl.store(k_out + HALF, k2, mask=kv_mask)

    if WRITE_CACHE:
        slot = tl.load(slots_ptr + t)
        offs = slot * stride_cache_slot + hk[:, None] * stride_cache_head + j[None, :]
        cache_dt = k_cache_ptr.dtype.element_ty
        tl.store(k_cache_ptr + offs, k1.to(cache_dt), mask=kv_mask)
        tl.store(k_cache_ptr + offs + HALF, k2.to(cache_dt), mask=kv_mask)
        v_src = v_ptr + t * stride_v_tok + hk[:, None] * stride_v_head + j[None, :]
        v1 = tl.load(v_src, mask=kv_mask, other=0.0)
        v2 = tl.load(v_src + HALF, mask=kv_mask, other=0.0)
        tl.store(v_cache_ptr + offs, v1.to(cache_dt), mask=kv_mask)
        tl.store(v_cache_ptr + offs + HALF, v2.to(cache_dt), mask=kv_mask)


@_jit
def _silu_mul_kernel(x_ptr, out_ptr, n_cols, stride_x, stride_out, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=mask, other=0.0)
    dt = up.dtype
    g = gate.to(tl.float32)
    # silu rounds to the model dtype before the product, as F.silu(gate) * up does.
    act = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (act * up.to(tl.float32)).to(dt), mask=mask)


# ----------------------------------------------------------------------------- launchers


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _interpreted() -> bool:
    return type(_silu_mul_kernel).__name__ == "InterpretedFunction"


def _check_tensor(name: str, t, ndim: int, dtypes: tuple[torch.dtype, ...], device: torch.device | None,
                  contiguous: bool = False) -> None:
    """Rank, dtype and device of one argument; the innermost stride must be 1 (or the whole
    tensor contiguous when ``contiguous``)."""
    _check(isinstance(t, torch.Tensor), f"{name} must be a torch.Tensor, got {type(t).__name__}")
    _check(t.dim() == ndim, f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    _check(t.dtype in dtypes, f"{name} dtype must be one of {[str(d) for d in dtypes]}, got {t.dtype}")
    if device is not None:
        _check(t.device == device, f"{name} is on {t.device}, expected {device}")
    if contiguous:
        _check(t.is_contiguous(), f"{name} must be contiguous (shape {tuple(t.shape)}, strides {t.stride()})")
    elif t.numel() > 0:
        _check(t.stride(-1) == 1, f"{name} must have unit stride in its last dim (strides {t.stride()})")


def _require_triton(t: torch.Tensor) -> None:
    if triton is None:
        raise RuntimeError("triton is not installed: use the *_ref functions instead")
    _check(t.is_cuda or _interpreted(), f"Triton kernels need CUDA tensors (got {t.device}); "
                                        "set TRITON_INTERPRET=1 to run them on the CPU")


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Triton version of ``rms_norm_ref`` (same arguments and results).

    x/residual [T, H] (rows may be strided), weight [H] in x's dtype. Returns new tensors: the
    normalised rows and, when a residual is given, x + residual.
    """
    _check_tensor("x", x, 2, _FLOAT_DTYPES, None)
    _require_triton(x)
    t, h = x.shape
    _check_tensor("weight", weight, 1, (x.dtype,), x.device, contiguous=True)
    _check(weight.shape[0] == h, f"weight has {weight.shape[0]} entries, x has hidden size {h}")
    _check(isinstance(eps, (int, float)) and eps > 0, f"eps must be a positive number, got {eps!r}")
    if residual is not None:
        _check_tensor("residual", residual, 2, (x.dtype,), x.device)
        _check(residual.shape == x.shape,
               f"residual shape {tuple(residual.shape)} differs from x shape {tuple(x.shape)}")
    out = torch.empty((t, h), dtype=x.dtype, device=x.device)
    new_res = None if residual is None else torch.empty_like(out)
    if t == 0 or h == 0:
        return out, new_res
    block = _pow2(h)
    rows = max(1, min(16, 1024 // block))  # several rows per program only for small hidden sizes
    res_arg = x if residual is None else residual
    _rms_norm_kernel[(triton.cdiv(t, rows),)](
        x, res_arg, weight, out, out if new_res is None else new_res,
        t, h, float(eps),
        x.stride(0), res_arg.stride(0), out.stride(0), out.stride(0),
        HAS_RESIDUAL=residual is not None, ROWS=rows, BLOCK=block,
        num_warps=max(1, min(16, rows * block // 512)),
    )
    return out, new_res


def rope_and_cache_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                         sin: torch.Tensor, k_cache: torch.Tensor | None = None,
                         v_cache: torch.Tensor | None = None,
                         slots: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of ``rope_and_cache_write_ref`` (same arguments and results).

    q [T,Hq,D], k/v [T,Hkv,D] may be strided views (e.g. slices of the fused qkv projection
    output; only the last dim must be unit-stride); q_rot/k_rot come back contiguous. cos/sin
    [T, D] in q's dtype, as ``models.llama.rope_cos_sin`` makes them. With slots [T] int64 the rotated k and v are stored in
    the contiguous caches [NB, BS, Hkv, D] at those flat slots (not bounds-checked: that would
    read the device); with slots None the caches must be None too (RoPE only).
    """
    _check_tensor("q", q, 3, _FLOAT_DTYPES, None)
    _require_triton(q)
    dev = q.device
    t, hq, d = q.shape
    _check_tensor("k", k, 3, (q.dtype,), dev)
    _check_tensor("v", v, 3, (q.dtype,), dev)
    _check(k.shape[0] == t and k.shape[2] == d,
           f"k shape {tuple(k.shape)} does not match q shape {tuple(q.shape)} in tokens or head_dim")
    _check(v.shape == k.shape, f"v shape {tuple(v.shape)} differs from k shape {tuple(k.shape)}")
    _check(d % 2 == 0 and d > 0, f"head_dim must be even for rotate-half RoPE, got {d}")
    hkv = k.shape[1]
    for name, table in (("cos", cos), ("sin", sin)):
        _check_tensor(name, table, 2, (q.dtype,), dev, contiguous=True)
        _check(tuple(table.shape) == (t, d), f"{name} has shape {tuple(table.shape)}, expected {(t, d)} "
                                             f"(rope_cos_sin of the positions, in q's dtype)")
    write = slots is not None
    if write:
        _check(k_cache is not None and v_cache is not None, "slots given but k_cache/v_cache missing")
        _check_tensor("slots", slots, 1, (torch.int64,), dev)
        _check(slots.shape[0] == t, f"slots has {slots.shape[0]} entries, expected {t} tokens")
        _check_tensor("k_cache", k_cache, 4, _FLOAT_DTYPES, dev, contiguous=True)
        _check_tensor("v_cache", v_cache, 4, (k_cache.dtype,), dev, contiguous=True)
        _check(v_cache.shape == k_cache.shape,
               f"v_cache shape {tuple(v_cache.shape)} differs from k_cache shape {tuple(k_cache.shape)}")
        _check(tuple(k_cache.shape[2:]) == (hkv, d),
               f"cache [NB, BS, Hkv, D] = {tuple(k_cache.shape)} does not match k heads/head_dim ({hkv}, {d})")
    else:
        _check(k_cache is None and v_cache is None, "k_cache/v_cache given without slots")
    q_rot = torch.empty((t, hq, d), dtype=q.dtype, device=dev)
    k_rot = torch.empty((t, hkv, d), dtype=q.dtype, device=dev)
    if t == 0:
        return q_rot, k_rot
    half = d // 2
    cache_k = k_cache if write else k_rot  # placeholders when nothing is stored
    cache_v = v_cache if write else k_rot
    _rope_cache_kernel[(t,)](
        q, k, v, cos, sin, q_rot, k_rot,
        cache_k, cache_v, slots if write else cos,
        hq, hkv,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        hkv * d, d,
        HALF=half, BLOCK_HALF=_pow2(half), BLOCK_HQ=_pow2(hq), BLOCK_HKV=_pow2(hkv),
        WRITE_CACHE=write,
        num_warps=max(1, min(8, _pow2(hq) * _pow2(half) // 512)),
    )
    return q_rot, k_rot


_SILU_BLOCK = 1024


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """Triton version of ``silu_mul_ref``: gate_up [T, 2I] (rows may be strided) -> [T, I]."""
    _check_tensor("gate_up", gate_up, 2, _FLOAT_DTYPES, None)
    _require_triton(gate_up)
    t, two_i = gate_up.shape
    _check(two_i % 2 == 0, f"gate_up must have an even last dim (gate | up), got {two_i}")
    inter = two_i // 2
    out = torch.empty((t, inter), dtype=gate_up.dtype, device=gate_up.device)
    if t == 0 or inter == 0:
        return out
    block = min(_SILU_BLOCK, _pow2(inter))
    _silu_mul_kernel[(t, triton.cdiv(inter, block))](
        gate_up, out, inter, gate_up.stride(0), out.stride(0), BLOCK=block,
        num_warps=max(1, min(4, block // 256)),
    )
    return out
