"""Tokenizers for the target model: Hugging Face ``tokenizer.json``, GGUF vocabularies, Llama 3 tiktoken.

Every source ends as a ``tokenizers.Tokenizer`` (fast Rust encode/decode) wrapped in :class:`Tokenizer`,
which adds the chat template (rendered with jinja2 the way transformers renders it) and the ids
generation stops on. :class:`IncrementalDetokenizer` turns a stream of ids into text pieces.
"""

from __future__ import annotations

import base64
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

# ---------------------------------------------------------------------------------------------
# Pre-tokenizer split patterns. A byte-level BPE vocabulary only reproduces its training when the
# text is cut into words the same way, so each family's pattern is kept verbatim.
# ---------------------------------------------------------------------------------------------

LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Llama 3 special tokens in the order Meta's llama_models assigns them after the 128000 ranks.
LLAMA3_NAMED_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    "<|image|>",
)
LLAMA3_NUM_SPECIAL_TOKENS = 256

# Llama 3 chat format: a header per message, contents trimmed, each turn closed by <|eot_id|>.
LLAMA3_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{{- message['content'] | trim }}"
    "{{- '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{%- endif %}"
)

# llama.cpp token types (tokenizer.ggml.token_type).
_GGUF_NORMAL, _GGUF_UNKNOWN, _GGUF_CONTROL, _GGUF_USER_DEFINED, _GGUF_UNUSED, _GGUF_BYTE = 1, 2, 3, 4, 5, 6

_SPM_SPACE = "\u2581"  # SentencePiece's visible space


def byte_level_alphabet() -> list[str]:
    """The GPT-2 byte-to-character table: byte ``b`` is spelled ``table[b]``.

    Printable Latin-1 bytes stand for themselves; the rest (controls, space, ...) are moved to
    U+0100 and up, so that every byte string has a visible spelling with no whitespace in it.
    """
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = [""] * 256
    for b in printable:
        table[b] = chr(b)
    shifted = 0
    for b in range(256):
        if not table[b]:
            table[b] = chr(0x100 + shifted)
            shifted += 1
    return table


def _spell_bytes(data: bytes, table: list[str]) -> str:
    return "".join(table[b] for b in data)


def _bos_post_processor(bos_token: str, bos_id: int) -> processors.TemplateProcessing:
    # Adds BOS when encode(..., add_special_tokens=True); never on add_special_tokens=False.
    return processors.TemplateProcessing(
        single=f"{bos_token}:0 $A:0", pair=f"{bos_token}:0 $A:0 {bos_token}:1 $B:1",
        special_tokens=[(bos_token, bos_id)],
    )


# ---------------------------------------------------------------------------------------------
# Chat templates, rendered like transformers renders them.
# ---------------------------------------------------------------------------------------------

def _compile_chat_template(source: str):
    """A jinja2 template in the environment transformers gives chat templates.

    Sandboxed (templates come from model files, i.e. are untrusted), ``trim_blocks`` and
    ``lstrip_blocks`` on, loop controls, and the same helpers: ``raise_exception``,
    ``strftime_now``, and a ``tojson`` that keeps non-ASCII text and takes an ``indent``.
    """
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(jinja2.ext.Extension):
        # `{% generation %}...{% endgeneration %}` marks assistant text for training masks;
        # for rendering it is transparent.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

        def _render_body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as err:
        raise ValueError(f"chat template does not parse: {err} (line {err.lineno})") from err


def chat_messages(messages: Any) -> list[dict]:
    """A conversation checked and in the form chat templates expect.

    ``messages`` is a non-empty list of dicts, each with a non-empty string ``role`` and a
    ``content`` that is a string or, as in the OpenAI API, a list of text parts
    (``{"type": "text", "text": ...}``), which are joined with newlines. Other keys pass through.
    Anything else raises TypeError / ValueError naming the message and what was expected.
    """
    if not isinstance(messages, (list, tuple)):
        raise TypeError(f"messages must be a list of {{'role': ..., 'content': ...}} dicts, "
                        f"got {type(messages).__name__}")
    if not messages:
        raise ValueError("messages is empty: a conversation needs at least one message")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, Mapping):
            raise TypeError(f"{where} must be a dict with 'role' and 'content', got {type(message).__name__}")
        for key in ("role", "content"):
            if key not in message or message[key] is None:
                raise ValueError(f"{where} has no {key!r}: every message needs 'role' and 'content'")
        role, content = message["role"], message["content"]
        if not isinstance(role, str) or not role:
            raise TypeError(f"{where}['role'] must be a non-empty string such as 'user', got {role!r}")
        out.append({**message, "content": _content_text(content, f"{where}['content']")})
    return out


def _content_text(content: Any, where: str) -> str:
    """A message content as one string (OpenAI text parts joined by newlines)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, (list, tuple)):
        raise TypeError(f"{where} must be a string or a list of text parts, got {type(content).__name__}")
    if not content:
        raise ValueError(f"{where} is an empty list: give a string or at least one text part")
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
            raise ValueError(f"{where}[{j}] must be a text part {{'type': 'text', 'text': '...'}}, got {kind!r} "
                             f"(only text is supported)")
        texts.append(part["text"])
    return "\n".join(texts)


# ---------------------------------------------------------------------------------------------
# The tokenizer.
# ---------------------------------------------------------------------------------------------

def check_unicode(text: str, what: str) -> None:
    """Raise ValueError when ``text`` holds a lone surrogate: not Unicode text, so no tokenizer
    can encode it (Python keeps undecodable bytes of command-line arguments that way)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(text[exc.start])
        byte = f" (the undecodable byte 0x{code - 0xDC00:02x})" if 0xDC80 <= code <= 0xDCFF else ""
        raise ValueError(f"{what} is not valid Unicode text: lone surrogate U+{code:04X}{byte} at character "
                         f"{exc.start}; give UTF-8 text") from None


class Tokenizer:
    """Encode/decode text and render chat prompts for one model.

    ``backend`` does the work; its post-processor (if any) adds BOS when
    ``encode(..., add_special_tokens=True)``. ``eos_tokens`` are the tokens that end a turn.
    """

    def __init__(self, backend: tokenizers.Tokenizer, *, bos_token: str | None = None,
                 eos_tokens: Sequence[str] = (), chat_template: str | None = None,
                 unk_token: str | None = None, pad_token: str | None = None) -> None:
        self.backend = backend
        self.bos_token = bos_token
        self.eos_tokens = tuple(eos_tokens)
        self.unk_token = unk_token
        self.pad_token = pad_token
        self.chat_template = chat_template
        self._compiled_template = None
        for token in (bos_token, *self.eos_tokens):
            if token is not None and backend.token_to_id(token) is None:
                raise ValueError(f"special token {token!r} is not in the vocabulary")

    # -- basic properties ------------------------------------------------------------------

    @property
    def bos_id(self) -> int | None:
        return None if self.bos_token is None else self.backend.token_to_id(self.bos_token)

    @property
    def eos_ids(self) -> tuple[int, ...]:
        return tuple(self.backend.token_to_id(t) for t in self.eos_tokens)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    # -- encode / decode -------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; special-token strings in it become their ids.

        ``add_special_tokens`` adds what the tokenizer adds around a sequence (usually BOS).
        """
        if not isinstance(text, str):
            raise ValueError(f"encode expects a str, got {type(text).__name__}")
        check_unicode(text, "prompt")
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # -- chat ------------------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tokenize: bool = False, *, tools: list[dict] | None = None,
                            documents: list[dict] | None = None, **template_vars: Any) -> str | list[int]:
        """Render ``messages`` ([{"role": ..., "content": ...}, ...]) with the chat template.

        Same variables as transformers: ``messages``, ``tools``, ``documents``,
        ``add_generation_prompt``, the special-token strings (``bos_token``, ``eos_token``, ...)
        and any extra keyword. ``tokenize=True`` returns ids (no BOS added: templates write it).
        """
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template; pass one in the model files or "
                             "format the prompt yourself")
        if self._compiled_template is None:
            self._compiled_template = _compile_chat_template(self.chat_template)
        chat = []
        for message in messages:
            if not isinstance(message, Mapping):
                raise ValueError(f"chat messages must be dicts, got {message!r}")
            # Keys set to None are dropped, as transformers does (templates test for presence).
            chat.append({key: value for key, value in message.items() if value is not None})
        variables = {name: value for name, value in (("bos_token", self.bos_token),
                                                     ("eos_token", self.eos_tokens[0] if self.eos_tokens else None),
                                                     ("unk_token", self.unk_token),
                                                     ("pad_token", self.pad_token)) if value is not None}
        variables.update(template_vars)
        text = self._compiled_template.render(messages=chat, tools=tools, documents=documents,
                                              add_generation_prompt=add_generation_prompt, **variables)
        return self.encode(text, add_special_tokens=False) if tokenize else text

    # -- constructors ----------------------------------------------------------------------

    @classmethod
    def from_source(cls, source: Any) -> "Tokenizer":
        """Build from whatever ``LoadedCheckpoint.tokenizer_source`` holds.

        Accepted: a :class:`Tokenizer` (returned as is); a ``tokenizers.Tokenizer``; a dict of GGUF
        ``tokenizer.*`` metadata or a ``gguf.GGUFReader``; a path to a Hugging Face directory, a
        ``tokenizer.json``, a ``.gguf`` file or a tiktoken ``tokenizer.model``.
        """
        if isinstance(source, Tokenizer):
            return source
        if isinstance(source, tokenizers.Tokenizer):
            return cls(source)
        if isinstance(source, Mapping) or (hasattr(source, "fields") and hasattr(source, "tensors")):
            return cls.from_gguf_metadata(source)
        if isinstance(source, (str, os.PathLike)):
            path = os.fspath(source)
            if os.path.isdir(path):
                return cls.from_hf_dir(path)
            if not os.path.exists(path):
                raise FileNotFoundError(f"tokenizer source not found: {path}")
            if path.endswith(".gguf"):
                from gguf import GGUFReader
                return cls.from_gguf_metadata(GGUFReader(path))
            if path.endswith(".json"):
                return cls(tokenizers.Tokenizer.from_file(path))
            return cls.from_tiktoken(path)
        raise ValueError(f"cannot build a tokenizer from {type(source).__name__}")

    @classmethod
    def from_hf_dir(cls, path: str) -> "Tokenizer":
        """A Hugging Face model directory: ``tokenizer.json`` + ``tokenizer_config.json``."""
        tokenizer_file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tokenizer_file):
            raise FileNotFoundError(f"{tokenizer_file} not found (eaglespec needs the fast-tokenizer "
                                    "file; save it with transformers' tokenizer.save_pretrained)")
        try:
            backend = tokenizers.Tokenizer.from_file(tokenizer_file)
        except Exception as err:
            raise ValueError(f"{tokenizer_file}: cannot read tokenizer ({err})") from err
        config = {}
        config_file = os.path.join(path, "tokenizer_config.json")
        if os.path.isfile(config_file):
            with open(config_file, encoding="utf-8") as f:
                config = json.load(f)

        def token_text(value):
            return value.get("content") if isinstance(value, dict) else value

        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: use "default"
            named = {entry.get("name"): entry.get("template") for entry in template}
            template = named.get("default")
        jinja_file = os.path.join(path, "chat_template.jinja")
        if os.path.isfile(jinja_file):
            with open(jinja_file, encoding="utf-8") as f:
                template = f.read()
        eos = token_text(config.get("eos_token"))
        return cls(backend, bos_token=token_text(config.get("bos_token")), eos_tokens=(eos,) if eos else (),
                   chat_template=template, unk_token=token_text(config.get("unk_token")),
                   pad_token=token_text(config.get("pad_token")))

    @classmethod
    def from_gguf_metadata(cls, source: Any) -> "Tokenizer":
        """The tokenizer a GGUF file describes in its ``tokenizer.*`` metadata.

        ``source`` is a ``gguf.GGUFReader`` or a dict from :func:`gguf_tokenizer_metadata`.
        ``tokenizer.ggml.model`` "gpt2" is byte-level BPE with merges; "llama" is a
        SentencePiece vocabulary with scores, rebuilt as byte-fallback BPE.
        """
        meta = gguf_tokenizer_metadata(source) if not isinstance(source, Mapping) else dict(source)
        if "tokenizer.ggml.tokens" not in meta:
            raise ValueError("GGUF metadata has no tokenizer.ggml.tokens: no tokenizer in this file")
        kind = meta.get("tokenizer.ggml.model")
        tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
        types = list(meta.get("tokenizer.ggml.token_type") or [_GGUF_NORMAL] * len(tokens))
        if kind == "gpt2":
            backend, spelled = _gguf_byte_level_backend(meta, tokens, types)
            add_bos_default = False
        elif kind == "llama":
            backend, spelled = _gguf_sentencepiece_backend(meta, tokens, types)
            add_bos_default = True  # llama.cpp's default for SentencePiece vocabularies
        else:
            raise ValueError(f"unsupported GGUF tokenizer model {kind!r} (supported: 'gpt2' byte-level BPE, "
                             f"'llama' SentencePiece)")

        def token_at(key):
            index = meta.get(f"tokenizer.ggml.{key}")
            return None if index is None else spelled[int(index)]

        bos = token_at("bos_token_id")
        if bos is not None and meta.get("tokenizer.ggml.add_bos_token", add_bos_default):
            backend.post_processor = _bos_post_processor(bos, int(meta["tokenizer.ggml.bos_token_id"]))
        eos = [token_at(key) for key in ("eos_token_id", "eot_token_id", "eom_token_id")]
        eos = list(dict.fromkeys(t for t in eos if t is not None))
        return cls(backend, bos_token=bos, eos_tokens=eos, chat_template=meta.get("tokenizer.chat_template"),
                   unk_token=token_at("unknown_token_id"), pad_token=token_at("padding_token_id"))

    @classmethod
    def from_tiktoken(cls, path: str) -> "Tokenizer":
        """Meta's Llama 3 ``tokenizer.model``: lines of ``base64(token bytes) rank``.

        BPE merges are rebuilt from the ranks: tiktoken joins the adjacent pair whose union has the
        lowest rank, so every split of a token into two tokens is a merge ranked by that token.
        """
        ranks: dict[bytes, int] = {}
        with open(path, "rb") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    token, rank = line.split()
                    ranks[base64.b64decode(token, validate=True)] = int(rank)
                except Exception as err:
                    raise ValueError(f"{path}:{line_no}: not a tiktoken rank line "
                                     f"(expected 'base64 rank'): {line[:60]!r}") from err
        if sorted(ranks.values()) != list(range(len(ranks))):
            raise ValueError(f"{path}: ranks are not 0..{len(ranks) - 1} without gaps")
        if any(bytes([b]) not in ranks for b in range(256)):
            raise ValueError(f"{path}: not a byte-level vocabulary (some single bytes have no rank)")
        table = byte_level_alphabet()
        vocab = {_spell_bytes(token, table): rank for token, rank in ranks.items()}
        merges = []
        for token, rank in ranks.items():
            for cut in range(1, len(token)):
                left, right = token[:cut], token[cut:]
                if left in ranks and right in ranks:
                    merges.append((rank, ranks[left], ranks[right], left, right))
        merges.sort()
        merge_pairs = [(_spell_bytes(left, table), _spell_bytes(right, table)) for *_, left, right in merges]
        # ignore_merges: a word that is itself a token is taken whole, as tiktoken does.
        backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merge_pairs, ignore_merges=True,
                                                  fuse_unk=False, byte_fallback=False))
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        backend.decoder = decoders.ByteLevel()
        specials = list(LLAMA3_NAMED_SPECIAL_TOKENS) + [
            f"<|reserved_special_token_{2 + i}|>"
            for i in range(LLAMA3_NUM_SPECIAL_TOKENS - len(LLAMA3_NAMED_SPECIAL_TOKENS))]
        # added in order, so the i-th special token gets id len(ranks) + i
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
        bos = "<|begin_of_text|>"
        backend.post_processor = _bos_post_processor(bos, backend.token_to_id(bos))
        return cls(backend, bos_token=bos, eos_tokens=("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"),
                   chat_template=LLAMA3_CHAT_TEMPLATE, pad_token="<|finetune_right_pad_id|>")


# ---------------------------------------------------------------------------------------------
# GGUF vocabularies.
# ---------------------------------------------------------------------------------------------

def gguf_tokenizer_metadata(source: Any) -> dict[str, Any]:
    """Every ``tokenizer.*`` metadata value of a GGUF (a ``GGUFReader`` or a dict of its fields)
    as plain Python values (str, int, float, bool, lists)."""
    fields = source.fields if hasattr(source, "fields") else source
    out = {}
    for key, field in fields.items():
        if key.startswith("tokenizer."):
            out[key] = field.contents() if hasattr(field, "contents") else field
    return out


def _gguf_added_tokens(tokens: list[str], types: list[int], usable) -> list[AddedToken]:
    # Control/unknown tokens are special (skipped by decode(skip_special_tokens=True));
    # user-defined ones are matched whole in text but decoded like ordinary text.
    added = []
    for token, kind in zip(tokens, types):
        if not usable(token):
            continue
        if kind in (_GGUF_CONTROL, _GGUF_UNKNOWN):
            added.append(AddedToken(token, special=True, normalized=False))
        elif kind == _GGUF_USER_DEFINED:
            added.append(AddedToken(token, special=False, normalized=False))
    return added


def _gguf_byte_level_backend(meta: dict, tokens: list[str], types: list[int]):
    table = byte_level_alphabet()
    alphabet = set(table)
    # Tokens are stored in the byte-level spelling; a few files store added tokens as raw text,
    # which we respell so that the vocabulary stays consistent.
    spelled = [t if set(t) <= alphabet else _spell_bytes(t.encode("utf-8"), table) for t in tokens]
    vocab = {token: index for index, token in enumerate(spelled)}
    raw_merges = meta.get("tokenizer.ggml.merges")
    if not raw_merges:
        raise ValueError("GGUF byte-level (gpt2) tokenizer without tokenizer.ggml.merges")
    merges = []
    for merge in raw_merges:
        left, sep, right = merge.partition(" ")
        if not sep:
            raise ValueError(f"malformed GGUF merge {merge!r} (expected 'left right')")
        merges.append((left, right))
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = _gguf_byte_level_pre_tokenizer(meta.get("tokenizer.ggml.pre"))
    backend.decoder = decoders.ByteLevel()
    added = _gguf_added_tokens(tokens, types, usable=lambda t: set(t) <= alphabet)
    backend.add_special_tokens([t for t in added if t.special])
    backend.add_tokens([t for t in added if not t.special])
    return backend, spelled


def _gguf_byte_level_pre_tokenizer(pre: str | None):
    """The word splitting named by ``tokenizer.ggml.pre`` (llama.cpp's pre-tokenizer types)."""
    def split_then_bytes(pattern):
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])

    if pre == "smollm":
        # SmolLM's own tokenizer.json: every digit alone, then the GPT-2 split.
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    if pre in ("llama-bpe", "llama3", "llama-v3", "smaug-bpe", "dbrx", "falcon3"):
        return split_then_bytes(LLAMA3_SPLIT_PATTERN)
    if pre in ("qwen2", "deepseek-r1-qwen"):
        return split_then_bytes(QWEN2_SPLIT_PATTERN)
    if pre not in (None, "default", "gpt-2", "gpt2"):
        warnings.warn(f"GGUF pre-tokenizer {pre!r} is not known to eaglespec; using the GPT-2 split "
                      "(tokenization may differ slightly from llama.cpp)", stacklevel=3)
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _gguf_sentencepiece_backend(meta: dict, tokens: list[str], types: list[int]):
    scores = meta.get("tokenizer.ggml.scores")
    vocab = {token: index for index, token in enumerate(tokens)}
    raw_merges = meta.get("tokenizer.ggml.merges")
    if raw_merges:
        merges = [tuple(m.split(" ", 1)) for m in raw_merges]
    else:
        if scores is None or len(scores) != len(tokens):
            raise ValueError("GGUF SentencePiece (llama) tokenizer needs tokenizer.ggml.scores, one per token")
        merges = _merges_from_scores(tokens, [float(s) for s in scores], types)
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    backend = tokenizers.Tokenizer(models.BPE(
        vocab=vocab, merges=merges, unk_token=None if unk_id is None else tokens[int(unk_id)],
        fuse_unk=True, byte_fallback=True))
    add_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement=_SPM_SPACE,
                                                     prepend_scheme="first" if add_prefix else "never",
                                                     split=False)
    steps = [decoders.Replace(_SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    added = _gguf_added_tokens(tokens, types, usable=lambda t: True)
    backend.add_special_tokens([t for t in added if t.special])
    backend.add_tokens([t for t in added if not t.special])
    return backend, tokens


def _merges_from_scores(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece BPE: join the pair whose union scores highest.

    Only ordinary pieces are merge results; control, byte and unused pieces never come out of
    merging text.
    """
    vocab = {token: index for index, token in enumerate(tokens)}
    candidates = []
    for token, score, kind in zip(tokens, scores, types):
        if kind not in (_GGUF_NORMAL, _GGUF_USER_DEFINED):
            continue
        splits = [(token[:cut], token[cut:]) for cut in range(1, len(token))
                  if token[:cut] in vocab and token[cut:] in vocab]
        splits.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
        candidates.extend((score, left, right) for left, right in splits)
    # best score first; among equal scores the longer left, then the longer right piece first
    # (the order transformers uses, so both build the same tokenizer); the sort is stable
    candidates.sort(key=lambda c: (-c[0], -len(c[1]), -len(c[2])))
    return [(left, right) for _, left, right in candidates]


# ---------------------------------------------------------------------------------------------
# Streaming.
# ---------------------------------------------------------------------------------------------

class IncrementalDetokenizer:
    """Turns token ids, one at a time, into text pieces whose concatenation is ``decode(ids)``.

    A token can end in the middle of a UTF-8 character (emoji, CJK split across byte tokens);
    its text then ends in U+FFFD and is held back until a later token completes it. Each step
    decodes only a short window (the previous piece + the new tokens), not the whole sequence,
    and the window keeps decoders that strip a leading space consistent.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix_start = 0  # window start: the first token of the last emitted piece
        self._emitted_end = 0  # tokens before this index have been emitted

    def _window_texts(self) -> tuple[str, str]:
        decode = self.tokenizer.decode
        emitted = decode(self.ids[self._prefix_start:self._emitted_end], self.skip_special_tokens)
        current = decode(self.ids[self._prefix_start:], self.skip_special_tokens)
        return emitted, current

    def add(self, token_id: int) -> str:
        """Append one id; return the text it completes ("" while a character is incomplete)."""
        self.ids.append(int(token_id))
        emitted, current = self._window_texts()
        if len(current) <= len(emitted) or current.endswith("\ufffd"):
            return ""
        self._prefix_start, self._emitted_end = self._emitted_end, len(self.ids)
        return current[len(emitted):]

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character decodes to U+FFFD)."""
        emitted, current = self._window_texts()
        self._prefix_start, self._emitted_end = self._emitted_end, len(self.ids)
        return current[len(emitted):]
