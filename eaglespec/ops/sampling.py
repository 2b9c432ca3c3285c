"""Sampling on device without host synchronisation: temperature, top-k, top-p, seeded noise.

Everything here is fixed-shape tensor work (no ``.item()``, no boolean-mask indexing, no Python
branch on a tensor value), so a decode or verify step that calls it can be captured in a CUDA
graph. Randomness never comes from a ``torch.Generator``: ``uniform_noise`` hashes
(seed, offset, stream, column), so a row's draws depend only on its own request (its seed and
its counter), never on which other requests share the batch, and a run can be replayed.

Streams keep independent uses of the same (seed, offset) apart. Reserved ranges:
  STREAM_SAMPLE  plain sampling of the next token (``sample``)
  STREAM_DRAFT   the drafter's draws of tree children (add a node or slot index, < 2**20)
  STREAM_ACCEPT  tree acceptance (speculative/acceptance.py adds depth * stride + slot)

Tie rule of the cuts: top-k keeps every token at least as probable as the k-th most probable
one, and top-p keeps every token at least as probable as the least probable member of the
nucleus. Tokens tied with the last kept one are therefore all kept: the result cannot depend on
how a GPU sort orders equal values. Greedy rows pick the lowest index among equal maxima.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from eaglespec.ops.triton_support import interpreted, jit as _jit, tl, triton  # noqa: F401

STREAM_SAMPLE = 0
STREAM_DRAFT = 1 << 20
STREAM_ACCEPT = 1 << 24

_MASK32 = 0xFFFFFFFF
_MAX_NOISE_COLUMNS = 1 << 30  # keeps column * key below 2**62 in the int64 hash
# Rounding in a cumulative sum must not decide whether a token sitting exactly on the top-p
# boundary is in: a mass within this much of top_p counts as reaching it.
_TOP_P_SLACK = 1e-6


@dataclass
class SamplingTensors:
    """Per-row sampling settings on the device (one row per sequence, or per tree node)."""

    temperature: torch.Tensor  # [R] fp32; 0 means greedy
    top_k: torch.Tensor  # [R] int32; 0 means no top-k cut
    top_p: torch.Tensor  # [R] fp32; 1 means no nucleus cut
    seeds: torch.Tensor  # [R] int64
    offsets: torch.Tensor  # [R] int64; per-request counter (e.g. tokens generated so far)
    # Host-side hint, how many most probable tokens the cuts must look at: -1 = sort the whole
    # vocabulary (always correct), 0 = no sampled row has a cut, k > 0 = every sampled row with
    # a cut has 1 <= top_k <= k (a top-k selection of width k replaces the full sort).
    # ``from_params`` sets it; a hand-made hint that understates the cuts gives wrong results.
    sort_width: int = -1

    def __post_init__(self) -> None:
        fields = {"temperature": torch.float32, "top_k": torch.int32, "top_p": torch.float32,
                  "seeds": torch.int64, "offsets": torch.int64}
        rows = self.temperature.shape
        for name, dtype in fields.items():
            t = getattr(self, name)
            if t.dim() != 1 or t.shape != rows:
                raise ValueError(f"SamplingTensors.{name} must have shape {tuple(rows)} (one value per "
                                 f"row, like temperature), got {tuple(t.shape)}")
            if t.dtype != dtype:
                raise ValueError(f"SamplingTensors.{name} must be {dtype}, got {t.dtype}")
            if t.device != self.temperature.device:
                raise ValueError(f"SamplingTensors.{name} is on {t.device}, temperature on "
                                 f"{self.temperature.device}")
        if self.sort_width < -1:
            raise ValueError(f"SamplingTensors.sort_width must be -1, 0 or positive, got {self.sort_width}")

    @property
    def num_rows(self) -> int:
        return self.temperature.shape[0]

    @classmethod
    def from_params(cls, params: Sequence[Any], offsets: Sequence[int] | torch.Tensor,
                    device: torch.device | str) -> "SamplingTensors":
        """Build from SamplingParams-like objects (temperature, top_k, top_p, seed), one per row.

        A ``seed`` of None draws a fresh random seed here; to make a request reproducible across
        steps, resolve its seed once when the request is created.
        """
        if len(params) == 0:
            raise ValueError("SamplingTensors.from_params needs at least one row of params")
        offsets = torch.as_tensor(offsets, dtype=torch.int64).reshape(-1)
        if offsets.shape[0] != len(params):
            raise ValueError(f"from_params: {len(params)} params but {offsets.shape[0]} offsets")
        temps, top_ks, top_ps, seeds = [], [], [], []
        for i, p in enumerate(params):
            if not p.temperature >= 0:
                raise ValueError(f"params[{i}].temperature must be >= 0, got {p.temperature}")
            if p.top_k < 0:
                raise ValueError(f"params[{i}].top_k must be >= 0, got {p.top_k}")
            if not 0.0 < p.top_p <= 1.0:
                raise ValueError(f"params[{i}].top_p must be in (0, 1], got {p.top_p}")
            seed = secrets.randbits(63) if p.seed is None else int(p.seed)
            temps.append(float(p.temperature))
            top_ks.append(int(min(p.top_k, 2**31 - 1)))
            top_ps.append(float(p.top_p))
            seeds.append(_to_int64(seed))
        return cls(
            temperature=torch.tensor(temps, dtype=torch.float32, device=device),
            top_k=torch.tensor(top_ks, dtype=torch.int32, device=device),
            top_p=torch.tensor(top_ps, dtype=torch.float32, device=device),
            seeds=torch.tensor(seeds, dtype=torch.int64, device=device),
            offsets=offsets.to(device),
            sort_width=_sort_width_hint(temps, top_ks, top_ps),
        )

    def expand(self, n: int) -> "SamplingTensors":
        """Each row repeated n times in place ([R] -> [R*n]), e.g. one copy per tree node."""
        if n < 1:
            raise ValueError(f"SamplingTensors.expand needs n >= 1, got {n}")
        return SamplingTensors(*(t.repeat_interleave(n) for t in
                                 (self.temperature, self.top_k, self.top_p, self.seeds, self.offsets)),
                               sort_width=self.sort_width)


def _to_int64(seed: int) -> int:
    """Any Python int as the signed int64 with the same low 64 bits."""
    seed &= (1 << 64) - 1
    return seed - (1 << 64) if seed >= 1 << 63 else seed


def _sort_width_hint(temps: list[float], top_ks: list[int], top_ps: list[float]) -> int:
    cut_rows = [(k, p) for t, k, p in zip(temps, top_ks, top_ps) if t > 0 and (k > 0 or p < 1.0)]
    if not cut_rows:
        return 0
    if all(k > 0 for k, _ in cut_rows):
        return max(k for k, _ in cut_rows)
    return -1


# ----------------------------------------------------------------------------- distributions


def _check_target_inputs(logits: torch.Tensor, st: SamplingTensors) -> None:
    if logits.dim() != 2:
        raise ValueError(f"target_probs: logits must be [rows, vocab], got shape {tuple(logits.shape)}")
    if logits.shape[0] != st.num_rows:
        raise ValueError(f"target_probs: {logits.shape[0]} rows of logits but {st.num_rows} rows of "
                         f"sampling settings")
    if logits.device != st.temperature.device:
        raise ValueError(f"target_probs: logits on {logits.device}, sampling settings on "
                         f"{st.temperature.device}")


def target_probs(logits: torch.Tensor, st: SamplingTensors) -> torch.Tensor:
    """The exact distribution plain sampling draws from, per row: [R, V] logits -> [R, V] fp32.

    softmax(logits / temperature), cut to top-k, renormalised, cut to the top-p nucleus (the
    most probable tokens whose mass reaches top_p; never empty), renormalised. Greedy rows
    (temperature 0) are one-hot at the argmax. Tie rule: see the module docstring.
    The Triton kernel on CUDA (when Triton is installed) where the reference would sort whole
    rows (``st.sort_width`` -1, as in the engine's graphs); the PyTorch reference otherwise
    (every cut row has a small top-k), whose top-k selection beat the kernel from 16 rows on
    and lost by a third below (H200, top-k 50).
    """
    if logits.is_cuda and triton is not None and st.sort_width < 0:
        return target_probs_triton(logits, st)
    return target_probs_ref(logits, st)


def target_probs_ref(logits: torch.Tensor, st: SamplingTensors) -> torch.Tensor:
    """``target_probs`` in PyTorch: the cuts read a sort of each row (or a top-k of the
    ``st.sort_width`` most probable tokens when every cut row has a small top-k)."""
    _check_target_inputs(logits, st)
    logits = logits.float()
    vocab = logits.shape[1]
    greedy = st.temperature <= 0
    temperature = torch.where(greedy, torch.ones_like(st.temperature), st.temperature)
    probs = torch.softmax(logits / temperature[:, None], dim=-1)
    width = vocab if st.sort_width < 0 else min(st.sort_width, vocab)
    if width > 0:
        probs = _cut_top_k_top_p(probs, st.top_k, st.top_p, width)
    one_hot = torch.zeros_like(probs).scatter_(1, logits.argmax(dim=-1, keepdim=True), 1.0)
    return torch.where(greedy[:, None], one_hot, probs)


def _cut_top_k_top_p(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                     width: int) -> torch.Tensor:
    """Zero the tokens outside top-k and then outside the top-p nucleus, and renormalise.

    Both cuts become probability thresholds applied to the whole vocabulary, so only the
    ``width`` most probable values need sorting and equal values are treated alike.
    """
    if width < probs.shape[1]:
        ranked = probs.topk(width, dim=-1, sorted=True).values  # [R, width], descending
    else:
        ranked = probs.sort(dim=-1, descending=True).values
    k = top_k.long()
    kth = ranked.gather(1, (k.clamp(1, width) - 1)[:, None])  # [R, 1]
    k_threshold = torch.where((k > 0)[:, None], kth, torch.zeros_like(kth))
    kept_mass = torch.where(probs >= k_threshold, probs, 0.0).sum(-1, keepdim=True)
    ranked_kept = torch.where(ranked >= k_threshold, ranked, 0.0) / kept_mass
    # Mass of the strictly better ranks (exclusive cumulative sum) decides membership: a token
    # is in the nucleus while the tokens above it have not yet reached top_p.
    cumulative = ranked_kept.cumsum(-1)
    mass_above = torch.cat([torch.zeros_like(cumulative[:, :1]), cumulative[:, :-1]], dim=1)
    is_first = torch.arange(width, device=probs.device)[None, :] == 0
    in_nucleus = ((mass_above < top_p[:, None] - _TOP_P_SLACK) & (ranked_kept > 0)) | is_first
    least_in_nucleus = torch.where(in_nucleus, ranked, torch.full_like(ranked, float("inf")))
    p_threshold = least_in_nucleus.amin(-1, keepdim=True)
    p_threshold = torch.where((top_p >= 1.0)[:, None], torch.zeros_like(p_threshold), p_threshold)
    kept = torch.where(probs >= torch.maximum(k_threshold, p_threshold), probs, 0.0)
    return kept / kept.sum(-1, keepdim=True)


# The kernel's cuts without a sort. Probabilities are non-negative floats, whose bit patterns
# order like their values, so each threshold is found by searching bit patterns: a pass over the
# row tests ``GridTile.probes`` evenly spaced patterns at once (how many tokens lie at or above each
# for top-k; how much kept mass lies above each for top-p), which narrows the interval
# (probes + 1)-fold; a fixed number of passes pins a threshold exactly, to a value the row holds.
# A row is spread over many programs (row, chunk), for the few rows of batch 1 as much as for a
# big batch's trees. Each search pass is one launch whose programs write per-chunk partials
# (counts or masses at every probe); the next launch's programs each add them up, in the same
# order, so all of a row's programs agree on the narrowed interval, and then probe it again.
# Launches: the softmax's chunk statistics, the top-k passes, the top-p passes, the cut's kept
# mass, the write; a row whose settings need no search skips its passes' work.


@_jit
def _probe_thresholds(lo, hi, PROBES: tl.constexpr):
    """PROBES int64 bit patterns spread over (lo, hi) and the fp32 values they encode."""
    probes = lo + ((hi - lo) * (tl.arange(0, PROBES) + 1)) // (PROBES + 1)
    return probes, probes.to(tl.int32).to(tl.float32, bitcast=True)


def _require_kernel_device(name: str, x: torch.Tensor) -> None:
    """``name``_triton runs where Triton does: on CUDA tensors, or on the CPU under TRITON_INTERPRET=1."""
    if triton is None:
        raise RuntimeError(f"triton is not installed: use {name}_ref")
    if not x.is_cuda and not interpreted(_grid_stats_kernel):
        raise ValueError(f"{name}_triton needs CUDA tensors (got {x.device}); set TRITON_INTERPRET=1 "
                         f"to run it on the CPU")


_ONE_BITS = 0x3F800000  # 1.0, the largest probability's bit pattern


def _search_passes(probes: int) -> int:
    """Passes of ``probes`` probes that narrow any interval of probability bit patterns to one."""
    passes, span = 0, 1
    while span < _ONE_BITS + 1:
        span *= probes + 1
        passes += 1
    return passes


@_jit
def _grid_stats_kernel(logits_ptr, stride_logits, temperature_ptr, out_ptr, stride_out, stats_ptr, argmax_ptr,
                       vocab, num_chunks, CHUNK: tl.constexpr):
    """Program (row, chunk): exp(z - chunk max) to out (z = logits / temperature, 1 for greedy
    rows), and the chunk's (max, sum of those) and first argmax."""
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    temperature = tl.load(temperature_ptr + row)
    temperature = tl.where(temperature > 0, temperature, 1.0)
    cols = chunk * CHUNK + tl.arange(0, CHUNK)
    z = tl.load(logits_ptr + row * stride_logits + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
    z = z / temperature
    z_max = tl.max(z, axis=0)
    e = tl.where(z > float("-inf"), tl.exp(z - z_max), 0.0)  # a chunk of masked tokens holds zeros
    tl.store(out_ptr + row * stride_out + cols, e, mask=cols < vocab)
    tl.store(stats_ptr + (row * num_chunks + chunk) * 2, z_max)
    tl.store(stats_ptr + (row * num_chunks + chunk) * 2 + 1, tl.sum(e, axis=0))
    tl.store(argmax_ptr + row * num_chunks + chunk, chunk * CHUNK + tl.argmax(z, axis=0, tie_break_left=True))


@_jit
def _grid_scale(stats_ptr, row, chunk, num_chunks, BLOCK_C: tl.constexpr):
    """The factor that turns this chunk's stored exp(z - chunk max) into probabilities, and the
    row's largest probability (exp(0) / denominator), from every chunk's statistics."""
    c = tl.arange(0, BLOCK_C)
    inside = c < num_chunks
    chunk_max = tl.load(stats_ptr + (row * num_chunks + c) * 2, mask=inside, other=float("-inf"))
    chunk_sum = tl.load(stats_ptr + (row * num_chunks + c) * 2 + 1, mask=inside, other=0.0)
    z_max = tl.max(chunk_max, axis=0)
    denominator = tl.sum(tl.where(chunk_sum > 0, chunk_sum * tl.exp(chunk_max - z_max), 0.0), axis=0)
    own_max = tl.load(stats_ptr + (row * num_chunks + chunk) * 2)
    return tl.exp(own_max - z_max) / denominator, 1.0 / denominator


@_jit
def _grid_row_sum(x_ptr, row, num_chunks, BLOCK_C: tl.constexpr):
    c = tl.arange(0, BLOCK_C)
    return tl.sum(tl.load(x_ptr + row * num_chunks + c, mask=c < num_chunks, other=0.0), axis=0)


@_jit
def _grid_narrowed(state_ptr, partial_ptr, row, num_chunks, need, PROBES: tl.constexpr, BLOCK_C: tl.constexpr,
                   BY_MASS: tl.constexpr):
    """The interval (lo, hi) a pass probed, narrowed by its partials: by count (the k-th largest,
    ``need`` = k: at least k values >= lo) or by mass (the nucleus, ``need`` = the mass to reach:
    the mass strictly above hi falls short of it)."""
    lo = tl.load(state_ptr + row * 2)
    hi = tl.load(state_ptr + row * 2 + 1)
    if hi - lo > 1:
        probes, _ = _probe_thresholds(lo, hi, PROBES)
        c = tl.arange(0, BLOCK_C)
        partial = tl.load(partial_ptr + (row * num_chunks + c[:, None]) * PROBES + tl.arange(0, PROBES)[None, :],
                          mask=(c < num_chunks)[:, None], other=0.0)
        total = tl.sum(partial, axis=0)  # [PROBES], added in the same order by every program
        if BY_MASS:
            short = total < need
            new_hi = tl.min(tl.where(short, probes, hi), axis=0)
            new_lo = tl.max(tl.where(short, lo, probes), axis=0)
        else:
            enough = total >= need
            new_lo = tl.max(tl.where(enough, probes, lo), axis=0)
            new_hi = tl.min(tl.where(enough, hi, probes), axis=0)
        lo = new_lo
        hi = new_hi
    return lo, hi


@_jit
def _grid_probe(out_row, start, vocab, scale, lo, hi, k_threshold, partial_ptr, row, chunk, num_chunks,
                PROBES: tl.constexpr, CHUNK: tl.constexpr, SUB: tl.constexpr, BY_MASS: tl.constexpr):
    """This chunk's partials at the probes of (lo, hi): tokens at or above each probe, or the
    mass (of tokens >= k_threshold) strictly above each."""
    _, thresholds = _probe_thresholds(lo, hi, PROBES)
    # Each thread adds up its own cells; the one reduction across threads comes at the end.
    partial = tl.zeros([SUB, PROBES], dtype=tl.float32)
    for offset in range(0, CHUNK, SUB):
        cols = start + offset + tl.arange(0, SUB)
        p = tl.load(out_row + cols, mask=cols < vocab, other=-1.0) * scale  # padding: below every probe
        if BY_MASS:
            q = tl.where(p >= k_threshold, p, 0.0)
            partial += tl.where(p[:, None] > thresholds[None, :], q[:, None], 0.0)
        else:
            partial += (p[:, None] >= thresholds[None, :]).to(tl.float32)
    tl.store(partial_ptr + (row * num_chunks + chunk) * PROBES + tl.arange(0, PROBES), tl.sum(partial, axis=0))


@_jit
def _grid_search_kernel(out_ptr, stride_out, stats_ptr, temperature_ptr, top_k_ptr, top_p_ptr, state_in_ptr,
                        state_out_ptr, partial_in_ptr, partial_out_ptr, kept_ptr, k_threshold_ptr, vocab,
                        num_chunks, top_p_slack, TOP_P: tl.constexpr, FIRST: tl.constexpr, PROBES: tl.constexpr,
                        CHUNK: tl.constexpr, SUB: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program (row, chunk), one pass of the top-k search (TOP_P false) or of the top-p search.
    The first top-p pass also settles the top-k threshold and the mass it keeps (partials)."""
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    if tl.load(temperature_ptr + row) > 0:
        scale, p_max = _grid_scale(stats_ptr, row, chunk, num_chunks, BLOCK_C)
        out_row = out_ptr + row * stride_out
        start = chunk * CHUNK
        top_k = tl.load(top_k_ptr + row)
        if not TOP_P:
            if top_k > 0:
                if FIRST:
                    lo = tl.zeros([], dtype=tl.int64)  # at least k values >= 0.0
                    hi = p_max.to(tl.int32, bitcast=True).to(tl.int64) + 1  # none above the maximum
                else:
                    lo, hi = _grid_narrowed(state_in_ptr, partial_in_ptr, row, num_chunks,
                                            tl.minimum(top_k, vocab).to(tl.float32), PROBES, BLOCK_C, False)
                if chunk == 0:
                    tl.store(state_out_ptr + row * 2, lo)
                    tl.store(state_out_ptr + row * 2 + 1, hi)
                if hi - lo > 1:
                    _grid_probe(out_row, start, vocab, scale, lo, hi, 0.0, partial_out_ptr, row, chunk, num_chunks,
                                PROBES, CHUNK, SUB, False)
        else:
            if FIRST:
                k_threshold = tl.zeros([], dtype=tl.float32)
                if top_k > 0:
                    k_lo, _ = _grid_narrowed(state_in_ptr, partial_in_ptr, row, num_chunks,
                                             tl.minimum(top_k, vocab).to(tl.float32), PROBES, BLOCK_C, False)
                    k_threshold = k_lo.to(tl.int32).to(tl.float32, bitcast=True)
                if chunk == 0:
                    tl.store(k_threshold_ptr + row, k_threshold)
            else:
                k_threshold = tl.load(k_threshold_ptr + row)
            top_p = tl.load(top_p_ptr + row)
            target = top_p - top_p_slack
            if top_p < 1.0:
                if target > 0:  # a nucleus to search (else the cut keeps the most probable tokens)
                    if FIRST:
                        cols = start + tl.arange(0, CHUNK)
                        p = tl.load(out_row + cols, mask=cols < vocab, other=0.0) * scale
                        tl.store(kept_ptr + row * num_chunks + chunk, tl.sum(tl.where(p >= k_threshold, p, 0.0), axis=0))
                        # 0.0 is taken as "the mass above reaches target": where even all of it falls
                        # short, the search ends at the smallest positive pattern (every token kept).
                        lo = tl.zeros([], dtype=tl.int64)
                        hi = p_max.to(tl.int32, bitcast=True).to(tl.int64)  # nothing lies above the maximum
                    else:
                        need = target * _grid_row_sum(kept_ptr, row, num_chunks, BLOCK_C)
                        lo, hi = _grid_narrowed(state_in_ptr, partial_in_ptr, row, num_chunks, need, PROBES, BLOCK_C, True)
                    if chunk == 0:
                        tl.store(state_out_ptr + row * 2, lo)
                        tl.store(state_out_ptr + row * 2 + 1, hi)
                    if hi - lo > 1:
                        _grid_probe(out_row, start, vocab, scale, lo, hi, k_threshold, partial_out_ptr, row, chunk,
                                    num_chunks, PROBES, CHUNK, SUB, True)


@_jit
def _grid_cut_kernel(out_ptr, stride_out, stats_ptr, temperature_ptr, top_p_ptr, state_ptr, partial_ptr, kept_ptr,
                     k_threshold_ptr, threshold_ptr, sums_ptr, vocab, num_chunks, top_p_slack, PROBES: tl.constexpr,
                     CHUNK: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program (row, chunk): the last narrowing gives the nucleus's least member; the row's
    threshold is the larger of the two cuts; this chunk's mass at or above it."""
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    if tl.load(temperature_ptr + row) > 0:
        scale, p_max = _grid_scale(stats_ptr, row, chunk, num_chunks, BLOCK_C)
        threshold = tl.load(k_threshold_ptr + row)
        top_p = tl.load(top_p_ptr + row)
        if top_p < 1.0:
            target = top_p - top_p_slack
            p_threshold = p_max  # a target of zero or less keeps only the most probable tokens
            if target > 0:
                need = target * _grid_row_sum(kept_ptr, row, num_chunks, BLOCK_C)
                _, hi = _grid_narrowed(state_ptr, partial_ptr, row, num_chunks, need, PROBES, BLOCK_C, True)
                p_threshold = hi.to(tl.int32).to(tl.float32, bitcast=True)
            threshold = tl.maximum(threshold, p_threshold)
        if chunk == 0:
            tl.store(threshold_ptr + row, threshold)
        cols = chunk * CHUNK + tl.arange(0, CHUNK)
        p = tl.load(out_ptr + row * stride_out + cols, mask=cols < vocab, other=0.0) * scale
        tl.store(sums_ptr + row * num_chunks + chunk, tl.sum(tl.where(p >= threshold, p, 0.0), axis=0))


@_jit
def _grid_write_kernel(out_ptr, stride_out, stats_ptr, argmax_ptr, temperature_ptr, threshold_ptr, sums_ptr, vocab,
                       num_chunks, CHUNK: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program (row, chunk): the kept probabilities renormalised, or greedy's one-hot."""
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    cols = chunk * CHUNK + tl.arange(0, CHUNK)
    out_cols = out_ptr + row * stride_out + cols
    if tl.load(temperature_ptr + row) > 0:
        scale, _ = _grid_scale(stats_ptr, row, chunk, num_chunks, BLOCK_C)
        threshold = tl.load(threshold_ptr + row)
        total = _grid_row_sum(sums_ptr, row, num_chunks, BLOCK_C)
        p = tl.load(out_cols, mask=cols < vocab, other=0.0) * scale
        tl.store(out_cols, tl.where(p >= threshold, p, 0.0) / total, mask=cols < vocab)
    else:  # one-hot at the first maximum: the first chunk holding it (chunks are in column order)
        c = tl.arange(0, BLOCK_C)
        chunk_max = tl.load(stats_ptr + (row * num_chunks + c) * 2, mask=c < num_chunks, other=float("-inf"))
        best = tl.load(argmax_ptr + row * num_chunks + tl.argmax(chunk_max, axis=0, tie_break_left=True))
        tl.store(out_cols, tl.where(cols == best, 1.0, 0.0), mask=cols < vocab)


@dataclass(frozen=True, slots=True)
class GridTile:
    """How ``target_probs_triton`` spreads a row: ``chunk`` columns a program, ``probes`` bit
    patterns tested per search pass, compared ``sub`` columns at a time, ``num_warps`` warps a
    program."""

    chunk: int
    probes: int
    sub: int
    num_warps: int


# The fastest of bench_sampling's tiles (H200, 49,152 tokens, top-p 0.9, 2026-12-05): few rows are
# bound by the launches, so fewer passes of more probes pay (73 us at 1 row, 85 at 4, where the
# other took 136 and 140); from 16 rows on the work is, so fewer probes over bigger chunks pay
# (143 us at 16 rows, 182 at 64, 2.0 ms at 1,024, where the first took 181, 601 and 9.1 ms).
FEW_ROWS_TILE = GridTile(chunk=1024, probes=64, sub=64, num_warps=4)
MANY_ROWS_TILE = GridTile(chunk=8192, probes=8, sub=256, num_warps=8)
MANY_ROWS = 16


def target_probs_triton(logits: torch.Tensor, st: SamplingTensors, tile: GridTile | None = None) -> torch.Tensor:
    """``target_probs_ref`` without sorting (see above); ``tile`` None picks one by the number
    of rows. The probabilities differ only in the softmax's and the sums' rounding, and so do
    the kept tokens where a nucleus boundary lies within rounding of top_p's slack. Needs CUDA
    tensors (or TRITON_INTERPRET=1)."""
    _check_target_inputs(logits, st)
    _require_kernel_device("target_probs", logits)
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    rows, vocab = logits.shape
    device = logits.device
    out = torch.empty((rows, vocab), dtype=torch.float32, device=device)
    if rows == 0 or vocab == 0:
        return out
    if tile is None:
        tile = MANY_ROWS_TILE if rows >= MANY_ROWS else FEW_ROWS_TILE
    chunk = min(tile.chunk, max(16, triton.next_power_of_2(vocab)))
    sub = min(tile.sub, chunk)
    num_chunks = triton.cdiv(vocab, chunk)
    block_c = max(2, triton.next_power_of_2(num_chunks))
    # The fp32 scratch in one allocation, split into contiguous views: per chunk (max, sum),
    # the search partials twice over (a pass reads its predecessor's while its programs write
    # their own), the kept and the cut mass per chunk, and each row's two thresholds.
    per_chunk = rows * num_chunks
    sizes = [2 * per_chunk, 2 * per_chunk * tile.probes, per_chunk, per_chunk, rows, rows]
    stats, partials, kept, sums, k_threshold, threshold = torch.empty(
        sum(sizes), dtype=torch.float32, device=device).split(sizes)
    partials = partials.view(2, per_chunk * tile.probes)
    argmax = torch.empty(per_chunk, dtype=torch.int32, device=device)
    states = torch.empty((2, rows * 2), dtype=torch.int64, device=device)  # (lo, hi) per row, twice over too
    grid = (rows, num_chunks)
    warps = {"num_warps": tile.num_warps}
    _grid_stats_kernel[grid](logits, logits.stride(0), st.temperature, out, out.stride(0), stats, argmax, vocab,
                             num_chunks, CHUNK=chunk, **warps)
    passes = 0
    for by_mass in (False, True):
        for i in range(_search_passes(tile.probes)):
            _grid_search_kernel[grid](out, out.stride(0), stats, st.temperature, st.top_k, st.top_p,
                                      states[(passes + 1) % 2], states[passes % 2], partials[(passes + 1) % 2],
                                      partials[passes % 2], kept, k_threshold, vocab, num_chunks, _TOP_P_SLACK,
                                      TOP_P=by_mass, FIRST=i == 0, PROBES=tile.probes, CHUNK=chunk, SUB=sub,
                                      BLOCK_C=block_c, **warps)
            passes += 1
    last = (passes + 1) % 2
    _grid_cut_kernel[grid](out, out.stride(0), stats, st.temperature, st.top_p, states[last], partials[last], kept,
                           k_threshold, threshold, sums, vocab, num_chunks, _TOP_P_SLACK, PROBES=tile.probes,
                           CHUNK=chunk, BLOCK_C=block_c, **warps)
    _grid_write_kernel[grid](out, out.stride(0), stats, argmax, st.temperature, threshold, sums, vocab, num_chunks,
                             CHUNK=chunk, BLOCK_C=block_c, **warps)
    return out


# ----------------------------------------------------------------------------- noise


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit mixer (Wellons' lowbias32) on int64 tensors holding values < 2**32.

    Both multipliers are below 2**31, so every product stays below 2**63: no signed overflow on
    any backend, and masking to 32 bits gives the same bits a uint32 multiply would.
    """
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _MASK32
    return x ^ (x >> 15)


def _row_keys(seeds: torch.Tensor, offsets: torch.Tensor, stream: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two 32-bit keys per row from (seed, offset, stream), absorbed by two independent lanes.

    Two lanes make two different rows share all their noise with chance ~2**-64 instead of 2**-32.
    The lanes run side by side as one [2, R] tensor (half the kernel launches).
    """
    words = (seeds & _MASK32, (seeds >> 32) & _MASK32, offsets & _MASK32, (offsets >> 32) & _MASK32)
    # Made on the device (no host-to-device copy, which CUDA-graph capture would not allow).
    lane = torch.arange(2, dtype=torch.int64, device=seeds.device)[:, None]
    lane_init = 0x6A09E667 + lane * (0x3C6EF372 - 0x6A09E667)  # [2, 1]
    k = _mix32(words[0][None, :] ^ lane_init)  # [2, R]
    for w in words[1:]:
        k = _mix32(k ^ w[None, :])
    k = _mix32(k ^ stream)
    return k[0], k[1] | 1


def uniform_noise(seeds: torch.Tensor, offsets: torch.Tensor, stream: int, n: int) -> torch.Tensor:
    """Counter-based uniforms: [R] seeds, [R] offsets -> [R, n] fp32 strictly inside (0, 1).

    Column c of row r is a hash of (seeds[r], offsets[r], stream, c): deterministic, with no
    generator state and no dependence on the other rows. Each row walks a Weyl sequence
    key1 + c * key2 (odd key2) through the mixer; the top 23 bits become (2m + 1) / 2**24.
    """
    if seeds.dim() != 1 or offsets.shape != seeds.shape:
        raise ValueError(f"uniform_noise: seeds and offsets must both be [rows], got "
                         f"{tuple(seeds.shape)} and {tuple(offsets.shape)}")
    if seeds.dtype != torch.int64 or offsets.dtype != torch.int64:
        raise ValueError(f"uniform_noise: seeds and offsets must be int64, got {seeds.dtype} and "
                         f"{offsets.dtype}")
    if not 0 <= stream <= _MASK32:
        raise ValueError(f"uniform_noise: stream must be in [0, 2**32), got {stream}")
    if not 0 < n <= _MAX_NOISE_COLUMNS:
        raise ValueError(f"uniform_noise: n must be in [1, 2**30], got {n}")
    key1, key2 = _row_keys(seeds, offsets, stream)
    column = torch.arange(n, dtype=torch.int64, device=seeds.device)
    bits = _mix32((key1[:, None] + column[None, :] * key2[:, None]) & _MASK32)
    return ((bits >> 9).to(torch.float32) + 0.5) * (1.0 / (1 << 23))


# ----------------------------------------------------------------------------- sampling


def _check_sample_inputs(probs: torch.Tensor, seeds: torch.Tensor, offsets: torch.Tensor) -> None:
    if probs.dim() != 2:
        raise ValueError(f"sample_from_probs: probs must be [rows, vocab], got {tuple(probs.shape)}")
    if seeds.shape != (probs.shape[0],) or offsets.shape != seeds.shape:
        raise ValueError(f"sample_from_probs: {probs.shape[0]} rows of probs but seeds "
                         f"{tuple(seeds.shape)} and offsets {tuple(offsets.shape)}")
    if seeds.device != probs.device or offsets.device != probs.device:
        raise ValueError(f"sample_from_probs: probs on {probs.device}, seeds on {seeds.device}, "
                         f"offsets on {offsets.device}")


def sample_from_probs_ref(probs: torch.Tensor, seeds: torch.Tensor, offsets: torch.Tensor,
                          stream: int) -> torch.Tensor:
    """One token per row, drawn exactly from ``probs`` [R, V] (need not be normalised): [R] int64.

    Exponential race: with E_v = -log(u_v) iid Exp(1), argmax_v p_v / E_v is distributed as p
    (E_v / p_v ~ Exp(p_v) and the smallest of independent exponentials is v with chance p_v).
    Tokens with p_v = 0 score 0 and never win, so one-hot rows return their token.
    """
    _check_sample_inputs(probs, seeds, offsets)
    exponential = -torch.log(uniform_noise(seeds, offsets, stream, probs.shape[1]))
    return (probs.float() / exponential).argmax(dim=-1)


@_jit
def _mix32_tl(x):
    """``_mix32`` in Triton (int64 holding 32-bit values; products stay below 2**63)."""
    mask32 = tl.full([], 0xFFFFFFFF, tl.int64)
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & mask32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & mask32
    return x ^ (x >> 15)


@_jit
def _row_key_tl(seed, offset, stream, lane_init):
    """``_row_keys``' absorption of one lane for one row."""
    mask32 = tl.full([], 0xFFFFFFFF, tl.int64)
    k = _mix32_tl((seed & mask32) ^ lane_init)
    k = _mix32_tl(k ^ ((seed >> 32) & mask32))
    k = _mix32_tl(k ^ (offset & mask32))
    k = _mix32_tl(k ^ ((offset >> 32) & mask32))
    return _mix32_tl(k ^ stream)


@_jit
def _exponential_race_kernel(probs_ptr, stride_row, seeds_ptr, offsets_ptr, stream, best_score_ptr,
                             best_index_ptr, vocab, num_chunks, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """Program (row, chunk): the best p / E over CHUNK columns (first index on ties), with the
    noise of ``uniform_noise`` hashed inline."""
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    mask32 = tl.full([], 0xFFFFFFFF, tl.int64)
    seed = tl.load(seeds_ptr + row)
    offset = tl.load(offsets_ptr + row)
    stream64 = tl.zeros([], dtype=tl.int64) + stream  # works for i32, u32 and constexpr args
    key1 = _row_key_tl(seed, offset, stream64, 0x6A09E667)
    key2 = _row_key_tl(seed, offset, stream64, 0x3C6EF372) | 1
    best_score = tl.zeros([], dtype=tl.float32) - 1.0
    best_index = tl.zeros([], dtype=tl.int32)
    for start in range(0, CHUNK, BLOCK):
        cols = chunk * CHUNK + start + tl.arange(0, BLOCK)
        inside = cols < vocab
        p = tl.load(probs_ptr + row * stride_row + cols, mask=inside, other=0.0).to(tl.float32)
        bits = _mix32_tl((key1 + cols.to(tl.int64) * key2) & mask32)
        u = ((bits >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)
        score = tl.where(inside, p / -tl.log(u), -1.0)
        block_best = tl.max(score, axis=0)
        block_index = tl.argmax(score, axis=0)
        better = block_best > best_score  # strict: an earlier column keeps a tie
        best_index = tl.where(better, chunk * CHUNK + start + block_index, best_index)
        best_score = tl.where(better, block_best, best_score)
    tl.store(best_score_ptr + row * num_chunks + chunk, best_score)
    tl.store(best_index_ptr + row * num_chunks + chunk, best_index)


_RACE_CHUNK = 4096  # columns per program: rows x chunks programs keep a GPU busy at batch 1
_RACE_BLOCK = 1024


def sample_from_probs_triton(probs: torch.Tensor, seeds: torch.Tensor, offsets: torch.Tensor,
                             stream: int) -> torch.Tensor:
    """Fused Triton version of ``sample_from_probs_ref`` (same noise, same rule): [R] int64.

    Hashing, log, division and argmax happen in registers, instead of ~25 elementwise passes
    over an int64 [R, V] tensor plus ~120 tiny launches for the row keys. Tokens equal the
    reference's except where the two backends round log differently on a near-tie. Needs CUDA
    tensors (or TRITON_INTERPRET=1).
    """
    _check_sample_inputs(probs, seeds, offsets)
    _require_kernel_device("sample_from_probs", probs)
    if probs.stride(1) != 1:
        probs = probs.contiguous()
    rows, vocab = probs.shape
    if vocab > _MAX_NOISE_COLUMNS:
        raise ValueError(f"sample_from_probs: vocab must be at most 2**30, got {vocab}")
    if not 0 <= stream <= _MASK32:
        raise ValueError(f"sample_from_probs: stream must be in [0, 2**32), got {stream}")
    chunk = min(_RACE_CHUNK, max(16, triton.next_power_of_2(vocab)))
    num_chunks = triton.cdiv(vocab, chunk)
    block = min(_RACE_BLOCK, chunk)
    best_score = torch.empty((rows, num_chunks), dtype=torch.float32, device=probs.device)
    best_index = torch.empty((rows, num_chunks), dtype=torch.int32, device=probs.device)
    _exponential_race_kernel[(rows, num_chunks)](probs, probs.stride(0), seeds, offsets, stream, best_score,
                                                 best_index, vocab, num_chunks, CHUNK=chunk, BLOCK=block)
    winner = best_score.argmax(dim=1, keepdim=True)  # first chunk on ties, as in the reference
    return best_index.gather(1, winner).squeeze(1).long()


@_jit
def _chunk_argmax_kernel(x_ptr, stride_row, n_cols, best_val_ptr, best_idx_ptr, num_chunks,
                         CHUNK: tl.constexpr):
    """Program (row, chunk): the largest value of CHUNK columns and its first index."""
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    cols = chunk * CHUNK + tl.arange(0, CHUNK)
    x = tl.load(x_ptr + row * stride_row + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
    tl.store(best_val_ptr + row * num_chunks + chunk, tl.max(x, axis=0))
    tl.store(best_idx_ptr + row * num_chunks + chunk, chunk * CHUNK + tl.argmax(x, axis=0, tie_break_left=True))


@_jit
def _pick_chunk_kernel(best_val_ptr, best_idx_ptr, num_chunks, out_ptr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, BLOCK)
    v = tl.load(best_val_ptr + row * num_chunks + j, mask=j < num_chunks, other=float("-inf"))
    winner = tl.argmax(v, axis=0, tie_break_left=True)  # chunks are in column order: first max wins
    tl.store(out_ptr + row, tl.load(best_idx_ptr + row * num_chunks + winner).to(tl.int64))


_ARGMAX_CHUNK = 4096


def greedy_argmax(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(dim=-1)`` for [R, V] (lowest index among equal maxima): [R] int64.

    Two small launches that spread a row over many programs; torch reduces a single row with
    one block, which at batch 1 and a 128k vocabulary costs more than a whole layer's RoPE,
    norms and SwiGLU together. Needs CUDA tensors (or TRITON_INTERPRET=1).
    """
    if logits.dim() != 2:
        raise ValueError(f"greedy_argmax expects [rows, vocab] logits, got shape {tuple(logits.shape)}")
    rows, vocab = logits.shape
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if rows == 0:
        return out
    if vocab == 0:
        raise ValueError("greedy_argmax: empty vocabulary")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    chunk = min(_ARGMAX_CHUNK, max(16, triton.next_power_of_2(vocab)))
    num_chunks = triton.cdiv(vocab, chunk)
    best_val = torch.empty((rows, num_chunks), dtype=torch.float32, device=logits.device)
    best_idx = torch.empty((rows, num_chunks), dtype=torch.int32, device=logits.device)
    _chunk_argmax_kernel[(rows, num_chunks)](logits, logits.stride(0), vocab, best_val, best_idx, num_chunks,
                                             CHUNK=chunk, num_warps=4)
    _pick_chunk_kernel[(rows,)](best_val, best_idx, num_chunks, out, BLOCK=max(16, triton.next_power_of_2(num_chunks)),
                                num_warps=1)
    return out


def sample_from_probs(probs: torch.Tensor, seeds: torch.Tensor, offsets: torch.Tensor,
                      stream: int) -> torch.Tensor:
    """One token per row drawn exactly from ``probs`` [R, V]: [R] int64.

    The fused Triton kernel on CUDA (when Triton is installed), the PyTorch reference elsewhere.
    """
    if probs.is_cuda and triton is not None:
        return sample_from_probs_triton(probs, seeds, offsets, stream)
    return sample_from_probs_ref(probs, seeds, offsets, stream)


def sample(logits: torch.Tensor, st: SamplingTensors, stream: int = STREAM_SAMPLE) -> torch.Tensor:
    """Next token per row from logits [R, V] under the row's settings: [R] int64."""
    return sample_from_probs(target_probs(logits, st), st.seeds, st.offsets, stream)
