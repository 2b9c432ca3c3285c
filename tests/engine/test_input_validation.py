"""Careless input fails at the front door with a TypeError / ValueError that names the field and
what was expected, and nothing is queued; well-formed variants (numpy ints, OpenAI text parts) work."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tokenizers
from tokenizers import models, pre_tokenizers

from eaglespec.config import SamplingParams
from eaglespec.engine.llm import LLM
from eaglespec.tokenizer import Tokenizer
from tests.conftest import random_model, small_engine, tiny_config

WORDS = ["<unk>", "<eos>", "user", "assistant", "system", ":", "hello", "world", "the", "sky", "is", "blue"]


@pytest.fixture(scope="module")
def llm():
    backend = tokenizers.Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    template = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
                "{% if add_generation_prompt %}assistant : {% endif %}")
    tok = Tokenizer(backend, eos_tokens=["<eos>"], chat_template=template)
    return LLM.from_model(random_model(tiny_config(vocab_size=40), seed=2), tokenizer=tok, engine=small_engine())


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(max_tokens=8.5), TypeError, r"SamplingParams\.max_tokens must be an int >= 1, got 8\.5 \(float\)"),
    (dict(max_tokens="8"), TypeError, r"SamplingParams\.max_tokens must be an int >= 1, got '8' \(str\)"),
    (dict(max_tokens=0), ValueError, r"SamplingParams\.max_tokens must be an int >= 1, got 0"),
    (dict(max_tokens=True), TypeError, r"SamplingParams\.max_tokens must be an int"),
    (dict(temperature="hot"), TypeError, r"SamplingParams\.temperature must be a finite number >= 0.*'hot' \(str\)"),
    (dict(temperature=float("inf")), ValueError, r"SamplingParams\.temperature must be a finite number >= 0.*inf"),
    (dict(temperature=float("nan")), ValueError, r"SamplingParams\.temperature must be a finite number"),
    (dict(temperature=-0.5), ValueError, r"SamplingParams\.temperature must be a finite number >= 0"),
    (dict(temperature=None), TypeError, r"SamplingParams\.temperature must be a finite number"),
    (dict(top_p=0.0), ValueError, r"SamplingParams\.top_p must be a number in \(0, 1\], got 0\.0"),
    (dict(top_p=1.5), ValueError, r"SamplingParams\.top_p must be a number in \(0, 1\]"),
    (dict(top_p=float("nan")), ValueError, r"SamplingParams\.top_p must be a number in \(0, 1\]"),
    (dict(top_p="0.9"), TypeError, r"SamplingParams\.top_p must be a number in \(0, 1\], got '0\.9'"),
    (dict(top_k=-1), ValueError, r"SamplingParams\.top_k must be an int >= 0"),
    (dict(top_k=2.0), TypeError, r"SamplingParams\.top_k must be an int >= 0 .*2\.0 \(float\)"),
    (dict(seed=1.5), TypeError, r"SamplingParams\.seed must be an int or None, got 1\.5"),
    (dict(seed="42"), TypeError, r"SamplingParams\.seed must be an int or None"),
    (dict(stop=[1]), TypeError, r"SamplingParams\.stop must hold strings, got 1 \(int\)"),
    (dict(stop=[""]), ValueError, r"SamplingParams\.stop must hold non-empty strings"),
    (dict(stop=5), TypeError, r"SamplingParams\.stop must be a string or a list of strings, got int"),
    (dict(ignore_eos="yes"), TypeError, r"SamplingParams\.ignore_eos must be True or False"),
    (dict(detokenize=0), TypeError, r"SamplingParams\.detokenize must be True or False"),
    (dict(stop="end", detokenize=False), ValueError, r"SamplingParams\.stop needs the text"),
])
def test_sampling_params_name_the_field(kwargs, error, message):
    with pytest.raises(error, match=message):
        SamplingParams(**kwargs)


def test_sampling_params_accept_numpy_numbers_and_normalise():
    p = SamplingParams(max_tokens=np.int64(5), temperature=np.float32(0.5), top_k=np.int32(3), seed=np.int64(7),
                       stop="end")
    assert (p.max_tokens, p.top_k, p.seed, p.stop) == (5, 3, 7, ("end",))
    assert type(p.max_tokens) is int and type(p.temperature) is float
    assert SamplingParams(temperature=1e-30).temperature == 0.0  # logits / 1e-30 would overflow: greedy
    assert SamplingParams(top_k=10**12).top_k == 0  # more than any vocabulary: no cut


@pytest.mark.parametrize("prompts, error, message", [
    ([b"hello"], TypeError, r"prompts\[0\] is bytes: decode it to str, or give a list of token ids"),
    (b"hello", TypeError, r"prompts is bytes"),
    ([1, 2.7, 3.99], TypeError, r"prompts\[0\]: token ids must be ints, got 2\.7 \(float\) at position 1"),
    (None, TypeError, r"prompts must be a string, a list of int token ids, or a list of those; got NoneType"),
    ([None], TypeError, r"prompts\[0\] must be a string or a list of int token ids, got NoneType"),
    ([[1, 2], [3, None]], TypeError, r"prompts\[1\]: token ids must be ints, got None"),
    ([[1, 2], []], ValueError, r"prompts\[1\] is empty"),
    ([""], ValueError, r"prompts\[0\] is empty"),
    ([[1, 40]], ValueError, r"prompts\[0\]: token id 40 at position 1 is out of range \[0, 40\)"),
    ([[-1]], ValueError, r"token id -1 at position 0 is out of range"),
    ([[True, False]], TypeError, r"token ids must be ints, got True \(bool\)"),
    (3, TypeError, r"prompts must be a string, a list of int token ids"),
])
def test_generate_prompts_name_the_problem(llm, prompts, error, message):
    with pytest.raises(error, match=message):
        llm.generate(prompts, SamplingParams(max_tokens=2))
    assert not llm.has_work  # nothing half-queued


def test_generate_params_are_checked(llm):
    with pytest.raises(TypeError, match=r"params\[1\] must be a SamplingParams or None, got dict"):
        llm.generate([[1], [2]], [SamplingParams(), {"max_tokens": 3}])
    with pytest.raises(ValueError, match=r"2 prompts but 1 sampling params"):
        llm.generate([[1], [2]], [SamplingParams()])
    with pytest.raises(TypeError, match=r"params must be a SamplingParams or None, got dict"):
        next(llm.stream([1, 2], {"max_tokens": 3}))
    assert not llm.has_work


def test_good_prompt_forms_work(llm):
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    ref = llm.generate([[5, 6, 7]], params)[0].token_ids
    assert llm.generate([5, 6, 7], params)[0].token_ids == ref
    assert llm.generate([np.int64(5), np.int32(6), 7], params)[0].token_ids == ref
    assert llm.generate(torch.tensor([5, 6, 7]), params)[0].token_ids == ref
    assert llm.generate([(5, 6, 7)], params)[0].token_ids == ref
    assert llm.generate([], params) == []


def test_a_request_without_detokenizing_gives_the_same_ids_and_no_text(llm):
    with_text = llm.generate(["hello the sky"], SamplingParams(max_tokens=6, ignore_eos=True))[0]
    ids_only = llm.generate(["hello the sky"], SamplingParams(max_tokens=6, ignore_eos=True, detokenize=False))[0]
    assert ids_only.token_ids == with_text.token_ids and with_text.text and ids_only.text == ""


@pytest.mark.parametrize("messages, error, message", [
    ([], ValueError, r"messages is empty: a conversation needs at least one message"),
    (None, TypeError, r"messages must be a list of .*dicts, got NoneType"),
    ({"role": "user", "content": "hi"}, TypeError, r"messages must be a list"),
    (["hello"], TypeError, r"messages\[0\] must be a dict with 'role' and 'content', got str"),
    ([{"content": "hello"}], ValueError, r"messages\[0\] has no 'role'"),
    ([{"role": "user"}], ValueError, r"messages\[0\] has no 'content'"),
    ([{"role": "user", "content": None}], ValueError, r"messages\[0\] has no 'content'"),
    ([{"role": "user", "content": "a"}, {"role": "", "content": "b"}], TypeError,
     r"messages\[1\]\['role'\] must be a non-empty string"),
    ([{"role": 3, "content": "b"}], TypeError, r"messages\[0\]\['role'\] must be a non-empty string"),
    ([{"role": "user", "content": 42}], TypeError,
     r"messages\[0\]\['content'\] must be a string or a list of text parts, got int"),
    ([{"role": "user", "content": []}], ValueError, r"messages\[0\]\['content'\] is an empty list"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], ValueError,
     r"messages\[0\]\['content'\]\[0\] must be a text part .*got 'image_url' \(only text is supported\)"),
    ([{"role": "user", "content": ["hello"]}], ValueError, r"messages\[0\]\['content'\]\[0\] must be a text part"),
])
def test_chat_messages_name_the_problem(llm, messages, error, message):
    with pytest.raises(error, match=message):
        llm.chat(messages, SamplingParams(max_tokens=2))
    assert not llm.has_work


def test_chat_openai_text_parts_simply_work(llm):
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    parts = [{"type": "text", "text": "hello"}, {"type": "text", "text": "world"}]
    as_parts = llm.chat([{"role": "system", "content": "the sky"}, {"role": "user", "content": parts}], params)
    as_text = llm.chat([{"role": "system", "content": "the sky"}, {"role": "user", "content": "hello\nworld"}], params)
    assert as_parts.token_ids == as_text.token_ids and len(as_parts.token_ids) == 4


def test_logits_checks_its_input(llm):
    with pytest.raises(ValueError, match=r"token_ids is empty: it must hold at least one token"):
        llm.logits([])
    with pytest.raises(TypeError, match=r"token_ids: token ids must be ints, got 1\.5"):
        llm.logits([1, 1.5])
    with pytest.raises(ValueError, match=r"token_ids: 300 tokens, more than max_model_len \(256\)"):
        llm.logits([1] * 300)
    assert llm.logits([1, 2, 3]).shape == (3, 40)
