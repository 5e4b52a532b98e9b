"""The engine's tokenizer: Llama 4 chat format, encode, decode and exact incremental detokenization.

Built on the `tokenizers` library directly (not transformers) so the engine stays light. Reads a
Hugging Face checkpoint's tokenizer.json (and generation_config.json for stop and pad ids); works on
the real Llama 4 release and on our tiny checkpoint alike.

Text out of ids. A token is either a byte-level BPE token (its bytes) or a special token (its name).
Decoding concatenates the bytes and decodes UTF-8 with U+FFFD for invalid or truncated sequences,
exactly as `tokenizers`' ByteLevel decoder does. One rule of ours: a special token always ends a
byte run, also when it is skipped, so bytes never join across a (hidden) special token. That only
matters when a special token sits inside a split character, and it makes streaming exact with a
fixed-size context (see `detokenize_incrementally`).

Output text skips special tokens by default, so stop tokens (end_of_text, eom, eot) and image
tokens never show; `skip_special_tokens=False` shows them all.

Special-token text in chat content ("<|eot|>" typed by a user) is plain text by default, as Meta's
reference tokenizes message content: only the chat format's own markers become control tokens, so
a message cannot forge a turn (`encode_chat`). A raw prompt (`encode`) is the caller's own format
and its special-token text is parsed.
"""

from __future__ import annotations

import codecs
import json
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

from maverick import tool_prompt

ROLES = ("system", "user", "assistant", "ipython")
ROLE_ALIASES = {"tool": "ipython"}  # OpenAI's tool-result role is Llama 4's ipython
IMAGE_PART_TYPES = ("image", "image_url")
IMAGE_ROLES = ("user", "assistant")
STOP_TOKENS = ("<|end_of_text|>", "<|eom|>", "<|eot|>")
MIN_CONTEXT_TOKENS = 3  # a pending partial UTF-8 character has at most 3 bytes, each token at least 1


def byte_symbols() -> list[str]:
    """GPT-2 byte-level alphabet: the printable character standing for each byte 0..255, in byte order.

    Printable Latin-1 bytes stand for themselves; the other 68 (controls, space, DEL, NBSP, soft
    hyphen) are moved to U+0100.. in byte order, so every token string is visible text.
    """
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}  # "!".."~", "¡".."¬", "®".."ÿ"
    symbols, moved = [], 0
    for b in range(256):
        if b in printable:
            symbols.append(chr(b))
        else:
            symbols.append(chr(256 + moved))
            moved += 1
    return symbols


@dataclass(frozen=True)
class ChatPrompt:
    # (text, is_control): the chat format's control tokens (`<|eot|>`, one <|image|> per image
    # part...) apart from the text between them (role names, message content), which is plain text
    segments: tuple[tuple[str, bool], ...]
    images: tuple[dict, ...]  # the image parts, in the order of their <|image|> placeholders

    @property
    def text(self) -> str:
        """Llama 4 chat text, starting with <|begin_of_text|>."""
        return "".join(text for text, _ in self.segments)


class Tokenizer:
    def __init__(self, hf: _HFTokenizer, stop_ids: Sequence[int] | None = None, pad_id: int | None = None):
        self._hf = hf
        self._vocab = {**hf.get_vocab(with_added_tokens=True)}
        byte_of = {c: b for b, c in enumerate(byte_symbols())}
        added = hf.get_added_tokens_decoder()  # id -> AddedToken
        self._special = {i: t.content for i, t in added.items() if t.special}
        # id -> bytes of every non-special token; specials are looked up in self._special
        self._bytes: dict[int, bytes] = {}
        for token, i in self._vocab.items():
            if i in self._special:
                continue
            if i in added:  # a non-special added token is plain text
                self._bytes[i] = token.encode()
            else:  # as the ByteLevel decoder: a token with a character outside the alphabet is raw text
                try:
                    self._bytes[i] = bytes(byte_of[c] for c in token)
                except KeyError:
                    self._bytes[i] = token.encode()
        if stop_ids is None:
            stop_ids = [self.token_id(t) for t in STOP_TOKENS]
        self.stop_ids = tuple(stop_ids)
        self.pad_id = pad_id if pad_id is not None else self.token_id("<|finetune_right_pad|>")
        self._plain: _HFTokenizer | None = None  # a copy that reads special-token text as text
        self._plain_lock = threading.Lock()

    @classmethod
    def from_dir(cls, checkpoint_dir: str | Path) -> Tokenizer:
        d = Path(checkpoint_dir)
        path = d / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{d}: no tokenizer.json (expected a Hugging Face Llama 4 checkpoint)")
        stop_ids = pad_id = None
        gen = d / "generation_config.json"
        if gen.is_file():
            cfg = json.loads(gen.read_text())
            eos = cfg.get("eos_token_id")
            if eos is not None:
                stop_ids = [eos] if isinstance(eos, int) else list(eos)
            pad_id = cfg.get("pad_token_id")
        return cls(_HFTokenizer.from_file(str(path)), stop_ids=stop_ids, pad_id=pad_id)

    # --- ids ---

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer knows (base vocabulary + added tokens). The model's embedding
        may have more rows (the release's tokenizer.json lists fewer than its 2048 specials); ids
        unknown to the tokenizer decode to ""."""
        return self._hf.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int:
        if token not in self._vocab:
            raise ValueError(f"token {token!r} is not in the vocabulary")
        return self._vocab[token]

    def is_special(self, token_id: int) -> bool:
        return int(token_id) not in self._bytes  # ids outside the vocabulary count as (empty) specials

    def token_bytes(self, token_id: int) -> bytes:
        """One token as bytes: a BPE token's own bytes (maybe part of a UTF-8 character), a special
        token's name in UTF-8, b"" for an id the tokenizer does not know (OpenAI's logprobs `bytes`)."""
        i = int(token_id)
        b = self._bytes.get(i)
        return b if b is not None else self._special.get(i, "").encode()

    bos_id = property(lambda self: self.token_id("<|begin_of_text|>"))
    eos_id = property(lambda self: self.token_id("<|end_of_text|>"))
    eot_id = property(lambda self: self.token_id("<|eot|>"))
    eom_id = property(lambda self: self.token_id("<|eom|>"))
    image_start_id = property(lambda self: self.token_id("<|image_start|>"))
    image_end_id = property(lambda self: self.token_id("<|image_end|>"))
    image_id = property(lambda self: self.token_id("<|image|>"))
    patch_id = property(lambda self: self.token_id("<|patch|>"))
    tile_x_separator_id = property(lambda self: self.token_id("<|tile_x_separator|>"))
    tile_y_separator_id = property(lambda self: self.token_id("<|tile_y_separator|>"))

    # --- text <-> ids ---

    def encode(self, text: str, add_bos: bool = False, *, parse_special: bool = True) -> list[int]:
        """Token ids of `text`. Special-token strings in it (e.g. "<|eot|>") become their special
        ids, or with parse_special=False are encoded as the text they are (byte-level BPE)."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        hf = self._hf if parse_special else self._plain_tokenizer()
        ids = hf.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos else ids

    def _plain_tokenizer(self) -> _HFTokenizer:
        # a second instance: the flag is the tokenizer's state, and requests run on several threads
        with self._plain_lock:
            if self._plain is None:
                plain = _HFTokenizer.from_str(self._hf.to_str())
                plain.encode_special_tokens = True
                self._plain = plain
            return self._plain

    def encode_chat(self, chat: ChatPrompt, allow_special_tokens: bool = False) -> list[int]:
        """Token ids of a rendered chat: its control tokens as such, everything between them as
        plain text, special-token strings included, unless allow_special_tokens (trusted callers:
        then exactly `encode(chat.text)`). Without special-token text in the content both agree."""
        if allow_special_tokens:
            return self.encode(chat.text)
        ids: list[int] = []
        run: list[str] = []
        for text, control in chat.segments:
            if not control:
                run.append(text)
                continue
            if run:  # the text between two control tokens is one span, as encode() splits it
                ids += self.encode("".join(run), parse_special=False)
                run = []
            ids.append(self.token_id(text))
        if run:
            ids += self.encode("".join(run), parse_special=False)
        return ids

    def bad_words_ids(self, words: Iterable[str]) -> list[list[int]]:
        """Each word as token ids, alone and after a space (how it appears mid-sentence)."""
        out: list[list[int]] = []
        for word in words:
            for variant in dict.fromkeys((word, " " + word.lstrip())):
                ids = self.encode(variant)
                if ids and ids not in out:
                    out.append(ids)
        return out

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        dec = codecs.getincrementaldecoder("utf-8")("replace")
        return self._feed(dec, ids, skip_special_tokens) + dec.decode(b"", final=True)

    def _feed(self, dec: codecs.IncrementalDecoder, ids: Iterable[int], skip_special_tokens: bool) -> str:
        """Push ids through a UTF-8 decoder; returns the complete text, leaves a partial character pending."""
        out, run = [], []
        for i in ids:
            i = int(i)  # numpy / torch scalars too (a tensor element would not hash like its int)
            b = self._bytes.get(i)
            if b is not None:
                run.append(b)
                continue
            out.append(dec.decode(b"".join(run), final=True))  # a special token ends the byte run
            dec.reset()
            run = []
            if not skip_special_tokens:
                out.append(self._special.get(i, ""))
        out.append(dec.decode(b"".join(run)))
        return "".join(out)

    def detokenize_incrementally(
        self, ids: Sequence[int], num_new: int, skip_special_tokens: bool = True, final: bool = False
    ) -> str:
        """The text that the last `num_new` ids add to a stream; stateless.

        `ids[:-num_new]` is context: ids already handed over by earlier calls, at least the last
        MIN_CONTEXT_TOKENS of them (or all, near the start of the stream). Text that ends in an
        incomplete UTF-8 character is held back until the character completes; `final=True` (with
        the stream's last call) releases whatever is still held, as U+FFFD. Over a whole stream the
        returned pieces concatenate to exactly `decode(all_ids, skip_special_tokens)`.
        """
        if not 0 <= num_new <= len(ids):
            raise ValueError(f"num_new={num_new} must be within 0..len(ids)={len(ids)}")
        split = len(ids) - num_new
        dec = codecs.getincrementaldecoder("utf-8")("replace")
        self._feed(dec, ids[:split], skip_special_tokens)  # re-derive what the last call held back
        text = self._feed(dec, ids[split:], skip_special_tokens)
        return text + dec.decode(b"", final=True) if final else text

    # --- chat ---

    def render_chat(
        self,
        messages: Sequence[dict],
        add_generation_prompt: bool = True,
        system: str | None = None,
        tools: Sequence[dict] | None = None,
    ) -> ChatPrompt:
        """Llama 4 chat text for OpenAI-shaped messages ({"role", "content": str | list of parts}).

        `<|begin_of_text|>`, then per message `<|header_start|>{role}<|header_end|>\\n\\n{content}<|eot|>`,
        then the assistant header if add_generation_prompt. Role "tool" is written as "ipython".
        System text is trimmed (as the release's template does); other content is kept as is.
        Image parts ({"type": "image" | "image_url"}, user and assistant only) become one <|image|>
        each. `system` is a convenience for a leading system message. Same text as the
        chat_template in tokenizer_config.json (maverick.tiny_tokenizer.CHAT_TEMPLATE); the segments
        tell its control tokens from the content (`encode_chat`).

        Tools (Llama 4's pythonic format, maverick.tool_prompt; the template knows none of this):
        `tools` (OpenAI's list of function tools) makes the system message the tool instructions and
        list, followed by the caller's own system text; an assistant message's `tool_calls` are
        written after its content (which may then be None) as `[f(a=1), g(b="x")]`.
        """
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
        if system is not None:
            if _role_of(messages[0], 0) == "system":
                raise ValueError("system= given and messages[0] is a system message too")
            messages = [{"role": "system", "content": system}, *messages]
        functions = None if tools is None else tool_prompt.check_tools(tools)
        segments, images = [("<|begin_of_text|>", True)], []
        if functions is not None and _role_of(messages[0], 0) != "system":
            tools_turn = tool_prompt.system_message(functions)
            segments += [*_header("system"), (tools_turn, False), ("<|eot|>", True)]
        for n, message in enumerate(messages):
            role = _role_of(message, n)
            content = _content_segments(message, role, n, images)
            if role == "system":  # no images in a system message: its content is one text
                text = "".join(text for text, _ in content).strip()
                if n == 0 and functions is not None:  # the tool list comes first, then the caller's text
                    text = tool_prompt.system_message(functions, text)
                content = [(text, False)]
            if message.get("tool_calls"):  # only an assistant's (_content_segments checks)
                calls = tool_prompt.tool_calls_text(message["tool_calls"], f"messages[{n}].tool_calls")
                content.append((calls, False))
            segments += [*_header(role), *content, ("<|eot|>", True)]
        if add_generation_prompt:
            segments += _header("assistant")
        return ChatPrompt(tuple((text, control) for text, control in segments if text), tuple(images))


def _header(role: str) -> list[tuple[str, bool]]:
    return [("<|header_start|>", True), (role, False), ("<|header_end|>", True), ("\n\n", False)]


def _role_of(message: object, n: int) -> str:
    if not isinstance(message, dict):
        raise ValueError(f"messages[{n}] must be a dict, got {type(message).__name__}")
    role = message.get("role")
    role = ROLE_ALIASES.get(role, role) if isinstance(role, str) else role
    if role not in ROLES:
        raise ValueError(
            f"messages[{n}]: unknown role {message.get('role')!r} (expected one of "
            f"{', '.join(ROLES + tuple(ROLE_ALIASES))})"
        )
    return role


def _content_segments(message: dict, role: str, n: int, images: list[dict]) -> list[tuple[str, bool]]:
    calls = message.get("tool_calls")
    if calls and role != "assistant":
        raise ValueError(f"messages[{n}]: only assistant messages carry tool_calls, not {role}")
    content = message.get("content")
    if content is None:
        if calls:  # OpenAI's assistant turn that only calls tools
            return []
        raise ValueError(f"messages[{n}] ({role}) has no content")
    if isinstance(content, str):
        return [(content, False)]
    if role == "ipython" and isinstance(content, dict):  # a tool's result as JSON, as the release template
        return [(json.dumps(content, ensure_ascii=False), False)]
    if not isinstance(content, (list, tuple)):
        got = type(content).__name__
        raise ValueError(f"messages[{n}].content must be a str or a list of parts, got {got}")
    out = []
    for k, part in enumerate(content):
        where = f"messages[{n}].content[{k}]"
        if not isinstance(part, dict):
            raise ValueError(f"{where} must be a dict with a 'type', got {type(part).__name__}")
        kind = part.get("type")
        if kind == "text":
            if not isinstance(part.get("text"), str):
                got = type(part.get("text")).__name__
                raise ValueError(f"{where}: a text part needs a str 'text', got {got}")
            out.append((part["text"], False))
        elif kind in IMAGE_PART_TYPES:
            if role not in IMAGE_ROLES:
                raise ValueError(f"{where}: images belong in user or assistant messages, not {role}")
            out.append(("<|image|>", True))
            images.append(part)
        else:
            raise ValueError(f"{where}: unsupported part type {kind!r} (expected text, image or image_url)")
    return out


class IncrementalDetokenizer:
    """Stateful convenience over Tokenizer.detokenize_incrementally: push new ids, get text deltas."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._context: list[int] = []  # the last MIN_CONTEXT_TOKENS ids pushed

    def push(self, new_ids: Sequence[int], final: bool = False) -> str:
        window = [*self._context, *new_ids]
        delta = self._tok.detokenize_incrementally(window, len(new_ids), self._skip, final)
        self._context = window[-MIN_CONTEXT_TOKENS:]
        return delta

    def finish(self) -> str:
        """Release text still held back (a truncated character becomes U+FFFD)."""
        return self.push([], final=True)
