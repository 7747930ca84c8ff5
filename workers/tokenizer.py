"""Text <-> token ids for one model, and its chat template.

Two backends behind one interface, chosen by what the checkpoint folder holds:
- `tokenizer.json`: Hugging Face `tokenizers` (Rust), the Hugging Face layout;
- `tokenizer.model` / `tokenizer.model.v*`: sentencepiece, Mistral's own layout.

Both cut the text at the strings of the special tokens first (`<s>`, `</s>`, `<unk>`, and a v3
tokenizer's control tokens), then encode every piece on its own; this is what Hugging Face does, so a
rendered chat prompt, which holds `<s>` and `</s>` as text, gives the same ids on both backends. (It
also means a user's literal "</s>" becomes the EOS id, as it does in transformers.) Decoding on the
sentencepiece side copies the Hugging Face decoder step for step (byte pieces joined, `▁` to space,
one leading space dropped), so both backends also decode alike.

The chat template is the folder's own (`chat_template.jinja`, or `chat_template` in
`tokenizer_config.json`) rendered the way transformers renders it (sandboxed jinja2, trim_blocks,
lstrip_blocks, `raise_exception`, special tokens as variables); a folder without one gets
MISTRAL_INSTRUCT_CHAT_TEMPLATE.
"""

import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Mistral-instruct v1 ("[INST] ... [/INST]"), the format of Mixtral-8x7B-Instruct-v0.1. An optional
# first system message is put before the first user message with a blank line between them, as
# mistral-common's v1 instruct tokenizer does; after it the roles alternate user/assistant.
MISTRAL_INSTRUCT_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}"
    "{%- set loop_messages = messages %}"
    "{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    "{%- if message['role'] not in ['user', 'assistant'] %}"
    "{{- raise_exception('Unsupported role ' + message['role'] | tojson + ': only user and assistant messages are"
    " supported, after an optional first system message') }}"
    "{%- elif (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('After the optional system message, conversation roles must alternate"
    " user/assistant/user/assistant/...') }}"
    "{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.first and system_message is defined %}"
    "{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}"
    "{%- else %}"
    "{{- '[INST] ' + message['content'] + ' [/INST]' }}"
    "{%- endif %}"
    "{%- else %}"
    "{{- ' ' + message['content'] + eos_token }}"
    "{%- endif %}"
    "{%- endfor %}"
)

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class _ChatTemplateError(Exception):
    pass


def _raise_exception(message: str):
    raise _ChatTemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _compile_chat_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


class _HFBackend:
    def __init__(self, tok):
        """tok: a `tokenizers.Tokenizer` (from tokenizer.json, or converted from a GGUF's vocabulary)."""
        self._tok = tok
        self._tok.no_padding()
        self._tok.no_truncation()
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.byte_token_ids = frozenset(i for t, i in self._tok.get_vocab().items() if _BYTE_PIECE.fullmatch(t))
        self.special_token_ids = frozenset(i for i, t in self._tok.get_added_tokens_decoder().items() if t.special)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)


class _SentencePieceBackend:
    def __init__(self, path: Path):
        import sentencepiece

        self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        self.vocab_size = self._sp.get_piece_size()
        self._pieces = [self._sp.id_to_piece(i) for i in range(self.vocab_size)]
        self._byte = [self._sp.is_byte(i) for i in range(self.vocab_size)]
        self.byte_token_ids = frozenset(i for i in range(self.vocab_size) if self._byte[i])
        self._special = {
            self._pieces[i]: i for i in range(self.vocab_size) if self._sp.is_control(i) or self._sp.is_unknown(i)
        }
        self.special_token_ids = frozenset(self._special.values())
        alternatives = "|".join(re.escape(p) for p in sorted(self._special, key=len, reverse=True))
        self._special_split = re.compile(f"({alternatives})")

    def token_to_id(self, token: str) -> int | None:
        i = self._sp.piece_to_id(token)
        return i if self._pieces[i] == token else None

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for i, part in enumerate(self._special_split.split(text)):
            if i % 2:
                ids.append(self._special[part])
            elif part:
                ids.extend(self._sp.encode(part))
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        """The Hugging Face Llama decoder: `▁` -> space, byte runs -> UTF-8 (one U+FFFD per byte if the
        run is invalid), then one leading space dropped."""
        parts: list[str] = []
        run = bytearray()
        for i in ids:
            if not 0 <= i < self.vocab_size:
                continue
            if skip_special_tokens and self._pieces[i] in self._special:
                continue  # dropped before decoding: the byte runs on both sides join
            if self._byte[i]:
                run.append(int(self._pieces[i][3:5], 16))
                continue
            if run:
                parts.append(_decode_byte_run(run))
                run.clear()
            parts.append(self._pieces[i].replace("▁", " "))
        if run:
            parts.append(_decode_byte_run(run))
        text = "".join(parts)
        return text[1:] if text.startswith(" ") else text


def _decode_byte_run(run: bytearray) -> str:
    try:
        return run.decode("utf-8")
    except UnicodeDecodeError:
        return "\ufffd" * len(run)


def _special_token(config: dict, key: str, default: str) -> str:
    value = config.get(key) or default
    return value["content"] if isinstance(value, dict) else value


def _chat_template_source(path: Path, config: dict) -> str | None:
    if (path / "chat_template.jinja").exists():
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": "..."}, ...]
        template = {t["name"]: t["template"] for t in template}.get("default")
    return template


class Tokenizer:
    """Encode, decode and render chats for one checkpoint folder. Build it once; every call after
    that is cheap (Rust or sentencepiece encode, a precompiled jinja template)."""

    def __init__(self, backend, *, bos_token: str, eos_token: str, unk_token: str, chat_template: str | None,
                 add_bos_token: bool = True):
        self._backend = backend
        self.add_bos_token = add_bos_token  # encode() starts a prompt with BOS (Llama/Mistral yes, SmolLM2 no)
        self.bos_token, self.eos_token, self.unk_token = bos_token, eos_token, unk_token
        self.bos_id = self._required_id(bos_token)
        self.eos_id = self._required_id(eos_token)
        self.chat_template = chat_template or MISTRAL_INSTRUCT_CHAT_TEMPLATE
        self._template = _compile_chat_template(self.chat_template)

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        """The tokenizer of a checkpoint folder, or of a .gguf file (workers/gguf_checkpoint.py)."""
        path = Path(path)
        if path.suffix == ".gguf" and path.is_file():
            return cls.from_gguf(path)
        config_file = path / "tokenizer_config.json"
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.exists() else {}
        if (path / "tokenizer.json").exists():
            from tokenizers import Tokenizer as RustTokenizer

            backend = _HFBackend(RustTokenizer.from_file(str(path / "tokenizer.json")))
        else:
            candidates = sorted(path.glob("tokenizer.model.v*")) or [path / "tokenizer.model"]
            spm_file = path / "tokenizer.model" if (path / "tokenizer.model").exists() else candidates[-1]
            if not spm_file.exists():
                raise FileNotFoundError(
                    f"no tokenizer in {path}: expected tokenizer.json, tokenizer.model or tokenizer.model.v*"
                )
            backend = _SentencePieceBackend(spm_file)
        return cls(
            backend,
            bos_token=_special_token(config, "bos_token", "<s>"),
            eos_token=_special_token(config, "eos_token", "</s>"),
            unk_token=_special_token(config, "unk_token", "<unk>"),
            chat_template=_chat_template_source(path, config),
            add_bos_token=bool(config.get("add_bos_token", True)),
        )

    @classmethod
    def from_gguf(cls, path: str | Path) -> "Tokenizer":
        """The vocabulary, merges, special tokens and chat template a GGUF file carries in its metadata
        (`gpt2` BPE and `llama` SentencePiece-style vocabularies), converted by transformers' own GGUF
        tokenizer converter into a `tokenizers.Tokenizer`, so ids equal transformers' for the file."""
        from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer

        architecture, vocabulary, config = get_gguf_tokenizer(str(path))
        if not vocabulary.get("tokens"):
            raise ValueError(f"{path} carries no tokenizer vocabulary (tokenizer.ggml.tokens)")
        rust, _ = convert_gguf_tokenizer(architecture, vocabulary)
        tokens = vocabulary["tokens"]

        def special(key: str, default: str) -> str:
            value = config.get(key)
            if value is None and f"{key}_id" in vocabulary and vocabulary[f"{key}_id"] < len(tokens):
                value = tokens[vocabulary[f"{key}_id"]]
            return value or default

        add_bos = config.get("add_bos_token", True)
        return cls(
            _HFBackend(rust),
            bos_token=special("bos_token", "<s>"),
            eos_token=special("eos_token", "</s>"),
            unk_token=special("unk_token", "<unk>"),
            chat_template=config.get("chat_template"),
            add_bos_token=add_bos if isinstance(add_bos, bool) else str(add_bos).lower() == "true",
        )

    def _required_id(self, token: str) -> int:
        token_id = self._backend.token_to_id(token)
        if token_id is None:
            raise ValueError(f"special token {token!r} is not in the tokenizer's vocabulary")
        return token_id

    @property
    def vocab_size(self) -> int:
        return self._backend.vocab_size

    @property
    def byte_token_ids(self) -> frozenset[int]:
        """Ids of the byte-fallback pieces `<0x00>`..`<0xFF>`: text that is not whole until its
        byte run ends."""
        return self._backend.byte_token_ids

    @property
    def special_token_ids(self) -> frozenset[int]:
        """Ids that `decode(..., skip_special_tokens=True)` drops (BOS, EOS, UNK, control tokens)."""
        return self._backend.special_token_ids

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = self._backend.encode(text)
        return [self.bos_id, *ids] if add_bos and self.add_bos_token else ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(list(ids), skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """Render a chat as prompt text. Raises ValueError for a chat the template rejects (an unknown
        role, roles out of turn) or that is malformed."""
        if not messages:
            raise ValueError("a chat needs at least one message")
        for message in messages:
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise ValueError(f"every message must be a dict with a string 'role', got {message!r}")
        # Like transformers: a key set to None counts as absent (OpenAI clients send content=None).
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                unk_token=self.unk_token,
            )
        except _ChatTemplateError as e:
            raise ValueError(str(e)) from None
        except jinja2.TemplateError as e:
            raise ValueError(f"the chat template failed on these messages: {e}") from None

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        """Prompt ids for a chat. The template writes the BOS itself, so none is added here
        (transformers' `apply_chat_template(tokenize=True)` tokenizes with add_special_tokens=False)."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt=True), add_bos=False)
