"""LLM's arguments: the shipped head attaches to the embedded model however it is named; a tree
without a head is an error; tree and draft arguments fail before any weight is read; a model
without tokenizer.json serves token ids; ``python -m eaglespec`` runs the CLI."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from eaglespec.config import SamplingParams, SpecConfig
from eaglespec.engine import llm as llm_module
from eaglespec.engine.llm import LLM, check_speculation_args, is_default_model, shipped_head_path
from eaglespec.models import loading
from tests.conftest import random_model, small_engine
from tests.models.test_loading import random_tensors, tiny_config, write_hf_dir
from tests.speculative.test_speculative_greedy import eagle1_head, predictable_target


@pytest.fixture
def no_loading(monkeypatch):
    """Any attempt to read a checkpoint fails the test: the error must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint was opened before the arguments were checked")
    monkeypatch.setattr(loading, "open_checkpoint", refuse)


@pytest.fixture(scope="module")
def hf_dir_without_tokenizer(tmp_path_factory):
    cfg = tiny_config()
    return write_hf_dir(tmp_path_factory.mktemp("no_tok") / "m", cfg, random_tensors(cfg, dtype=torch.float32))


def test_a_tree_with_draft_none_is_refused_before_loading(no_loading):
    with pytest.raises(ValueError, match=r"a tree was given \(spec='chain:3' / --tree\) but draft='none' "
                                         r"\(--draft none\) turns speculation off"):
        LLM(draft="none", spec=SpecConfig(tree="chain:3"), device="cpu")
    with pytest.raises(ValueError, match=r"draft='none'"):
        LLM(draft="none", spec="dynamic:3,2,4", device="cpu")


def test_a_tree_without_any_head_is_refused_before_loading(no_loading, hf_dir_without_tokenizer):
    with pytest.raises(ValueError, match=r"there is no draft head for this model \(pass draft=PATH / --draft PATH\)"):
        LLM(model=hf_dir_without_tokenizer, spec="chain:2", device="cpu")
    with pytest.raises(ValueError, match=r"there is no draft head for this model"):
        LLM.from_model(random_model(tiny_config()), spec="chain:2", engine=small_engine())


@pytest.mark.parametrize("spec, error, message", [
    ("chain:1000", ValueError, r"chain length must be in \[1, 63\]"),
    ("dynamic:9,9,9", ValueError, r"DEPTH\*TOPK must be <= 64"),
    ("dynamic:0,2,3", ValueError, r"DEPTH, TOPK and NODES must be positive"),
    ("missing-choices.json", FileNotFoundError, r"missing-choices\.json"),
    ("bogus", ValueError, r"SpecConfig\.tree: a tree must be auto, chain:K"),
    (7, TypeError, r"spec must be a SpecConfig, a tree string or None, got int"),
])
def test_tree_errors_come_before_loading(no_loading, tmp_path, spec, error, message):
    head_dir = tmp_path / "head"
    head_dir.mkdir()
    with pytest.raises(error, match=message):
        LLM(model=str(tmp_path / "model"), draft=str(head_dir), spec=spec, device="cpu")


def test_draft_errors_come_before_loading(no_loading, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"draft head directory not found: '.*nowhere'"):
        LLM(model=str(tmp_path), draft=str(tmp_path / "nowhere"), device="cpu")
    with pytest.raises(TypeError, match=r"draft must be a draft-head directory, 'none' or None, got int"):
        LLM(model=str(tmp_path), draft=3, device="cpu")
    with pytest.raises(TypeError, match=r"model must be a path .* or None, got int"):
        LLM(model=5, device="cpu")


def test_cli_reports_tree_with_draft_none_at_once(no_loading, capsys):
    from eaglespec.cli import main

    assert main(["generate", "hello", "--draft", "none", "--tree", "chain:3"]) == 2
    assert "draft='none' (--draft none) turns speculation off" in capsys.readouterr().err


def test_from_model_with_head_and_tree_still_works():
    target = predictable_target(seed=3)
    llm = LLM.from_model(target, draft=eagle1_head(target, seed=1), spec="chain:2", engine=small_engine())
    assert llm.speculative is not None and llm.spec_config.tree == "chain:2"
    assert len(llm.generate([[1, 2, 3]], SamplingParams(max_tokens=5, ignore_eos=True))[0].token_ids) == 5


def test_embedded_model_named_explicitly_gets_the_shipped_head(tmp_path):
    path = loading.default_model_path()  # the package is a dependency: no skip
    if shipped_head_path() is None:
        pytest.skip("this install carries no shipped head")
    link = tmp_path / "same.gguf"
    link.symlink_to(path)
    assert is_default_model(path) and is_default_model(str(link)) and not is_default_model(str(tmp_path))
    assert check_speculation_args(None, "chain:3", default_draft=True).tree == "chain:3"
    explicit = LLM(model=path, device="cpu", dtype="float32", engine=small_engine(max_model_len=512))
    assert explicit.speculative is not None
    assert explicit.spec_config == SpecConfig()  # tree="auto", as with no model named
    shipped = llm_module.load_head(shipped_head_path(), explicit.model)
    assert torch.equal(explicit.speculative.head.fc.weight, shipped.fc.weight)


def test_model_without_tokenizer_json_serves_token_ids(hf_dir_without_tokenizer):
    assert not os.path.exists(os.path.join(hf_dir_without_tokenizer, "tokenizer.json"))
    llm = LLM(model=hf_dir_without_tokenizer, draft="none", device="cpu", dtype="float32", engine=small_engine())
    out = llm.generate([[3, 1, 4, 1, 5]], SamplingParams(max_tokens=4, ignore_eos=True))[0]
    assert len(out.token_ids) == 4
    with pytest.raises(ValueError, match=r"prompts\[0\] is text but this model has no tokenizer "
                                         r"\(.*tokenizer\.json not found.*\): give it as a list of token ids"):
        llm.generate("hello", SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match=r"chat needs a tokenizer, and this model has none \(.*tokenizer\.json"):
        llm.chat([{"role": "user", "content": "hi"}])
    assert not llm.has_work


def test_python_dash_m_eaglespec_runs_the_cli():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run([sys.executable, "-m", "eaglespec", "--help"], capture_output=True, text=True,
                          cwd=root, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "usage: eaglespec" in done.stdout and "generate" in done.stdout
    bad = subprocess.run([sys.executable, "-m", "eaglespec", "generate", "hi", "--draft", "none", "--tree",
                          "chain:3"], capture_output=True, text=True, cwd=root, env=env, timeout=300)
    assert bad.returncode == 2 and "turns speculation off" in bad.stderr


def test_spec_config_tree_must_be_a_string():
    with pytest.raises(TypeError, match=r"SpecConfig\.tree must be a string .*got int"):
        SpecConfig(tree=3)
