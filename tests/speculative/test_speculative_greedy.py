"""Greedy speculative decoding emits exactly the greedy autoregressive tokens (fp32)."""

from __future__ import annotations

import json

import pytest
import torch

from eaglespec.config import LlamaConfig, SamplingParams, SpecConfig
from eaglespec.engine.llm import LLM
from eaglespec.models.eagle import EagleConfig, build_head
from eaglespec.speculative.drafter import Drafter
from eaglespec.train.token_ranking import rank_tokens
from tests.conftest import needs_triton_kernels, random_model, small_engine, tiny_config


def predictable_target(seed: int):
    """A random model whose next token depends mostly on the current one (weak attention and
    MLP), so a head that reads the current token's embedding is often right: acceptance is high
    but not perfect, and every acceptance length gets exercised."""
    model = random_model(tiny_config(vocab_size=61), seed=seed)
    with torch.no_grad():
        model.model.norm.weight.fill_(1.0)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(0.03)
            layer.mlp.down_proj.weight.mul_(0.03)
    return model


def eagle1_head(target, seed: int, layers: int = 1, oracle: bool = True):
    cfg = target.config
    layer_cfg = LlamaConfig(**{**{f: getattr(cfg, f) for f in cfg.__slots__}, "num_layers": layers,
                               "eagle3_layers": ()})
    head = build_head(EagleConfig("eagle1", layer_cfg), target)
    head.init_random(seed=seed, std=0.05)
    if oracle:
        with torch.no_grad():
            h = cfg.hidden_size
            head.fc.weight.zero_()
            head.fc.weight[:, :h] = torch.eye(h)  # read the token embedding, ignore the feature
            for layer in head.layers:
                layer.self_attn.o_proj.weight.mul_(0.1)
                layer.mlp.down_proj.weight.mul_(0.1)
    return head


def eagle3_head(target, seed: int, draft_vocab: int = 40):
    cfg = target.config
    layer_cfg = LlamaConfig(**{**{f: getattr(cfg, f) for f in cfg.__slots__}, "num_layers": 1,
                               "eagle3_layers": ()})
    head = build_head(EagleConfig("eagle3", layer_cfg, draft_vocab_size=draft_vocab), target)
    head.init_random(seed=seed, std=0.05)
    with torch.no_grad():  # a draft vocabulary of a random subset of target tokens
        ids = torch.randperm(cfg.vocab_size, generator=torch.Generator().manual_seed(seed))[:draft_vocab].sort().values
        head.d2t.copy_(ids - torch.arange(draft_vocab))
        head.t2d.zero_()
        head.t2d[ids] = True
    return head


def _prompts(vocab, lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


TREES = ["chain:3", "dynamic:3,3,8", "dynamic:4,4,12", "static"]


def _tree(spec, tmp_path):
    if spec != "static":
        return spec
    path = tmp_path / "choices.json"
    path.write_text(json.dumps([[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 0, 1], [0, 1, 0]]))
    return str(path)


def head_of_kind(target, kind: str, seed: int):
    """eagle1 (oracle-ish) or eagle3."""
    if kind == "eagle3":
        return eagle3_head(target, seed=seed)
    return eagle1_head(target, seed=seed)


@pytest.mark.parametrize("tree", TREES)
@pytest.mark.parametrize("kind", ["eagle1", "eagle3"])
def test_greedy_speculative_equals_autoregressive(tree, kind, tmp_path):
    target = predictable_target(seed=21)
    head = head_of_kind(target, kind, seed=5)
    prompts = _prompts(target.config.vocab_size, [7, 1, 26, 13, 40, 3, 19, 33], seed=3)
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    plain = LLM.from_model(target, engine=small_engine(max_batch_size=8)).generate(prompts, params)
    spec = LLM.from_model(target, draft=head, spec=SpecConfig(tree=_tree(tree, tmp_path)),
                          engine=small_engine(max_batch_size=8))
    for batch in (prompts[:1], prompts):
        outs = spec.generate(batch, params)
        for out, ref in zip(outs, plain):
            assert out.token_ids == ref.token_ids
            assert out.stats["target_forwards"] <= len(out.token_ids)
    if kind == "eagle1":  # the oracle-ish head must really be accepted, or this test proves little
        taus = [o.stats["tau"] for o in outs]
        assert sum(taus) / len(taus) > 1.5, taus


def test_multilayer_dense_draft_is_exact():
    target = predictable_target(seed=22)
    head = eagle1_head(target, seed=6, layers=3)
    prompts = _prompts(target.config.vocab_size, [11, 4, 29], seed=4)
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    plain = LLM.from_model(target, engine=small_engine()).generate(prompts, params)
    spec = LLM.from_model(target, draft=head, spec=SpecConfig(tree="dynamic:3,2,6"),
                          engine=small_engine()).generate(prompts, params)
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain]
    assert all(len(o.stats["accept_rate_per_depth"]) == 3 for o in spec)


def test_speculative_sampling_runs_reproducibly():
    target = predictable_target(seed=23)
    head = eagle1_head(target, seed=7)
    prompts = _prompts(target.config.vocab_size, [9, 15], seed=5)
    params = SamplingParams(temperature=0.8, top_k=20, max_tokens=16, seed=7, ignore_eos=True)
    llm = LLM.from_model(target, draft=head, spec=SpecConfig(tree="dynamic:3,3,8"), engine=small_engine())
    a = llm.generate(prompts, params)
    b = llm.generate(prompts, params)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert all(len(o.token_ids) == 16 and all(0 <= t < 61 for t in o.token_ids) for o in a)


@needs_triton_kernels
def test_triton_kernels_in_the_engine_match_plain_decoding():
    """The same exactness with every attention op on its Triton kernel (prefill, decode,
    two-pass tree attention), as the GPU path runs it."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    target = predictable_target(seed=24).to(device)
    prompts = _prompts(target.config.vocab_size, [21, 6], seed=6)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    plain = LLM.from_model(target, engine=small_engine()).generate(prompts, params)
    engine = small_engine(attention_backend="triton")
    plain_triton = LLM.from_model(target, engine=engine).generate(prompts, params)
    assert [o.token_ids for o in plain_triton] == [o.token_ids for o in plain]
    spec = LLM.from_model(target, draft=eagle1_head(target, seed=8), spec=SpecConfig(tree="dynamic:3,3,8"),
                          engine=engine)
    assert [o.token_ids for o in spec.generate(prompts, params)] == [o.token_ids for o in plain]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graphs_of_prefill_and_steps_match_eager_plain_decoding():
    """Every prefill (padded to its token bucket) and every step replayed from a CUDA graph, plain
    and speculative, greedy: the tokens of eager plain decoding, prompts of one to three buckets
    and a prompt longer than the graphs take (run eagerly) included."""
    target = predictable_target(seed=25).to("cuda")
    prompts = _prompts(target.config.vocab_size, [21, 6, 40, 1, 70], seed=7)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    plain = LLM.from_model(target, engine=small_engine()).generate(prompts, params)
    graphs = small_engine(attention_backend="triton", use_cuda_graphs=True, prefill_graph_tokens=64)
    plain_graphs = LLM.from_model(target, engine=graphs)
    assert plain_graphs.runner.use_graphs and plain_graphs.runner.prefill_buckets == [16, 32, 64]
    spec = LLM.from_model(target, draft=eagle1_head(target, seed=8), spec=SpecConfig(tree="dynamic:3,3,8"),
                          engine=graphs)
    want = [o.token_ids for o in plain]
    for llm in (plain_graphs, spec):
        # Together (138 tokens: one eager prefill), then alone (buckets 32, 16, 64, 16, and eager).
        assert [o.token_ids for o in llm.generate(prompts, params)] == want
        assert [llm.generate([p], params)[0].token_ids for p in prompts] == want


@pytest.mark.parametrize("tree", TREES)
@pytest.mark.parametrize("kind", ["eagle1", "eagle3"])
def test_greedy_exact_with_a_reduced_draft_vocabulary(tree, kind, tmp_path, monkeypatch):
    """The draft scores only the N most frequent tokens of the target's replies: every drafted
    token is one of them, and the output is still the target's own greedy output."""
    target = predictable_target(seed=21)
    vocab = target.config.vocab_size
    prompts = _prompts(vocab, [7, 1, 26, 13, 40, 3, 19, 33], seed=3)
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    plain = LLM.from_model(target, engine=small_engine(max_batch_size=8)).generate(prompts, params)
    replies = torch.tensor([t for o in plain for t in o.token_ids])
    head = head_of_kind(target, kind, seed=5)
    head.set_token_ranking(rank_tokens(torch.bincount(replies, minlength=vocab)))
    size = 16 if kind == "eagle3" else 24  # of 61 target tokens; the EAGLE-3 head has 40 of its own
    allowed = set(head.draft_vocab(size).to_target.tolist())
    drafted = []
    build = Drafter.build

    def recording_build(self, *args):
        tree_batch = build(self, *args)
        drafted.append(tree_batch.tokens[:, 1:].reshape(-1))  # node 0 is the root (already emitted)
        return tree_batch

    monkeypatch.setattr(Drafter, "build", recording_build)
    spec = LLM.from_model(target, draft=head, spec=SpecConfig(tree=_tree(tree, tmp_path), draft_vocab_size=size),
                          engine=small_engine(max_batch_size=8))
    outs = spec.generate(prompts, params)
    assert [o.token_ids for o in outs] == [o.token_ids for o in plain]
    drafted = set(torch.cat(drafted).tolist())
    assert drafted <= allowed and len(drafted) > 4, (sorted(drafted - allowed), len(drafted))
    if kind == "eagle1":  # the most frequent tokens carry most of the acceptance
        taus = [o.stats["tau"] for o in outs]
        assert sum(taus) / len(taus) > 1.5, taus
