"""Tests of ops/sampling.py: the shaped target distribution, the counter-based noise, sampling."""

from __future__ import annotations

import math
import statistics
from dataclasses import replace

import pytest
import torch

from eaglespec.config import SamplingParams
from eaglespec.ops import sampling as S
from eaglespec.ops.sampling import (SamplingTensors, sample, sample_from_probs, target_probs,
                                    uniform_noise)
from tests.conftest import DEVICE, needs_triton_kernels


def chi_square_threshold(df: int, alpha: float = 1e-3) -> float:
    """Upper alpha quantile of chi-square(df), Wilson-Hilferty approximation."""
    z = statistics.NormalDist().inv_cdf(1.0 - alpha)
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


def settings(rows: int, temperature=1.0, top_k=0, top_p=1.0, seed=0, offsets=None,
             device="cpu") -> SamplingTensors:
    params = [SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)] * rows
    if offsets is None:
        offsets = [0] * rows
    return SamplingTensors.from_params(params, offsets, device)


def reference_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """One row in float64 with explicit loops: the tie-inclusive definition from the docstring."""
    logits = logits.double()
    if temperature == 0:
        out = torch.zeros_like(logits)
        out[int(torch.argmax(logits))] = 1.0
        return out
    p = torch.softmax(logits / temperature, dim=0)
    vals = sorted(p.tolist(), reverse=True)
    if 0 < top_k < len(vals):
        p = torch.where(p >= vals[top_k - 1], p, 0.0)
    p = p / p.sum()
    if top_p < 1.0:
        vals = sorted(p.tolist(), reverse=True)
        mass, least = 0.0, vals[0]
        for v in vals:
            if mass >= top_p:
                break
            least, mass = v, mass + v
        p = torch.where(p >= least, p, 0.0)
    return p / p.sum()


# ----------------------------------------------------------------------------- SamplingTensors


def test_from_params_and_expand():
    params = [SamplingParams(temperature=0.7, top_k=5, top_p=0.9, seed=3),
              SamplingParams(temperature=0.0, seed=2**64 - 1),
              SamplingParams(temperature=1.0, top_p=0.5, seed=7)]
    st = SamplingTensors.from_params(params, [4, 5, 6], "cpu")
    assert st.temperature.tolist() == pytest.approx([0.7, 0.0, 1.0])
    assert st.top_k.dtype == torch.int32 and st.top_k.tolist() == [5, 0, 0]
    assert st.seeds.tolist() == [3, -1, 7]  # 2**64 - 1 keeps its 64 bits
    assert st.offsets.tolist() == [4, 5, 6]
    assert st.sort_width == -1  # row 2 has top-p without top-k: full sort
    e = st.expand(2)
    assert e.seeds.tolist() == [3, 3, -1, -1, 7, 7]
    assert e.top_p.tolist() == pytest.approx([0.9, 0.9, 1.0, 1.0, 0.5, 0.5])
    assert e.sort_width == st.sort_width


def test_sort_width_hint():
    greedy_with_cuts = SamplingParams(temperature=0.0, top_k=3, top_p=0.5)
    assert SamplingTensors.from_params([SamplingParams(temperature=1.0), greedy_with_cuts],
                                       [0, 0], "cpu").sort_width == 0
    assert SamplingTensors.from_params([SamplingParams(temperature=1.0, top_k=4),
                                        SamplingParams(temperature=1.0, top_k=9, top_p=0.5)],
                                       [0, 0], "cpu").sort_width == 9


def test_bad_settings_raise():
    with pytest.raises(ValueError, match="offsets"):
        SamplingTensors.from_params([SamplingParams()], [0, 1], "cpu")
    st = settings(2)
    with pytest.raises(ValueError, match="seeds"):
        replace(st, seeds=torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="top_k"):
        replace(st, top_k=torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="rows"):
        target_probs(torch.zeros(3, 5), st)
    with pytest.raises(ValueError, match="stream"):
        uniform_noise(st.seeds, st.offsets, -1, 4)


# ----------------------------------------------------------------------------- target_probs


def test_greedy_is_one_hot_at_first_maximum():
    logits = torch.tensor([[1.0, 3.0, 3.0, -2.0], [0.0, 0.0, 0.0, 0.0]])
    probs = target_probs(logits, settings(2, temperature=0.0, top_k=1, top_p=0.1))
    assert probs.tolist() == [[0, 1, 0, 0], [1, 0, 0, 0]]


def test_matches_reference_on_random_logits():
    gen = torch.Generator().manual_seed(0)
    configs = [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (0.5, 3, 0.6), (1.0, 50, 0.95),
               (0.0, 2, 0.5), (2.0, 1, 1.0), (1.0, 0, 1e-9)]
    for temperature, top_k, top_p in configs:
        logits = torch.randn(6, 37, generator=gen) * 2
        logits[0, 5] = logits[0, 9] = logits[0].max() + 0.5  # an exact tie at the top
        logits[1, :4] = -float("inf")  # masked tokens
        st = settings(6, temperature, top_k, top_p)
        got = target_probs(logits, st)
        assert got.dtype == torch.float32
        for r in range(6):
            want = reference_probs(logits[r], temperature, top_k, top_p)
            torch.testing.assert_close(got[r].double(), want, atol=1e-6, rtol=1e-5)
        # The sort-width hint only changes how the cut is computed, never the result.
        for width in (-1, max(top_k, 1) if top_k else -1):
            torch.testing.assert_close(target_probs(logits, replace(st, sort_width=width)), got)


def test_top_k_keeps_exactly_k_or_ties():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0], [4.0, 2.0, 2.0, 2.0, 0.0]])
    probs = target_probs(logits, settings(2, top_k=2))
    assert (probs[0] > 0).tolist() == [True, True, False, False, False]
    # Tokens tied with the 2nd most probable are all kept.
    assert (probs[1] > 0).tolist() == [True, True, True, True, False]
    assert probs.sum(1).tolist() == pytest.approx([1.0, 1.0])
    # top_k above the vocabulary is no cut.
    assert (target_probs(logits, settings(2, top_k=99)) > 0).all()


@pytest.mark.parametrize("top_p, kept", [(0.75, 2), (0.75 - 1e-4, 2), (0.75 + 1e-4, 3), (0.5, 1),
                                         (0.5 + 1e-4, 2), (1e-7, 1), (0.875, 3), (1.0, 4)])
def test_top_p_boundaries(top_p, kept):
    # Probabilities 1/2, 1/4, 1/8, 1/8: the nucleus is the smallest prefix whose mass >= top_p,
    # and a mass landing exactly on top_p counts as reaching it.
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.125]]))
    probs = target_probs(logits, settings(1, top_p=top_p))
    assert int((probs > 0).sum()) == (4 if kept == 3 else kept)  # 1/8 and 1/8 tie: both or neither
    assert float(probs.sum()) == pytest.approx(1.0)
    if kept == 2:
        torch.testing.assert_close(probs[0, :2], torch.tensor([2 / 3, 1 / 3]))


def test_top_p_applies_to_the_top_k_renormalised_distribution():
    # After top-2 the distribution is (2/3, 1/3): top_p 0.6 keeps one token, although in the
    # uncut distribution the first token alone (1/2) would not reach 0.6.
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.125]]))
    probs = target_probs(logits, settings(1, top_k=2, top_p=0.6))
    assert probs.tolist() == [[1.0, 0.0, 0.0, 0.0]]


# The kernel with each of its tiles, and with small chunks: 12 chunks a row, so every cross-chunk
# sum and argmax has something to add up.
KERNELS = {"few-rows": lambda logits, st: S.target_probs_triton(logits, st, S.FEW_ROWS_TILE),
           "many-rows": lambda logits, st: S.target_probs_triton(logits, st, S.MANY_ROWS_TILE),
           "small-chunks": lambda logits, st: S.target_probs_triton(logits, st, S.GridTile(256, 8, 32, 4))}


@needs_triton_kernels
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("vocab", [37, 3001])
def test_triton_target_probs_keeps_the_same_tokens_as_the_reference(vocab, kernel):
    """Rows of mixed settings (greedy, top-k, top-p, both, none, a top-k past the vocabulary, a
    vanishing top-p) with ties at the top and inside, and masked tokens, in one call."""
    gen = torch.Generator().manual_seed(vocab)
    rows = [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (0.5, 3, 0.6), (1.0, 50, 0.95), (0.0, 2, 0.5),
            (2.0, 1, 1.0), (1.0, 0, 1e-9), (0.7, 0, 0.9), (1.0, 9999, 0.9)]
    logits = torch.randn(len(rows), vocab, generator=gen) * 2
    logits[0, 5] = logits[0, 9] = logits[0].max() + 0.5
    logits[2, 10:20] = logits[2, 3]
    logits[3, :4] = -float("inf")
    logits[5, 7] = logits[5, 30] = logits[5].max() + 1.0  # greedy takes the first of the two
    params = [SamplingParams(temperature=t, top_k=k, top_p=p) for t, k, p in rows]
    st = SamplingTensors.from_params(params, [0] * len(rows), DEVICE)
    want = S.target_probs_ref(logits.to(DEVICE), st).cpu()
    got = KERNELS[kernel](logits.to(DEVICE), st).cpu()
    assert torch.equal(got > 0, want > 0)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert got[5].tolist() == [1.0 if i == 7 else 0.0 for i in range(vocab)]


@needs_triton_kernels
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("top_p, kept", [(0.75, 2), (0.75 - 1e-4, 2), (0.75 + 1e-4, 4), (0.5, 1),
                                         (0.5 + 1e-4, 2), (1e-7, 1), (0.875, 4), (1.0, 4)])
def test_triton_target_probs_top_p_boundaries(top_p, kept, kernel):
    # As test_top_p_boundaries: 1/2, 1/4, 1/8, 1/8 (the last two tie), now through the kernel,
    # with and without a top-k of 3 that the tie overrides.
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.125]] * 2)).to(DEVICE)
    params = [SamplingParams(temperature=1.0, top_p=top_p), SamplingParams(temperature=1.0, top_k=3, top_p=top_p)]
    probs = KERNELS[kernel](logits, SamplingTensors.from_params(params, [0, 0], DEVICE)).cpu()
    assert (probs > 0).sum(1).tolist() == [kept, kept]
    assert probs.sum(1).tolist() == pytest.approx([1.0, 1.0])


# ----------------------------------------------------------------------------- noise


def test_noise_is_deterministic_and_batch_independent():
    seeds = torch.tensor([5, -7, 2**62, 5], dtype=torch.int64)
    offsets = torch.tensor([0, 3, 1, 1], dtype=torch.int64)
    u = uniform_noise(seeds, offsets, 2, 100)
    assert u.shape == (4, 100) and u.dtype == torch.float32
    assert torch.equal(u, uniform_noise(seeds, offsets, 2, 100))
    for r in range(4):
        assert torch.equal(u[r], uniform_noise(seeds[r:r + 1], offsets[r:r + 1], 2, 100)[0])
    assert torch.equal(u[:, :10], uniform_noise(seeds, offsets, 2, 10))  # column c is column c
    assert not torch.equal(u[0], u[3])  # offset matters
    assert not torch.equal(u, uniform_noise(seeds, offsets, 3, 100))  # stream matters


def test_noise_statistics():
    rows, cols = 256, 4096
    u = uniform_noise(torch.arange(rows, dtype=torch.int64), torch.zeros(rows, dtype=torch.int64), 0, cols)
    assert float(u.min()) > 0.0 and float(u.max()) < 1.0
    n = u.numel()
    assert abs(float(u.double().mean()) - 0.5) < 5 * math.sqrt(1 / 12 / n)
    assert abs(float(u.double().var()) - 1 / 12) < 5 * math.sqrt(1 / 180 / n)
    bins = 128
    counts = torch.bincount((u * bins).long().flatten(), minlength=bins).double()
    expected = n / bins
    assert float(((counts - expected) ** 2 / expected).sum()) < chi_square_threshold(bins - 1)
    # Pairs of neighbouring columns are uniform on the square (catches serial correlation).
    cells = (u * 16).long()
    pairs = torch.bincount((cells[:, :-1] * 16 + cells[:, 1:]).flatten(), minlength=256).double()
    expected = pairs.sum() / 256
    assert float(((pairs - expected) ** 2 / expected).sum()) < chi_square_threshold(255)


def test_noise_rows_uncorrelated():
    cols = 4096
    limit = 5.5 / math.sqrt(cols)  # max |correlation| over ~2e4 pairs of independent rows
    count, zero = torch.arange(200, dtype=torch.int64), torch.zeros(200, dtype=torch.int64)
    seeds_apart = uniform_noise(count, zero, 0, cols)
    offsets_apart = uniform_noise(zero, count, 0, cols)
    streams_apart = torch.cat([uniform_noise(zero[:1], zero[:1], s, cols) for s in range(200)])
    for u in (seeds_apart, offsets_apart, streams_apart):
        corr = torch.corrcoef(u.double())
        corr.fill_diagonal_(0.0)
        assert float(corr.abs().max()) < limit


# ----------------------------------------------------------------------------- sampling


def test_greedy_sample_equals_argmax():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(64, 1000, generator=gen)
    st = SamplingTensors.from_params([SamplingParams(temperature=0.0, seed=i) for i in range(64)],
                                     list(range(64)), "cpu")
    assert torch.equal(sample(logits, st), logits.argmax(-1))


def test_sample_from_one_hot_and_sparse_probs():
    probs = torch.zeros(300, 50)
    probs[torch.arange(300), torch.arange(300) % 50] = 1.0
    seeds = torch.arange(300, dtype=torch.int64)
    assert torch.equal(sample_from_probs(probs, seeds, seeds, 0), torch.arange(300) % 50)
    sparse = torch.zeros(300, 50)
    sparse[:, [3, 17]] = torch.tensor([1e-6, 2.0])  # unnormalised is fine
    out = sample_from_probs(sparse, seeds, seeds, 0)
    assert set(out.tolist()) <= {3, 17}


def test_same_seed_and_offset_same_token_whatever_the_batch():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(8, 500, generator=gen)
    params = [SamplingParams(temperature=1.0 + 0.1 * i, top_k=50 * (i % 3), top_p=0.9, seed=100 + i)
              for i in range(8)]
    offsets = list(range(8))
    full = sample(logits, SamplingTensors.from_params(params, offsets, "cpu"))
    pick = [6, 1, 3]
    part = sample(logits[pick], SamplingTensors.from_params([params[i] for i in pick],
                                                             [offsets[i] for i in pick], "cpu"))
    assert torch.equal(full[pick], part)
    again = sample(logits, SamplingTensors.from_params(params, offsets, "cpu"))
    assert torch.equal(full, again)
    moved = sample(logits, SamplingTensors.from_params(params, [o + 1 for o in offsets], "cpu"))
    assert not torch.equal(full, moved)


def test_sample_follows_target_probs():
    draws = 24000
    logits = torch.randn(1, 10, generator=torch.Generator().manual_seed(3)) * 1.5
    st = settings(draws, temperature=0.7, top_k=5, top_p=0.8, seed=11, offsets=list(range(draws)))
    want = target_probs(logits, settings(1, 0.7, 5, 0.8))[0].double()
    assert 2 <= int((want > 0).sum()) <= 5  # the cuts are active
    tokens = sample(logits.expand(draws, 10), st)
    counts = torch.bincount(tokens, minlength=10).double()
    assert float(counts[want == 0].sum()) == 0.0
    support = want > 0
    expected = want[support] * draws
    stat = float(((counts[support] - expected) ** 2 / expected).sum())
    assert stat < chi_square_threshold(int(support.sum()) - 1)


def test_chi_square_threshold_against_known_quantiles():
    # chi2.ppf(0.999, df) for df = 1, 10, 63: 10.828, 29.588, 103.442 (Wilson-Hilferty is close).
    for df, quantile in ((10, 29.588), (63, 103.442)):
        assert chi_square_threshold(df) == pytest.approx(quantile, rel=0.01)


# ----------------------------------------------------------------------------- Triton sampler


def _triton_runs_here() -> bool:
    from eaglespec.ops import sampling
    if sampling.triton is None:
        return False
    return torch.cuda.is_available() or type(sampling._exponential_race_kernel).__name__ == "InterpretedFunction"


@pytest.mark.skipif(not _triton_runs_here(), reason="needs CUDA or TRITON_INTERPRET=1")
def test_triton_sampler_matches_reference():
    from eaglespec.ops.sampling import sample_from_probs_ref, sample_from_probs_triton
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(4)
    for rows, vocab in ((5, 8), (9, 1003), (3, 9001)):  # one block, several blocks, several chunks
        probs = torch.softmax(torch.randn(rows, vocab, generator=gen) * 3, -1)
        probs[0] = 0.0
        probs[0, vocab - 1] = 1.0  # one-hot on the last column
        probs[1, : vocab // 2] = 0.0  # a cut row
        seeds = torch.randint(-2**62, 2**62, (rows,), generator=gen)
        offsets = torch.randint(0, 2**40, (rows,), generator=gen)
        for stream in (0, 1, 2**31 + 5):
            want = sample_from_probs_ref(probs, seeds, offsets, stream)
            got = sample_from_probs_triton(probs.to(device), seeds.to(device), offsets.to(device), stream)
            assert torch.equal(got.cpu(), want), (rows, vocab, stream)
    half = probs.to(device=device, dtype=torch.bfloat16)[:, ::2]  # low precision, strided rows
    got = sample_from_probs_triton(half, seeds.to(device), offsets.to(device), 0)
    assert torch.equal(got.cpu(), sample_from_probs_ref(half.float().cpu(), seeds, offsets, 0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_noise_and_sampling_match_cpu():
    seeds = torch.tensor([1, -5, 2**62 + 3], dtype=torch.int64)
    offsets = torch.tensor([0, 7, 2**40], dtype=torch.int64)
    u = uniform_noise(seeds, offsets, 9, 5000)
    assert torch.equal(uniform_noise(seeds.cuda(), offsets.cuda(), 9, 5000).cpu(), u)  # integer hash: bit-exact
    logits = torch.randn(3, 5000, generator=torch.Generator().manual_seed(6)) * 4
    st = SamplingTensors.from_params([SamplingParams(temperature=0.9, top_k=100, top_p=0.9, seed=int(s))
                                      for s in seeds], offsets, "cpu")
    st_cuda = SamplingTensors.from_params([SamplingParams(temperature=0.9, top_k=100, top_p=0.9, seed=int(s))
                                           for s in seeds], offsets, "cuda")
    torch.testing.assert_close(target_probs(logits.cuda(), st_cuda).cpu(), target_probs(logits, st))
    assert torch.equal(sample(logits.cuda(), st_cuda).cpu(), sample(logits, st))


@needs_triton_kernels
@pytest.mark.parametrize("rows,vocab", [(1, 5000), (3, 97), (2, 8192), (4, 1)])
def test_greedy_argmax_matches_torch_including_ties(rows, vocab):
    gen = torch.Generator().manual_seed(rows * vocab)
    logits = torch.randn(rows, vocab, generator=gen)
    # Ties across chunk boundaries and inside a chunk: the lowest index must win.
    logits[:, vocab // 2:] = torch.where(torch.arange(vocab - vocab // 2) % 1000 == 7, 9.0, logits[:, vocab // 2:])
    logits[0, vocab - 1] = 9.0
    if vocab > 4200:
        logits[-1, 4100] = 50.0
    logits = logits.to(DEVICE)
    got = S.greedy_argmax(logits)
    assert got.dtype == torch.int64
    assert torch.equal(got, logits.argmax(dim=-1))
    assert torch.equal(S.greedy_argmax(logits.to(torch.bfloat16)), logits.to(torch.bfloat16).argmax(dim=-1))
