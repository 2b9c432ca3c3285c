"""Draft-head checkpoints in the official EAGLE / EAGLE-3 layouts, built here for a shrunk
Llama 3 config: the right keys and shapes load; wrong ones fail with a message naming the tensor."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from eaglespec.config import LlamaConfig
from eaglespec.models.eagle import load_head
from eaglespec.models.llama import build_model

# Llama 3 proportions, shrunk: GQA 4:1, rope theta 500000 with llama3 scaling, untied embeddings.
H, HEADS, KV, D, INTER, VOCAB, DRAFT_VOCAB = 64, 4, 1, 16, 224, 300, 120
ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 256}


@pytest.fixture(scope="module")
def target():
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=H, intermediate_size=INTER, num_layers=4, num_heads=HEADS,
                      num_kv_heads=KV, head_dim=D, rope_theta=500000.0, rope_scaling=ROPE,
                      max_position_embeddings=2048)
    model = build_model(cfg, "cpu", torch.float32)
    model.init_random(seed=0)
    return model


def hf_config(**extra) -> dict:
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": H,
           "intermediate_size": INTER, "num_attention_heads": HEADS, "num_key_value_heads": KV, "head_dim": D,
           "num_hidden_layers": 1, "vocab_size": VOCAB, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
           "rope_scaling": ROPE, "max_position_embeddings": 2048, "bias": False}
    cfg.update(extra)
    return cfg


def layer_tensors(prefix: str, in_features: int, first_layer_norm: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(len(prefix))
    r = lambda *s: torch.randn(*s, generator=g) * 0.05  # noqa: E731
    out = {f"{prefix}.self_attn.q_proj.weight": r(HEADS * D, in_features),
           f"{prefix}.self_attn.k_proj.weight": r(KV * D, in_features),
           f"{prefix}.self_attn.v_proj.weight": r(KV * D, in_features),
           f"{prefix}.self_attn.o_proj.weight": r(H, HEADS * D),
           f"{prefix}.mlp.gate_proj.weight": r(INTER, H), f"{prefix}.mlp.up_proj.weight": r(INTER, H),
           f"{prefix}.mlp.down_proj.weight": r(H, INTER),
           f"{prefix}.post_attention_layernorm.weight": torch.ones(H)}
    if first_layer_norm:
        out[f"{prefix}.input_layernorm.weight"] = torch.ones(H)
    return out


def eagle1_state(layers: int = 1, bias: bool = True, with_embed: bool = True) -> dict[str, torch.Tensor]:
    state = {"fc.weight": torch.randn(H, 2 * H) * 0.05}
    if bias:
        state["fc.bias"] = torch.zeros(H)
    for i in range(layers):  # layer 0 has no input_layernorm in the official heads
        state.update(layer_tensors(f"layers.{i}", H, first_layer_norm=i > 0))
    if with_embed:
        state["embed_tokens.weight"] = torch.randn(VOCAB, H)
    return state


def eagle3_state() -> dict[str, torch.Tensor]:
    state = {"fc.weight": torch.randn(H, 3 * H) * 0.05, "norm.weight": torch.ones(H),
             "lm_head.weight": torch.randn(DRAFT_VOCAB, H) * 0.05,
             "midlayer.hidden_norm.weight": torch.ones(H), "midlayer.input_layernorm.weight": torch.ones(H)}
    state.update(layer_tensors("midlayer", 2 * H, first_layer_norm=False))
    ids = torch.arange(DRAFT_VOCAB) * 2  # draft id i is target id 2i
    state["d2t"] = ids - torch.arange(DRAFT_VOCAB)
    t2d = torch.zeros(VOCAB, dtype=torch.bool)
    t2d[ids] = True
    state["t2d"] = t2d
    return state


def write(tmp_path, cfg: dict, state: dict, name: str = "model.safetensors"):
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    if name.endswith(".safetensors"):
        save_file(state, str(tmp_path / name))
    else:
        torch.save(state, str(tmp_path / name))
    return str(tmp_path)


def test_official_eagle1_layout_loads_with_bias_and_embedding(target, tmp_path):
    state = eagle1_state()
    head = load_head(write(tmp_path, hf_config(bias=True), state), target)
    assert head.config.kind == "eagle1" and head.config.fc_bias
    assert torch.equal(head.fc.bias, state["fc.bias"])
    q = head.layers[0].self_attn.qkv_proj.weight[:HEADS * D]
    assert torch.equal(q, state["layers.0.self_attn.q_proj.weight"])
    assert isinstance(head.layers[0].input_layernorm, torch.nn.Identity)


def test_multilayer_dense_draft_and_pickle_through_weights_only(target, tmp_path):
    state = eagle1_state(layers=3, bias=False, with_embed=False)
    head = load_head(write(tmp_path, hf_config(num_hidden_layers=3), state, "pytorch_model.bin"), target)
    assert head.num_layers == 3
    assert torch.equal(head.layers[2].input_layernorm.weight, state["layers.2.input_layernorm.weight"])


def test_official_eagle3_layout_loads_with_vocab_maps(target, tmp_path):
    cfg = hf_config(architectures=["LlamaForCausalLMEagle3"], draft_vocab_size=DRAFT_VOCAB)
    head = load_head(write(tmp_path, cfg, eagle3_state()), target)
    assert head.config.kind == "eagle3" and head.config.draft_vocab_size == DRAFT_VOCAB
    assert torch.equal(head.draft_to_target(), torch.arange(DRAFT_VOCAB) * 2)
    assert head.midlayer.self_attn.qkv_proj.weight.shape == ((HEADS + 2 * KV) * D, 2 * H)


@pytest.mark.parametrize("corrupt, message", [
    (lambda s: s.pop("layers.0.mlp.down_proj.weight"), r"missing tensor.*layers\.0\.mlp\.down_proj\.weight"),
    (lambda s: s.update({"layers.0.bogus.weight": torch.zeros(3)}), r"unexpected tensor 'layers\.0\.bogus\.weight'"),
    (lambda s: s.update({"fc.weight": torch.zeros(H, 3 * H)}), r"'fc\.weight' has shape \(64, 192\), expected \(64, 128\)"),
    (lambda s: s.update({"layers.0.self_attn.k_proj.weight": torch.zeros(2 * D, H)}),
     r"'layers\.0\.self_attn\.k_proj\.weight' has shape"),
    (lambda s: s.update({"embed_tokens.weight": torch.zeros(VOCAB + 1, H)}), r"embed_tokens\.weight.*target's embedding"),
])
def test_wrong_eagle1_tensors_fail_naming_the_tensor(target, tmp_path, corrupt, message):
    state = eagle1_state()
    corrupt(state)
    with pytest.raises(ValueError, match=message):
        load_head(write(tmp_path, hf_config(bias=True), state), target)


def test_wrong_eagle3_vocabulary_fails(target, tmp_path):
    cfg = hf_config(architectures=["LlamaForCausalLMEagle3"], draft_vocab_size=DRAFT_VOCAB)
    state = eagle3_state()
    state["d2t"] = state["d2t"] + VOCAB  # maps draft ids past the target vocabulary
    with pytest.raises(ValueError, match="d2t maps draft ids outside the target vocabulary"):
        load_head(write(tmp_path, cfg, state), target)
    with pytest.raises(ValueError, match="draft head vocabulary 301 != target vocabulary 300"):
        load_head(write(tmp_path, dict(cfg, vocab_size=VOCAB + 1), eagle3_state()), target)


def test_missing_and_broken_files_are_named(target, tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_head(str(tmp_path), target)
    (tmp_path / "config.json").write_text(json.dumps(hf_config()))
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor pytorch_model.bin"):
        load_head(str(tmp_path), target)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="cannot read .*model.safetensors"):
        load_head(str(tmp_path), target)


@pytest.mark.parametrize("name, value", [("layers.0.mlp.up_proj.weight", float("nan")),
                                         ("fc.weight", float("inf")), ("fc.bias", float("-inf"))])
def test_non_finite_eagle1_weights_are_refused_naming_the_tensor(target, tmp_path, name, value):
    state = eagle1_state()
    state[name][0, ...] = value
    with pytest.raises(ValueError, match=rf"'{name}' holds non-finite values \(NaN or inf\)"):
        load_head(write(tmp_path, hf_config(bias=True), state), target)


def test_non_finite_eagle3_weights_are_refused_naming_the_tensor(target, tmp_path):
    cfg = hf_config(architectures=["LlamaForCausalLMEagle3"], draft_vocab_size=DRAFT_VOCAB)
    state = eagle3_state()
    state["lm_head.weight"][5, 7] = float("nan")
    with pytest.raises(ValueError, match=r"'lm_head\.weight' holds non-finite values"):
        load_head(write(tmp_path, cfg, state), target)


def fresh_target():
    model = build_model(LlamaConfig(vocab_size=VOCAB, hidden_size=H, intermediate_size=INTER, num_layers=4,
                                    num_heads=HEADS, num_kv_heads=KV, head_dim=D, rope_theta=500000.0,
                                    rope_scaling=ROPE, max_position_embeddings=2048), "cpu", torch.float32)
    model.init_random(seed=0)
    return model


@pytest.mark.parametrize("where", ["top level", "eagle_config"])
def test_eagle3_heads_taps_are_read_and_the_target_feeds_them(tmp_path, where):
    """The target layers an EAGLE-3 head was trained on come with it (vLLM's
    eagle_aux_hidden_state_layer_ids, at the top level or in eagle_config); without them the
    target fed its default layers, and a head trained on others drafted from the wrong features."""
    taps = {"eagle_aux_hidden_state_layer_ids": [1, 2, 3]}
    extra = taps if where == "top level" else {"eagle_config": taps}
    cfg = hf_config(architectures=["LlamaForCausalLMEagle3"], draft_vocab_size=DRAFT_VOCAB, **extra)
    target = fresh_target()
    assert target.config.eagle3_layers == (2, 2, 1)  # the default for 4 layers: 2, N//2, N-3
    head = load_head(write(tmp_path, cfg, eagle3_state()), target)
    assert head.config.target_layers == (1, 2, 3) and target.config.eagle3_layers == (1, 2, 3)
    assert head.config.to_hf_dict()["eagle_aux_hidden_state_layer_ids"] == [1, 2, 3]


def test_eagle3_taps_out_of_range_or_taken_are_refused(tmp_path):
    state = eagle3_state()
    base = hf_config(architectures=["LlamaForCausalLMEagle3"], draft_vocab_size=DRAFT_VOCAB)
    with pytest.raises(ValueError, match=r"reads target layers \[1, 2, 4\].*the target has 4 layers"):
        load_head(write(tmp_path, dict(base, eagle_aux_hidden_state_layer_ids=[1, 2, 4]), state), fresh_target())
    with pytest.raises(ValueError, match="target_layers .* must be three layer indices"):
        load_head(write(tmp_path, dict(base, eagle_aux_hidden_state_layer_ids=[1, 2]), state), fresh_target())
    target = fresh_target()
    load_head(write(tmp_path, dict(base, eagle_aux_hidden_state_layer_ids=[1, 2, 3]), state), target)
    with pytest.raises(ValueError, match=r"already feeds layers \[1, 2, 3\] to another EAGLE-3 head"):
        load_head(write(tmp_path, dict(base, eagle_aux_hidden_state_layer_ids=[0, 1, 2]), state), target)
