"""Token rankings for reduced draft vocabularies: counting, ranking, the file beside the head,
and the ranking shipped with the SmolLM2 head."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

import eaglespec
from eaglespec.models.eagle import RANKING_FILE, check_ranking, load_token_ranking, save_token_ranking
from eaglespec.models.loading import default_model_path, open_checkpoint
from eaglespec.tokenizer import Tokenizer
from eaglespec.train.data import _pack, _save_shard
from eaglespec.train.token_ranking import count_prepared_replies, count_text_replies, rank_tokens, reply_token_ids

SHIPPED_HEAD = os.path.join(os.path.dirname(eaglespec.__file__), "assets", "smollm2-eagle")


def test_rank_tokens_most_frequent_first_ties_by_id():
    counts = torch.tensor([3, 0, 7, 3, 0, 9, 3])
    ranked = rank_tokens(counts)
    assert ranked.dtype == torch.int32
    assert ranked.tolist() == [5, 2, 0, 3, 6, 1, 4]
    with pytest.raises(ValueError, match="integers"):
        rank_tokens(counts.float())


class WordTokenizer:
    """Words -> ids by a fixed table; the chat template is the user text plus a 2-word header."""

    chat_template = "test"

    def __init__(self, words):
        self.ids = {w: i for i, w in enumerate(words)}

    def encode(self, text):
        return [self.ids[w] for w in text.split()]

    def apply_chat_template(self, messages, add_generation_prompt=True):
        return "user says " + " ".join(m["content"] for m in messages)


def test_reply_tokens_are_first_replies_cut_and_closed_by_the_end_token():
    words = ["<end>", "user", "says", "a", "b", "c", "d"]
    tok = WordTokenizer(words)
    records = [
        {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b c"},
                           {"from": "human", "value": "d"}, {"from": "gpt", "value": "d d"}]},
        {"conversations": [{"from": "gpt", "value": "a a"}]},  # no user turn first: skipped
        {"conversations": [{"from": "human", "value": "a b c d"}, {"from": "gpt", "value": "c"}]},  # long prompt
        {"messages": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "a b c d"}]},
    ]
    out = list(reply_token_ids(tok, records, end_ids=[0], max_prompt_tokens=5, max_reply_tokens=3))
    assert out == [[4, 5, 0], [3, 4, 5]]  # short reply closed by <end>; long one cut at 3, no <end>
    two = list(reply_token_ids(tok, records[:1], end_ids=[0], max_prompt_tokens=5, max_reply_tokens=3, turns=2))
    assert two == [[4, 5, 0], [6, 6, 0]]


def test_count_text_replies_from_a_json_file(tmp_path):
    words = ["<end>", "user", "says", "a", "b", "c", "d"]
    path = tmp_path / "convs.json"
    records = [{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": f"b {w}"}]}
               for w in ("c", "c", "d", "a")]
    path.write_text(json.dumps(records))
    counts, summary = count_text_replies(WordTokenizer(words), str(path), 1, 4, len(words), end_ids=[0],
                                         progress=False)
    assert counts.tolist() == [3, 0, 0, 1, 3, 1, 1]  # records 1..3: "b c", "b d", "b a", each + <end>
    assert summary["replies"] == 3 and summary["tokens"] == 9
    assert rank_tokens(counts).tolist()[:2] == [0, 4]


def test_count_prepared_replies_counts_only_loss_masked_tokens(tmp_path):
    seqs = [([5, 1, 2, 2], [0, 0, 1, 1]), ([3, 4, 0], [0, 1, 1])]
    _save_shard(str(tmp_path / "shard_00000.safetensors"), _pack(seqs), {})
    manifest = {"format": "eaglespec-distill-v1", "settings": {}, "shards": [{"file": "shard_00000.safetensors"}]}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    counts, summary = count_prepared_replies(str(tmp_path), 6, progress=False)
    assert counts.tolist() == [1, 0, 2, 0, 1, 0]
    assert summary["sequences"] == 2
    # Several directories, as training joins them, count together.
    twice, summary = count_prepared_replies(f"{tmp_path};{tmp_path}", 6, progress=False)
    assert twice.tolist() == (2 * counts).tolist() and summary["sequences"] == 4


def test_ranking_file_round_trip_and_bad_files(tmp_path):
    ranked = rank_tokens(torch.tensor([1, 5, 2, 0, 4]))
    path = save_token_ranking(str(tmp_path), ranked, {"data": "test", "tokens": 12})
    assert os.path.basename(path) == RANKING_FILE
    assert torch.equal(load_token_ranking(str(tmp_path), 5), ranked)
    assert load_token_ranking(str(tmp_path / "nothing"), 5) is None
    with pytest.raises(ValueError, match=r"shape \(6,\)"):
        load_token_ranking(str(tmp_path), 6)
    save_file({"ranked_ids": torch.tensor([0, 1, 1, 3, 4], dtype=torch.int32)}, path)
    with pytest.raises(ValueError, match="exactly once"):
        load_token_ranking(str(tmp_path), 5)
    save_file({"other": torch.arange(5, dtype=torch.int32)}, path)
    with pytest.raises(ValueError, match="no tensor 'ranked_ids'"):
        load_token_ranking(str(tmp_path), 5)
    with open(path, "wb") as f:
        f.write(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        load_token_ranking(str(tmp_path), 5)
    with pytest.raises(ValueError, match="int32 or int64"):
        check_ranking(torch.arange(5.0), 5, "x")


def test_the_shipped_head_has_a_ranking_of_its_reply_tokens():
    ranked = load_token_ranking(SHIPPED_HEAD, 49152)
    assert ranked is not None and ranked.dtype == torch.int32
    assert os.path.getsize(os.path.join(SHIPPED_HEAD, RANKING_FILE)) < 256 * 1024
    assert 2 in ranked[:64].tolist()  # <|im_end|> closes (almost) every reply
    ckpt = open_checkpoint(default_model_path(), progress=False)  # metadata only: the vocabulary
    tokenizer = Tokenizer.from_source(ckpt.tokenizer_source)
    top10 = {tokenizer.id_to_token(int(i)) for i in ranked[:10]}
    assert {"\u010a", ".", ",", "\u0120the", "\u0120and"} <= top10, top10  # newline, ., ",", " the", " and"
