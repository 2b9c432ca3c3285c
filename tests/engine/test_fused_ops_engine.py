"""Greedy generation on the Triton path (Triton attention + fused element-wise kernels) emits
exactly the tokens of the torch path (fp32), for plain and speculative decoding."""

from __future__ import annotations

import torch

from eaglespec.config import SamplingParams, SpecConfig
from eaglespec.engine.llm import LLM
from eaglespec.models.llama import FEW_TOKENS
from eaglespec.ops import fused, gemv
from tests.conftest import needs_triton_kernels, small_engine
from tests.speculative.test_speculative_greedy import _prompts, eagle1_head, predictable_target



def _counting(monkeypatch, name: str, module=fused) -> list[int]:
    """Count calls of ``module.<name>`` (the model looks it up on the module at call time)."""
    calls = [0]
    real = getattr(module, name)

    def wrapper(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


@needs_triton_kernels
def test_fused_kernels_in_the_engine_match_the_torch_path(monkeypatch):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    target = predictable_target(seed=31).to(device)
    # The long prompt's prefill is more than FEW_TOKENS tokens: it runs on cuBLAS products with the
    # fused element-wise kernels between them; the decode steps run on the folded products.
    prompts = _prompts(target.config.vocab_size, [FEW_TOKENS + 9, 4], seed=8)
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    plain = LLM.from_model(target, engine=small_engine()).generate(prompts, params)
    head = eagle1_head(target, seed=9)

    # The "triton" attention backend runs the model's "triton" kernel set (same weights).
    norms, ropes = _counting(monkeypatch, "rms_norm"), _counting(monkeypatch, "rope_and_cache_write")
    folded = _counting(monkeypatch, "gemv_qkv_rope", module=gemv)
    engine = small_engine(attention_backend="triton")
    fused_llm = LLM.from_model(target, engine=engine)
    assert fused_llm.runner.model.kernels == "triton" and target.kernels == "torch"
    fused_plain = fused_llm.generate(prompts, params)
    assert norms[0] > 0 and ropes[0] > 0 and folded[0] > 0
    assert [o.token_ids for o in fused_plain] == [o.token_ids for o in plain]

    # Tree verification: the K/V of the tree go to the side buffer, not through kv_slots.
    spec = LLM.from_model(target, draft=head, spec=SpecConfig(tree="dynamic:3,2,6"),
                          engine=engine).generate(prompts, params)
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain]


@needs_triton_kernels
def test_few_token_steps_on_folded_products_match_the_torch_path(monkeypatch):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    target = predictable_target(seed=32).to(device)
    prompt = _prompts(target.config.vocab_size, [9], seed=3)[0]
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    want = LLM.from_model(target, engine=small_engine()).generate([prompt], params)[0].token_ids
    calls = _counting(monkeypatch, "gemv_qkv_rope", module=gemv)
    engine = small_engine(attention_backend="triton")
    got = LLM.from_model(target, engine=engine).generate([prompt], params)[0].token_ids
    assert got == want
    # The short prefill and each decode step (all but the prefill's token) run every layer on the
    # folded products.
    assert calls[0] == 8 * target.config.num_layers
