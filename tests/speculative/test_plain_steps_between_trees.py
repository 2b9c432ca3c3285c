"""Under tree="auto", plain decoding steps run between tree steps. Each leaves its (feature,
token) pair pending for the head, behind those still pending, so the next tree step caches
them all: the head's cache then holds every position, as if only trees had run."""

from __future__ import annotations

import pytest
import torch

from eaglespec.config import SamplingParams, SpecConfig
from eaglespec.engine.llm import LLM
from eaglespec.speculative.policy import PLAIN, SpeculationPolicy
from tests.conftest import needs_triton_kernels, small_engine
from tests.speculative.test_speculative_greedy import eagle1_head, predictable_target


class Scripted(SpeculationPolicy):
    """Runs ``script`` (choices, in turn, cycling)."""

    def __init__(self, trees: list[str], script: list[str]):
        super().__init__(trees=trees)
        self.script, self.n = script, 0

    def choose(self, bucket: int, greedy: bool) -> str:
        self.n += 1
        return self.script[(self.n - 1) % len(self.script)]


def _head_cache_after(model, head, prompt: list[int], script: list[str], tokens: int, **engine):
    """Run one request under ``script`` until it has ``tokens`` cached; return its tokens and the
    head's K for the positions whose pairs the head has cached, [L, positions, Hkv, D]."""
    llm = LLM.from_model(model, draft=head, spec=SpecConfig(tree="auto"), engine=small_engine(**engine))
    core, spec = llm.core, llm.core.speculative
    spec.policy = Scripted(spec.policy.trees, script)
    rid = core.add_request(prompt, SamplingParams(max_tokens=200, ignore_eos=True))
    req = core.requests[rid]
    while req.num_cached < tokens:
        core.step()
    pending = int(spec.pending_count[spec._slot_of[rid]])
    cached = req.num_cached - pending
    k = spec.cache.k[:, torch.tensor(req.blocks)].flatten(1, 2)[:, :cached]
    return req.all_ids[:req.num_cached], k


@pytest.mark.parametrize("backend,tokens", [("torch", 60), pytest.param("triton", 24, marks=needs_triton_kernels)])
def test_plain_steps_between_tree_steps_leave_no_hole_in_the_heads_cache(backend, tokens):
    """The triton kernel set appends with ``append_pending``, the torch one with its reference."""
    model = predictable_target(seed=31)
    head = eagle1_head(model, seed=5)
    prompt = torch.randint(0, model.config.vocab_size, (9,), generator=torch.Generator().manual_seed(2)).tolist()
    engine = dict(block_size=4 if backend == "torch" else 16, attention_backend=backend)
    trees_only, k_ref = _head_cache_after(model, head, prompt, ["chain:3"], tokens, **engine)
    # These runs of plain steps fit beside the pending pairs of the chain before them (auto's window is 7 wide).
    mixed, k_mixed = _head_cache_after(model, head, prompt, ["chain:3", PLAIN, "chain:2", PLAIN, PLAIN, PLAIN,
                                                            "chain:1", PLAIN, PLAIN], tokens, **engine)
    n = min(len(trees_only), len(mixed))
    assert mixed[:n] == trees_only[:n]  # greedy: the same tokens whatever ran
    m = min(k_ref.shape[1], k_mixed.shape[1])
    assert m >= tokens - 10
    assert torch.allclose(k_mixed[:, :m], k_ref[:, :m], atol=1e-5)
