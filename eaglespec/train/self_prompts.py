"""User prompts written by the target itself (the Magpie idea), a training source for draft heads.

Given its chat template up to where a user's words begin, an instruction-tuned model writes a
user request of the kinds it was tuned on; answered by the same model (``prepare``), each gives a
sequence of the target's own outputs on its own kinds of request. ShareGPT, the other source, is
far from MT-bench's kinds (design note 63); these prompts are nearer.

Requests are sampled one seed per draw (half begun with an opener of a common task kind), in
rounds until ``count`` pass the filter (``problem``); the kept prompts, in draw order, go to a
JSON-lines file (``{"prompt": ..., "draw": i}``) that ``load_conversations`` reads, with a summary
beside it (``<file>.summary.json``: draws, kept, rejections by reason). A file already holding
``count`` prompts from the same settings is reused, so a resumed data run answers the same prompts.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass

from eaglespec.config import SamplingParams
from eaglespec.train.data import ReplyQueue, iter_jsonl

SELF_PROMPTS = "self-prompts.jsonl"  # the file's name in a data directory (data.source = "self")
# Stands for the user's words when the chat template is rendered, to find where they begin.
_USER_TEXT = "@@eaglespec-user-text@@"
# Seeds of draw i: seed * _SEED_STRIDE + i (replies use other seeds, data.py's).
_SEED_STRIDE = 1_000_033
_TEMPLATE_TEXT = re.compile(r"<\|im_(start|end)\|>|<\|(begin|end)_of_text\|>|<\|eot_id\|>|<\|start_header_id\|>")


@dataclass(slots=True)
class SelfPromptSettings:
    """What decides the prompts written; a file written with other settings is not reused."""

    count: int
    seed: int = 0
    temperature: float = 0.8  # 1.0 gave more broken text from the 135M model, on the CPU
    top_p: float = 0.95
    max_tokens: int = 128  # a request longer than this is cut off, and dropped
    min_words: int = 4
    # Draw i's request begins with openers[i % len(openers)] ("": the model's own first word):
    # left alone, the model asks mostly for advice and explanations; openers of common task
    # kinds (writing, role play, problems, code, extraction) widen what it asks.
    openers: tuple[str, ...] = ("", "Write", "", "Solve", "", "Write a Python function", "", "Imagine you are",
                                "", "Extract", "", "Explain", "", "Compose", "", "Given")


def user_turn_prefix(tokenizer) -> list[int]:
    """Token ids of the chat template up to where a user's first turn begins (the template's
    default system turn included, as every reply's prompt has it)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": _USER_TEXT}], add_generation_prompt=False)
    if _USER_TEXT not in text:
        raise ValueError("self prompts: the chat template does not show the user's text; it cannot be asked "
                         "for a user turn")
    return tokenizer.encode(text[:text.index(_USER_TEXT)])


def problem(text: str, ended: bool, settings: SelfPromptSettings) -> str | None:
    """Why a written request is not kept, or None: cut off, too short, template tokens in it,
    mostly not words, or a line or phrase said over and over (the failure modes of sampled text)."""
    if not ended:
        return "cut_off"
    words = text.split()
    if len(words) < settings.min_words:
        return "too_short"
    if _TEMPLATE_TEXT.search(text):
        return "template_text"
    if sum(c.isalpha() for c in text) < 0.5 * sum(not c.isspace() for c in text):
        return "not_words"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if len(lines) - len(set(lines)) >= 2:
        return "repeated_lines"
    trigrams = [tuple(w.lower() for w in words[i:i + 3]) for i in range(len(words) - 2)]
    if len(trigrams) >= 12 and len(set(trigrams)) < 0.6 * len(trigrams):
        return "repeated_words"
    return None


def _normal(text: str) -> str:
    return " ".join(text.lower().split())


def _read(path: str, settings: SelfPromptSettings) -> list[str] | None:
    """The prompts of a file written with these settings, or None."""
    summary_path = path + ".summary.json"
    if not (os.path.isfile(path) and os.path.isfile(summary_path)):
        return None
    with open(summary_path) as f:
        if json.load(f).get("settings") != json.loads(json.dumps(asdict(settings))):  # tuples read back as lists
            return None
    prompts = [r["prompt"] for r in iter_jsonl(path)]
    return prompts if len(prompts) == settings.count else None


def write_self_prompts(llm, path: str, settings: SelfPromptSettings, progress: bool = True) -> list[str]:
    """``settings.count`` user requests written by ``llm``'s target, kept by ``problem`` and
    without duplicates, saved to ``path`` (JSON lines) and returned in draw order."""
    if settings.count < 1 or settings.max_tokens < 1:
        raise ValueError(f"self prompts: count and max_tokens must be >= 1, got {settings.count} and "
                         f"{settings.max_tokens}")
    if llm.tokenizer is None:
        raise ValueError("self prompts: the target needs a tokenizer (and a chat template)")
    existing = _read(path, settings)
    if existing is not None:
        return existing
    prefix = user_turn_prefix(llm.tokenizer)
    openers = [llm.tokenizer.encode(o) for o in settings.openers] or [[]]
    eos = set(llm.eos_ids)
    kept: list[tuple[int, str]] = []
    seen: set[str] = set()
    rejected: dict[str, int] = {}
    draws, started = 0, time.perf_counter()
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=settings.count, desc="self prompts", unit="prompt")
    while len(kept) < settings.count:
        if draws > 20 * settings.count + 100:
            raise ValueError(f"self prompts: only {len(kept)} of {draws} written requests passed the filter "
                             f"({rejected}); is the target an instruction-tuned chat model?")
        # A round asks for what is missing plus a margin for the ones the filter drops.
        wanted = settings.count - len(kept)
        first = draws
        draws += wanted + wanted // 2 + 8
        queue = ReplyQueue(llm)
        for i in range(first, draws):
            params = SamplingParams(temperature=settings.temperature, top_p=settings.top_p,
                                    max_tokens=settings.max_tokens, seed=settings.seed * _SEED_STRIDE + i,
                                    detokenize=False)
            queue.put(i, prefix + openers[i % len(openers)], params)
        answers = []
        while queue:
            answers += queue.finished()
        for i, ids in sorted(answers):
            if len(kept) == settings.count:
                break
            ended = bool(ids) and ids[-1] in eos
            text = llm.tokenizer.decode(openers[i % len(openers)] + [t for t in ids if t not in eos]).strip()
            reason = problem(text, ended, settings)
            if reason is None and _normal(text) in seen:
                reason = "duplicate"
            if reason is not None:
                rejected[reason] = rejected.get(reason, 0) + 1
                continue
            seen.add(_normal(text))
            kept.append((i, text))
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for i, text in kept:
            f.write(json.dumps({"prompt": text, "draw": i}, ensure_ascii=False) + "\n")
    summary = {"settings": asdict(settings), "draws": kept[-1][0] + 1, "kept": len(kept), "rejected": rejected,
               "seconds": round(time.perf_counter() - started, 2)}
    with open(path + ".summary.json", "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(path + ".tmp", path)  # last: a whole file means a whole run
    return [text for _, text in kept]
