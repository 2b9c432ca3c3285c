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


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}


def _load_dir(path: str):
    from eaglespec.models.llama import build_model
    from eaglespec.models.loading import open_checkpoint

    ckpt = open_checkpoint(path, progress=False)
    model = build_model(ckpt.config, "cpu", torch.float32)
    model.load_hf_tensors(ckpt.tensors, source=ckpt.path)
    return model


def test_both_config_formats_written_by_transformers_match_its_logits(tmp_path):
    """transformers 5 writes ``rope_parameters``; older ones ``rope_theta`` + ``rope_scaling``.
    The same tiny llama3-scaled model saved both ways gives transformers' logits."""
    import json

    torch.manual_seed(4)
    hf_cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      max_position_embeddings=512, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    new_dir, old_dir = tmp_path / "v5", tmp_path / "classic"
    hf.save_pretrained(new_dir)
    written = json.loads((new_dir / "config.json").read_text())
    if "rope_parameters" not in written:
        pytest.skip(f"transformers {transformers.__version__} writes the classic format only")
    assert written["rope_parameters"]["rope_type"] == "llama3" and "rope_scaling" not in written
    hf.save_pretrained(old_dir)
    classic = {k: v for k, v in written.items() if k != "rope_parameters"}
    classic["rope_theta"] = 500000.0
    classic["rope_scaling"] = LLAMA3_ROPE
    (old_dir / "config.json").write_text(json.dumps(classic))
    ids = torch.randint(0, 97, (300,), generator=torch.Generator().manual_seed(2)).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float()
    for path in (new_dir, old_dir):
        model = _load_dir(str(path))
        assert model.config.rope_theta == 500000.0 and model.config.rope_scaling["factor"] == 8.0
        ours = LLM.from_model(model, engine=small_engine(max_model_len=512)).logits(ids)
        assert (ours - ref).abs().max().item() <= 1e-4, path.name


@pytest.mark.parametrize("rope, message", [
    ({"rope_parameters": {"rope_theta": 1e4, "rope_type": "yarn", "factor": 4.0}}, r"unsupported rope type 'yarn'"),
    ({"rope_theta": 1e4, "rope_scaling": {"type": "linear", "factor": 2.0}}, r"unsupported rope type 'linear'"),
    ({"rope_parameters": {"rope_theta": 1e4, "rope_type": "dynamic", "factor": 2.0}}, r"unsupported rope type 'dynamic'"),
    ({"rope_parameters": {"full_attention": {"rope_theta": 1e4}}}, r"per-layer-type RoPE is not implemented"),
    ({"rope_parameters": {"rope_type": "default"}}, r"rope_parameters has no rope_theta"),
    ({"rope_parameters": {"rope_theta": 1e4, "rope_type": "llama3", "factor": 8.0}},
     r"llama3 scaling needs \['original_max_position_embeddings'\]"),
    ({"rope_theta": 5e5, "rope_parameters": {"rope_theta": 1e4}}, r"rope_theta 500000.0 and rope_parameters"),
])
def test_unimplemented_or_inconsistent_rope_is_refused_by_name(rope, message):
    from eaglespec.config import LlamaConfig

    cfg = dict(tiny_config().to_hf_dict())
    del cfg["rope_theta"], cfg["rope_scaling"]
    cfg.update(rope)
    with pytest.raises(ValueError, match=message):
        LlamaConfig.from_hf_dict(cfg)


def test_rope_parameters_default_type_means_no_scaling():
    from eaglespec.config import LlamaConfig

    cfg = dict(tiny_config().to_hf_dict())
    del cfg["rope_theta"], cfg["rope_scaling"]
    cfg["rope_parameters"] = {"rope_theta": 123456.0, "rope_type": "default"}
    parsed = LlamaConfig.from_hf_dict(cfg)
    assert parsed.rope_theta == 123456.0 and parsed.rope_scaling is None
