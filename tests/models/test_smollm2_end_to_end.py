"""The embedded default (SmolLM2-135M-Instruct, Q4_1 GGUF): logits against transformers' own
GGUF loader, a real chat answer, and the CLI's JSON output."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from eaglespec import LLM, SamplingParams
from eaglespec.models.loading import default_model_path

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def llm():
    return LLM(draft="none", device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def hf_model():
    """transformers' LlamaForCausalLM filled by transformers' GGUF reader (dequantize, un-permute,
    rename): what from_pretrained(gguf_file=...) does, without needing accelerate."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = default_model_path()
    parsed = load_gguf_checkpoint(path, return_tensors=False)["config"]
    cfg = transformers.LlamaConfig(**{k: v for k, v in parsed.items() if k not in ("model_type", "_model_name_or_path")})
    with torch.device("meta"):
        skeleton = transformers.LlamaForCausalLM(cfg)
    tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=skeleton)["tensors"]
    model = transformers.LlamaForCausalLM(cfg).eval()
    missing, unexpected = model.load_state_dict({k: torch.as_tensor(v).float() for k, v in tensors.items()},
                                                strict=False)
    assert not unexpected and all(m == "lm_head.weight" or "rotary" in m for m in missing)
    model.tie_weights()
    return model


PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a land far away,",
           "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n"]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_logits_match_transformers_gguf_loader(llm, hf_model, prompt):
    ids = llm.tokenizer.encode(prompt)
    ours = llm.logits(ids)
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits[0].float()
    # fp32 on both sides; the tolerance covers summation-order differences over 30 layers.
    assert (ours - ref).abs().max().item() < 2e-3
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_chat_answers_paris(llm):
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}], SamplingParams(max_tokens=24))
    assert "Paris" in out.text
    assert out.stats["new_tokens"] == len(out.token_ids) > 0


def test_cli_generate_json_answers_paris():
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    proc = subprocess.run([sys.executable, "-m", "eaglespec.cli", "generate", "--chat", "What is the capital of France?",
                           "--draft", "none", "--device", "cpu", "--max-tokens", "24", "--json"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "Paris" in record["text"]
    for key in ("token_ids", "tau", "accept_rate_per_depth", "target_forwards", "new_tokens", "ms_per_token"):
        assert key in record


def test_shipped_head_is_the_default_and_keeps_greedy_output_exact(llm):
    spec = LLM(device="cpu", dtype="float32")
    assert spec.speculative is not None, "LLM() must load the head shipped for the default model"
    params = SamplingParams(max_tokens=40)
    messages = [{"role": "user", "content": "Write two sentences about the moon."}]
    fast, plain = spec.chat(messages, params), llm.chat(messages, params)
    assert fast.token_ids == plain.token_ids
    # A trained head is accepted, not just run: over the speculative steps auto ran (each tree
    # is tried), many first drafts are right.
    assert sum(n for c, n in fast.stats["speculation"].items() if c != "plain") >= 1
    assert fast.stats["accept_rate_per_depth"][0] >= 0.2  # a random head: about 1 in 49,152


@pytest.mark.parametrize("tree", ["chain:3", "dynamic:3,3,8"])
def test_smollm2_with_a_random_head_keeps_greedy_output_exact(llm, tree):
    """A random head is (almost) never right: every step then rejects and the bonus token
    carries the output, which must still be exactly plain greedy decoding."""
    from eaglespec import SpecConfig
    from eaglespec.config import EngineConfig, LlamaConfig
    from eaglespec.models.eagle import EagleConfig, build_head

    cfg = llm.model.config
    layer = LlamaConfig(**{**{f: getattr(cfg, f) for f in cfg.__slots__}, "num_layers": 1, "eagle3_layers": ()})
    head = build_head(EagleConfig("eagle1", layer), llm.model)
    head.init_random(seed=3)
    spec = LLM.from_model(llm.model, tokenizer=llm.tokenizer, draft=head, spec=SpecConfig(tree=tree),
                          engine=EngineConfig(num_blocks=64, max_batch_size=4, max_model_len=512),
                          eos_ids=llm.eos_ids)
    prompts = ["The capital of France is", "List three colours of the rainbow, then explain why the sky is blue:"]
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    fast, plain = spec.generate(prompts, params), llm.generate(prompts, params)
    assert [o.token_ids for o in fast] == [o.token_ids for o in plain]
    assert all(o.stats["target_forwards"] >= 2 for o in fast)


def test_train_eval_writes_the_run_heads_measured_acceptance(llm, tmp_path):
    """`eaglespec train eval` on a run's own head leaves acceptance.json beside it (tree=auto's
    priors) with the rates it reported; evaluating a head named by --eval.head, or over another
    draft vocabulary than the head's, writes nothing there."""
    import shutil

    import eaglespec
    from eaglespec.models.eagle import load_acceptance
    from eaglespec.train.cli import LoadedTarget, load_config, run_eval

    shipped = os.path.join(os.path.dirname(eaglespec.__file__), "assets", "smollm2-eagle")
    shutil.copytree(shipped, tmp_path / "run" / "head")
    os.remove(tmp_path / "run" / "head" / "acceptance.json")
    questions = tmp_path / "questions.jsonl"
    questions.write_text("\n".join(json.dumps({"turns": [q]}) for q in ("Name three colours.", "What is 2 + 2?")))
    config = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "smollm2-eagle1.toml")
    overrides = {"train.out_dir": str(tmp_path / "run"), "eval.source": str(questions), "eval.stop": "2",
                 "eval.tree": "chain:2", "eval.max_tokens": "12", "eval.max_batch_size": "2", "eval.max_model_len": "256"}
    target = LoadedTarget(llm.model, llm.tokenizer, llm.eos_ids)
    report = run_eval(load_config(config, overrides), target)
    rates = report["results"]["chain:2"]["accept_rate_per_depth"]
    assert len(rates) == 2 and load_acceptance(str(tmp_path / "run" / "head")) == {"chain:2": rates}
    assert report["draft_vocab_size"] == 16384  # the shipped head's default
    with open(tmp_path / "run" / "head" / "acceptance.json") as f:
        assert json.load(f)["draft_vocab_size"] == 16384  # the rates hold for the vocabulary they were drafted over
    os.remove(tmp_path / "run" / "head" / "acceptance.json")
    # Over its 4 most frequent tokens the head drafts little that the target says.
    tiny = run_eval(load_config(config, {**overrides, "eval.draft_vocab_size": "4"}), target)
    assert tiny["draft_vocab_size"] == 4
    assert tiny["results"]["chain:2"]["tau"] < report["results"]["chain:2"]["tau"], (tiny, report)
    assert not os.path.exists(tmp_path / "run" / "head" / "acceptance.json")
    run_eval(load_config(config, {**overrides, "eval.head": str(tmp_path / "run" / "head")}), target)
    assert not os.path.exists(tmp_path / "run" / "head" / "acceptance.json")


def test_train_prepare_answers_requests_the_model_wrote_itself(llm, tmp_path):
    """``data.source = "self"``: SmolLM2 writes its own requests into the data directory, then
    answers them; conversations start <= i < stop of that file become the sequences."""
    from eaglespec.train.cli import LoadedTarget, load_config, run_prepare
    from eaglespec.train.data import load_prepared
    from eaglespec.train.self_prompts import SELF_PROMPTS

    config = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "smollm2-eagle1.toml")
    overrides = {"data.source": "self", "data.start": "1", "data.stop": "3", "data.dir": str(tmp_path / "self"),
                 "data.max_new_tokens": "4", "data.max_batch_size": "4", "data.max_model_len": "640"}
    summary = run_prepare(load_config(config, overrides), LoadedTarget(llm.model, llm.tokenizer, llm.eos_ids))
    with open(tmp_path / "self" / SELF_PROMPTS) as f:
        prompts = [json.loads(line)["prompt"] for line in f]
    assert len(prompts) == 3 and summary["conversations"] == 2
    data = load_prepared(str(tmp_path / "self"))
    for (tokens, mask), prompt in zip(data, prompts[1:]):
        asked = llm.tokenizer.encode(llm.tokenizer.apply_chat_template([{"role": "user", "content": prompt}]))
        assert tokens[:len(asked)].tolist() == asked and int(mask.sum()) >= 1
