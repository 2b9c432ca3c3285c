"""Which target tokens a draft head should score: reply tokens ranked by frequency.

A head can draft over the N most frequent target tokens only (FR-Spec; EAGLE-3's d2t): its
output projection shrinks to those N rows. The ranking ships beside the head's weights as

  token_ranking.safetensors   ranked_ids int32 [V]: every target id, most frequent first
                              (equal counts: lower id first), metadata: where the counts came from

and is counted over what the head learns to predict: the target's replies. From self-distilled
data (``eaglespec train prepare``) that is every loss-masked token; without it, the assistant
replies of the conversations, tokenized as the target would emit them (cut at the reply budget,
closed by the end-of-turn token when shorter).

The file is read and written by ``eaglespec.models.eagle`` (``load_token_ranking``,
``save_token_ranking``). ``python -m eaglespec.train.token_ranking --head DIR [--data-dir DIR | --source sharegpt ...]``
(also ``eaglespec train rank-tokens``) writes the file into a head directory.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Sequence

import torch

from eaglespec.models.eagle import save_token_ranking


def rank_tokens(counts: torch.Tensor) -> torch.Tensor:
    """counts [V] -> [V] int32 token ids, most frequent first; equal counts keep id order."""
    if counts.dim() != 1 or counts.numel() == 0:
        raise ValueError(f"rank_tokens: counts must be a non-empty [vocab] tensor, got shape {tuple(counts.shape)}")
    if counts.dtype.is_floating_point or counts.dtype == torch.bool:
        raise ValueError(f"rank_tokens: counts must be integers, got {counts.dtype}")
    return torch.sort(-counts.long(), stable=True).indices.to(torch.int32)


def count_prepared_replies(data_dir: str, vocab_size: int, progress: bool = True) -> tuple[torch.Tensor, dict]:
    """Counts [V] int64 of the loss-masked (reply) tokens of self-distilled data (one directory, or
    several joined by ';', as training reads them), and a summary."""
    from tqdm.auto import tqdm

    from eaglespec.train.data import load_prepared_shard, prepared_shard_paths

    paths = prepared_shard_paths(data_dir)
    counts = torch.zeros(vocab_size, dtype=torch.int64)
    sequences = 0
    for tensors in tqdm(map(load_prepared_shard, paths), total=len(paths), desc="counting reply tokens",
                        unit="shard", disable=not progress):
        replies = tensors["tokens"][tensors["loss_mask"].bool()].long()
        _check_ids(replies, vocab_size, data_dir)
        counts += torch.bincount(replies, minlength=vocab_size)
        sequences += tensors["offsets"].numel() - 1
    return counts, {"data": f"self-distilled replies in {data_dir}", "sequences": sequences}


def reply_token_ids(tokenizer, conversations: Iterable[dict], end_ids: Sequence[int], max_prompt_tokens: int,
                    max_reply_tokens: int, turns: int = 1):
    """Token ids of each conversation's first ``turns`` assistant replies, as the target emits
    them: cut at ``max_reply_tokens``, closed by ``end_ids[0]`` when shorter. A conversation is
    skipped when its first prompt (chat template applied) is longer than ``max_prompt_tokens``,
    as self-distillation skips it. Yields one list per reply."""
    for record in conversations:
        messages = record.get("conversations", record.get("messages")) if isinstance(record, dict) else None
        if not isinstance(messages, list):
            continue
        pairs, user = [], None  # (user turn, the assistant reply that answers it)
        for m in messages:
            if not isinstance(m, dict):
                continue
            who, text = m.get("from", m.get("role")), m.get("value", m.get("content"))
            if not isinstance(text, str):
                continue
            if who in ("human", "user"):
                user = text
            elif who in ("gpt", "assistant") and user is not None:
                pairs.append((user, text))
                user = None
        if not pairs:
            continue
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": pairs[0][0]}], add_generation_prompt=True)
        if len(tokenizer.encode(prompt)) > max_prompt_tokens:
            continue
        for _, reply in pairs[:turns]:
            ids = tokenizer.encode(reply)[:max_reply_tokens]
            yield ids + ([end_ids[0]] if len(ids) < max_reply_tokens and end_ids else [])


def count_text_replies(tokenizer, source: str, start: int, stop: int, vocab_size: int, end_ids: Sequence[int],
                       max_prompt_tokens: int = 512, max_reply_tokens: int = 256, turns: int = 1,
                       progress: bool = True) -> tuple[torch.Tensor, dict]:
    """Counts [V] int64 of the assistant replies of conversations ``start <= i < stop`` of a
    ShareGPT-style source ("sharegpt" or a .json / .jsonl path), and a summary."""
    from tqdm.auto import tqdm

    from eaglespec.train.data import iter_jsonl, iter_sharegpt

    if source == "sharegpt" or source.endswith(".json"):
        records = iter_sharegpt(None if source == "sharegpt" else source, start, stop)
    elif source.endswith(".jsonl"):
        records = iter_jsonl(source, start, stop)
    else:
        raise ValueError(f"count_text_replies: source must be 'sharegpt', a .json or a .jsonl file, got {source!r}")
    counts = torch.zeros(vocab_size, dtype=torch.int64)
    replies = tokens = 0
    bar = tqdm(records, total=stop - start, desc="counting reply tokens", unit="conv", disable=not progress)
    for ids in reply_token_ids(tokenizer, bar, end_ids, max_prompt_tokens, max_reply_tokens, turns):
        t = torch.tensor(ids, dtype=torch.int64)
        _check_ids(t, vocab_size, source)
        counts += torch.bincount(t, minlength=vocab_size)
        replies += 1
        tokens += len(ids)
    bar.close()
    data = (f"{source} conversations {start}..{stop - 1}: first {turns} assistant repl{'y' if turns == 1 else 'ies'}, "
            f"tokenized, cut at {max_reply_tokens} tokens (prompts over {max_prompt_tokens} tokens skipped)")
    return counts, {"data": data, "replies": replies, "tokens": tokens}


def _check_ids(ids: torch.Tensor, vocab_size: int, source: str) -> None:
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(f"{source}: token ids outside the target vocabulary [0, {vocab_size})")


# ---------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--head", required=True, help="head directory the ranking is written into")
    p.add_argument("--model", default=None, help="target (HF directory or .gguf; default: embedded SmolLM2-135M)")
    p.add_argument("--data-dir", default=None, help="self-distilled data (train prepare; several directories "
                   "joined by ';'): count its reply tokens")
    p.add_argument("--source", default="sharegpt", help="without --data-dir: sharegpt | a .json / .jsonl file")
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--stop", type=int, default=16000)
    p.add_argument("--max-prompt-tokens", type=int, default=512)
    p.add_argument("--max-reply-tokens", type=int, default=256)
    p.add_argument("--turns", type=int, default=1)


def run(args: argparse.Namespace) -> dict:
    from eaglespec.models.loading import default_model_path, open_checkpoint
    from eaglespec.tokenizer import Tokenizer

    if args.start < 0 or args.stop <= args.start:
        raise ValueError(f"--start/--stop: need 0 <= start < stop, got {args.start}..{args.stop}")
    for name in ("max_prompt_tokens", "max_reply_tokens", "turns"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    ckpt = open_checkpoint(args.model or default_model_path(), progress=False)  # metadata only, no weights read
    vocab = ckpt.config.vocab_size
    if args.data_dir:
        counts, summary = count_prepared_replies(args.data_dir, vocab)
    else:
        tokenizer = Tokenizer.from_source(ckpt.tokenizer_source)
        if ckpt.chat_template and not tokenizer.chat_template:
            tokenizer.chat_template = ckpt.chat_template
        counts, summary = count_text_replies(tokenizer, args.source, args.start, args.stop, vocab,
                                             ckpt.generation_eos_ids, args.max_prompt_tokens,
                                             args.max_reply_tokens, args.turns)
    ranked = rank_tokens(counts)
    summary.update(counted_tokens=int(counts.sum()), distinct_tokens=int((counts > 0).sum()),
                   target=os.path.basename(ckpt.path))
    path = save_token_ranking(args.head, ranked, summary)
    summary["file"] = path
    for n in (4096, 8192, 16384, 32768):
        if n < vocab:
            summary[f"coverage_top_{n}"] = round(float(counts[ranked[:n].long()].sum()) / max(int(counts.sum()), 1), 5)
    print(json.dumps(summary))
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    run(p.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
