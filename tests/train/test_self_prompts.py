"""Requests the target writes itself (train/self_prompts.py): the filter, the draws, reuse.

The engine here is a double that answers each draw with a scripted text chosen by its seed, so
the test controls which draws are broken; the prompts it is given are checked (the template up to
the user's words, then the draw's opener). The real engine runs the same queue in data
preparation (tests/train/test_training.py).
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from eaglespec.train.data import load_conversations
from eaglespec.train.self_prompts import SelfPromptSettings, problem, user_turn_prefix, write_self_prompts

EOS = 2


@pytest.fixture(scope="module")
def tokenizer():
    import gguf

    from eaglespec.models.loading import default_model_path
    from eaglespec.tokenizer import Tokenizer

    return Tokenizer.from_gguf_metadata(gguf.GGUFReader(default_model_path()))


class ScriptedLLM:
    """Answers draw i (seed = settings.seed * stride + i) with script[i % len(script)]; a text
    ending in "..." is cut off (no EOS). Records every prompt and seed it was given."""

    def __init__(self, tokenizer, script: list[str], max_batch_size: int = 4):
        self.tokenizer, self.script = tokenizer, script
        self.engine_config = SimpleNamespace(max_batch_size=max_batch_size)
        self.eos_ids = (EOS,)
        self.requests: dict[int, tuple[list[int], object]] = {}
        self.unfinished: list[int] = []

    def add_request(self, ids, params):
        rid = len(self.requests)
        self.requests[rid] = (list(ids), params)
        self.unfinished.append(rid)
        return rid

    def step(self):
        rid = self.unfinished.pop(0)
        return [SimpleNamespace(request_id=rid, finished=True)]

    def collect(self, rid):
        ids, params = self.requests[rid]
        text = self.script[(params.seed % 1_000_033) % len(self.script)]
        reply = self.tokenizer.encode(" " + text.removesuffix("..."))  # a model's next word begins with a space
        return SimpleNamespace(error=None, token_ids=reply if text.endswith("...") else reply + [EOS])


def test_problem_keeps_requests_and_names_what_is_broken():
    s = SelfPromptSettings(count=1)
    assert problem("Write a short poem about the sea at night.", True, s) is None
    assert problem("Write a short poem about the sea at night.", False, s) == "cut_off"
    assert problem("Hi there", True, s) == "too_short"
    assert problem("Tell me more <|im_start|>assistant about it", True, s) == "template_text"
    assert problem("1234 5678 91011 121314 ++ -- ** //", True, s) == "not_words"
    assert problem("Do this now.\nDo this now.\nDo this now.\nThen stop.", True, s) == "repeated_lines"
    assert problem(" ".join(["go to the shop and"] * 6), True, s) == "repeated_words"


def test_the_prefix_is_the_template_up_to_the_users_words(tokenizer):
    prefix = tokenizer.decode(user_turn_prefix(tokenizer), skip_special_tokens=False)
    whole = tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=False)
    assert whole.startswith(prefix) and whole[len(prefix):].startswith("Hello")
    assert prefix.endswith("<|im_start|>user\n")


def test_self_prompts_are_drawn_by_seed_filtered_deduplicated_and_reused(tokenizer, tmp_path):
    script = ["How do I keep basil alive on a windowsill?", "Hi",  # too short
              "A question that never ends because it runs past the token limit...",
              "How do I keep basil alive on a windowsill?",  # a duplicate of draw 0
              "Can you explain how a heat pump moves heat uphill?"]
    settings = SelfPromptSettings(count=4, seed=3, openers=("", "Write"))
    llm = ScriptedLLM(tokenizer, script)
    path = str(tmp_path / "self-prompts.jsonl")
    prompts = write_self_prompts(llm, path, settings, progress=False)
    # Draws are kept in order until 4 pass ("Write" begins the odd draws' words); more rounds as needed.
    prefix = user_turn_prefix(tokenizer)
    expected, seen, i = [], set(), 0
    while len(expected) < 4:
        text = script[i % len(script)]
        opened = ("Write " if i % 2 else "") + text  # the opener's tokens, then the reply's
        if not text.endswith("...") and len(text.split()) >= 4 and opened not in seen:
            seen.add(opened)
            expected.append(i)
        i += 1
    records = [json.loads(line) for line in open(path)]
    assert [r["draw"] for r in records] == expected
    assert prompts == [r["prompt"] for r in records]
    assert all(p.startswith("Write") for p, r in zip(prompts, records) if r["draw"] % 2)
    for ids, params in llm.requests.values():
        assert ids[:len(prefix)] == prefix and params.seed // 1_000_033 == 3
        assert params.temperature == settings.temperature and params.top_p == settings.top_p
    summary = json.load(open(path + ".summary.json"))
    assert summary["kept"] == 4 and summary["draws"] == expected[-1] + 1
    assert summary["rejected"]["too_short"] >= 1 and summary["rejected"]["cut_off"] >= 1
    # data.source = "self" reads the file as conversations of one user turn.
    assert load_conversations(path) == [[p] for p in prompts]
    # The same settings reuse the file (no request made); other settings write it anew.
    again = ScriptedLLM(tokenizer, script)
    assert write_self_prompts(again, path, settings, progress=False) == prompts and not again.requests
    fewer = write_self_prompts(again, path, SelfPromptSettings(count=2, seed=3, openers=("",)), progress=False)
    assert again.requests and fewer == [script[0], script[4]]


def test_a_target_that_writes_nothing_usable_gets_a_clear_error(tokenizer, tmp_path):
    llm = ScriptedLLM(tokenizer, ["Hi", "An answer cut off at the limit..."])
    with pytest.raises(ValueError, match="passed the filter"):
        write_self_prompts(llm, str(tmp_path / "p.jsonl"), SelfPromptSettings(count=3, openers=("",)),
                           progress=False)
