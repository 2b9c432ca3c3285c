"""Our Llama against transformers' LlamaForCausalLM (written by others) on random small configs."""

from __future__ import annotations

import pytest
import torch

from eaglespec.engine.llm import LLM
from eaglespec.config import SamplingParams
from tests.conftest import random_model, small_engine, tiny_config

transformers = pytest.importorskip("transformers")

CONFIGS = {
    "gqa-untied": tiny_config(),
    "mha-tied": tiny_config(num_kv_heads=4, tie_word_embeddings=True),
    "llama3-rope": tiny_config(num_kv_heads=1, rope_theta=500000.0, max_position_embeddings=512,
                               rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
}


def hf_twin(model):
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in model.config.to_hf_dict().items()
                                         if k not in ("architectures", "model_type")})
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    state = {name: t.clone() for name, t in model.hf_state_dict()}
    if model.config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return hf


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(name):
    torch.manual_seed(0)
    model = random_model(CONFIGS[name], seed=3)
    hf = hf_twin(model)
    llm = LLM.from_model(model, engine=small_engine())
    ids = torch.randint(0, model.config.vocab_size, (150,)).tolist()
    ours = llm.logits(ids)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float()
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", ["gqa-untied", "llama3-rope"])
def test_prefill_then_paged_decode_equals_full_forward(name):
    model = random_model(CONFIGS[name], seed=5)
    llm = LLM.from_model(model, engine=small_engine(block_size=16))
    prompt = torch.randint(0, model.config.vocab_size, (37,), generator=torch.Generator().manual_seed(1)).tolist()
    out = llm.generate([prompt], SamplingParams(max_tokens=20, ignore_eos=True))[0]
    # Greedy decode over the paged cache must pick the argmax of the full-sequence forward.
    full = llm.logits(prompt + out.token_ids)
    expect = full[len(prompt) - 1:-1].argmax(-1).tolist()
    assert out.token_ids == expect
