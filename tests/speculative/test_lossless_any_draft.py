"""Whatever the draft head proposes changes speed, never output.

Random, zero, NaN-holding, inf-holding and adversarial heads (out-of-vocabulary, negative and
repeated proposed ids), on every tree kind: greedy speculative output equals plain greedy output
at batch 1 and 4, and seeded sampling follows the target's exact distribution (chi-square, as in
tests/speculative/test_acceptance.py).
"""

from __future__ import annotations

import json

import pytest
import torch

from eaglespec.config import SamplingParams, SpecConfig
from eaglespec.engine.llm import LLM
from eaglespec.ops.draft_topk import LOGP_FLOOR, draft_topk_ref
from eaglespec.ops.sampling import SamplingTensors, target_probs
from eaglespec.speculative.acceptance import accept_greedy_by_masks
from eaglespec.speculative.tree import ancestor_bits_from_parents
from eaglespec.train.token_ranking import rank_tokens
from tests.conftest import small_engine
from tests.speculative.test_acceptance import chi_square
from tests.speculative.test_speculative_greedy import _prompts, eagle1_head, eagle3_head, predictable_target

VOCAB = 61


@pytest.fixture(scope="module")
def target():
    return predictable_target(seed=31)


def broken_head(target, kind: str):
    """A head built to be useless or hostile (only ever in memory: loading refuses non-finite
    weights and out-of-vocabulary maps)."""
    if kind == "adversarial":
        head = eagle3_head(target, seed=9, draft_vocab=24)
        with torch.no_grad():
            # Target id of each draft id: past the vocabulary, negative, or one of a few repeats
            # (the repeats include tokens the target often picks, so duplicates get accepted).
            ids = torch.tensor([VOCAB + i if i % 3 == 0 else (-1 - i if i % 3 == 1 else i % 4)
                                for i in range(24)])
            head.d2t.copy_(ids - torch.arange(24))
        return head
    head = eagle1_head(target, seed=8, oracle=kind == "oracle")
    with torch.no_grad():
        if kind == "zero":
            for p in head.parameters():
                p.zero_()
        elif kind == "nan":
            head.fc.weight[3, 5] = float("nan")
        elif kind == "inf":
            head.fc.weight[0, :] = float("inf")
            head.layers[0].mlp.down_proj.weight[1, 2] = float("-inf")
    return head


HEADS = ["random", "zero", "nan", "inf", "adversarial"]


def tree_spec(kind: str, tmp_path) -> str:
    if kind == "chain":
        return "chain:3"
    if kind == "dynamic":
        return "dynamic:3,3,8"
    path = tmp_path / "choices.json"
    path.write_text(json.dumps([[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0]]))
    return str(path)


def test_draft_log_probs_are_finite_and_ordered():
    # Row 0 meets a NaN output row, row 1 an inf one and a -inf one, row 2 three equal logits.
    weight = torch.tensor([[float("nan"), 0.0], [1.0, 0.0], [2.0, 0.0], [0.0, float("inf")], [0.0, float("-inf")]])
    hidden = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    logp, ids = draft_topk_ref(hidden, weight, 3)
    assert torch.isfinite(logp).all() and (logp <= 0).all() and (logp >= LOGP_FLOOR).all()
    assert bool((logp[:, :-1] >= logp[:, 1:]).all())
    assert ids[0].tolist() == [2, 1, 0]  # NaN logits (0, and 3, 4: 0 * inf) rank last, lowest index first
    assert ids[1].tolist() == [3, 1, 2]  # +inf first; every log-prob is then the floor
    assert logp[1].tolist() == [LOGP_FLOOR] * 3
    assert ids[2].tolist() == [1, 2, 0]  # equal logits: lowest index first


def test_greedy_masks_never_accept_an_orphan():
    # Node 2 lost its parent (parent -1) but sits at depth 2 and carries the root's argmax: it
    # must not be accepted, so the walk stops at the root with the bonus token.
    tokens = torch.tensor([[5, 9, 7]])
    parents = torch.tensor([[-1, 0, -1]])
    depth = torch.tensor([[0, 1, 2]])
    best = torch.tensor([[7, 3, 3]])  # the root's argmax is 7
    res = accept_greedy_by_masks(tokens, parents, depth, ancestor_bits_from_parents(parents, 2), best, 2)
    assert res.tokens.tolist() == [[7, -1, -1]] and res.num_emitted.tolist() == [1]
    assert res.path.tolist() == [[0, -1, -1]]


@pytest.mark.parametrize("tree", ["chain", "static", "dynamic"])
@pytest.mark.parametrize("head_kind", HEADS)
def test_greedy_output_is_plain_output_whatever_the_draft(target, head_kind, tree, tmp_path):
    prompts = _prompts(VOCAB, [9, 1, 23, 14], seed=11)
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    plain = LLM.from_model(target, engine=small_engine()).generate(prompts, params)
    spec = LLM.from_model(target, draft=broken_head(target, head_kind), spec=SpecConfig(tree=tree_spec(tree, tmp_path)),
                          engine=small_engine())
    for batch in (prompts[:1], prompts):
        outs = spec.generate(batch, params)
        assert [o.token_ids for o in outs] == [o.token_ids for o in plain[:len(batch)]]
        assert all(o.stats["target_forwards"] <= len(o.token_ids) for o in outs)


def exact_distribution(llm: LLM, prompt: list[int], n_tokens: int, params: SamplingParams) -> torch.Tensor:
    """[VOCAB] * n_tokens probabilities of every continuation, by enumeration of the cut support."""
    st = SamplingTensors.from_params([params], [0], "cpu")
    probs = torch.zeros((VOCAB,) * n_tokens, dtype=torch.float64)

    def walk(prefix: list[int], mass: float) -> None:
        p = target_probs(llm.logits(prompt + prefix)[-1:].float(), st)[0].double()
        for tok in torch.nonzero(p > 0).flatten().tolist():
            if len(prefix) + 1 == n_tokens:
                probs[tuple(prefix + [tok])] = mass * p[tok]
            else:
                walk(prefix + [tok], mass * float(p[tok]))
    walk([], 1.0)
    return probs


SAMPLES = 1000
# Every head on the dynamic tree, every tree with the two hostile heads (runtime stays modest).
SAMPLING_CASES = ([(h, "dynamic") for h in HEADS + ["oracle"]]
                  + [(h, t) for h in ("nan", "adversarial") for t in ("chain", "static")])


@pytest.mark.parametrize("head_kind, tree", SAMPLING_CASES)
def test_seeded_sampling_keeps_the_target_distribution_whatever_the_draft(target, head_kind, tree, tmp_path):
    """Three tokens (the first from prefill, the others from one or two speculative steps),
    top-3 at temperature 1: 27 outcomes, counted over many seeds against their exact
    probabilities. The oracle-ish head shows that drafts do get accepted here."""
    llm = LLM.from_model(target, draft=broken_head(target, head_kind), spec=SpecConfig(tree=tree_spec(tree, tmp_path)),
                         engine=small_engine(max_batch_size=64, num_blocks=200))
    outs = assert_samples_follow_the_target(llm)
    if head_kind == "oracle":
        taus = [o.stats["tau"] for o in outs]
        assert max(taus) > 1.0, "no draft token was ever accepted: the test would prove little"


@pytest.mark.parametrize("tree", ["chain", "static", "dynamic"])
def test_seeded_sampling_keeps_the_target_distribution_with_a_reduced_draft_vocabulary(target, tree, tmp_path):
    """The oracle-ish head drafting over 16 of the 61 tokens (ranked by how often the target
    picks them): q is 0 for the other 45, which the target still samples."""
    head = broken_head(target, "oracle")
    picks = LLM.from_model(target, engine=small_engine()).logits(list(range(VOCAB))).argmax(-1)
    head.set_token_ranking(rank_tokens(torch.bincount(picks, minlength=VOCAB)))
    llm = LLM.from_model(target, draft=head, spec=SpecConfig(tree=tree_spec(tree, tmp_path), draft_vocab_size=16),
                         engine=small_engine(max_batch_size=64, num_blocks=200))
    assert llm.speculative.vocab.size == 16
    outs = assert_samples_follow_the_target(llm)
    taus = [o.stats["tau"] for o in outs]
    assert max(taus) > 1.0, "no draft token was ever accepted: the test would prove little"


def assert_samples_follow_the_target(llm: LLM) -> list:
    """Generate SAMPLES seeded outputs of one prompt and check them against the target's exact
    distribution (chi-square) and against batch-independence; returns the outputs."""
    prompt = _prompts(VOCAB, [6], seed=12)[0]
    base = SamplingParams(temperature=1.0, top_k=3, max_tokens=3, ignore_eos=True)
    params = [SamplingParams(temperature=1.0, top_k=3, max_tokens=3, ignore_eos=True, seed=s) for s in range(SAMPLES)]
    outs = llm.generate([prompt] * SAMPLES, params)
    counts = torch.zeros((VOCAB,) * 3)
    for o in outs:
        counts[tuple(o.token_ids)] += 1
    stat, threshold = chi_square(counts, exact_distribution(llm, prompt, 3, base))
    assert stat < threshold, f"chi-square {stat:.1f} >= {threshold:.1f}: not the target's distribution"
    # A seed's output does not depend on the batch it runs in (batch 1 and 4).
    assert [o.token_ids for o in llm.generate([prompt] * 4, params[:4])] == [o.token_ids for o in outs[:4]]
    assert llm.generate([prompt], params[5])[0].token_ids == outs[5].token_ids
    return outs
