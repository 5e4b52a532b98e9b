"""Build the tokenizer files of the tiny Llama 4 checkpoint.

The real Llama 4 tokenizer is a tiktoken byte-level BPE with 200000 ranks followed by 2048 special
tokens. Ours has the same structure at a small scale: a byte-level BPE with `base_vocab_size` ranks
(256 byte symbols, then merges in the order BpeTrainer learnt them, rank == id), trained on
`maverick/data/tokenizer_corpus.txt`, then Llama 4's 2048 special tokens with their real names at
their real offsets after the base vocabulary (`<|begin_of_text|>` at base + 0, `<|image|>` at
base + 90, ...).

The files are laid out like the Hugging Face release (tokenizer.json, tokenizer_config.json,
special_tokens_map.json, chat_template.json, processor_config.json), so that
`AutoTokenizer.from_pretrained` and, once the image processor's preprocessor_config.json sits beside
them, `AutoProcessor.from_pretrained` (Llama4Processor) load them. Same inputs, same bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from maverick.tokenizer import byte_symbols

CORPUS = Path(__file__).parent / "data" / "tokenizer_corpus.txt"
NUM_SPECIAL = 2048
BOS, EOS, EOT, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|eot|>", "<|finetune_right_pad|>"
MODEL_MAX_LENGTH = 1_048_576  # Maverick Instruct's context (tokenizer_config.json of the release)

# Llama 4's pre-tokenizer split (o200k-style): letter runs with case-aware boundaries and English
# contractions, digits in groups of 1-3, punctuation runs (with trailing newlines or slashes),
# newline runs, and whitespace that leaves the last space to the following word.
SPLIT_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Llama 4 chat format as a Jinja template for transformers (AutoTokenizer / Llama4Processor); it
# renders exactly what maverick.tokenizer.Tokenizer.render_chat renders, and raises where it raises
# (for the cases a template can check). "tool" is the OpenAI name of the ipython role; system text is
# trimmed, as the release's template does; an image part is one <|image|> that the processor expands.
CHAT_TEMPLATE = (
    "{%- set ns = namespace() -%}"
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- set role = 'ipython' if message['role'] == 'tool' else message['role'] -%}"
    "{%- if role not in ['system', 'user', 'assistant', 'ipython'] -%}"
    "{{- raise_exception('unknown chat role: ' ~ message['role']) -}}"
    "{%- endif -%}"
    "{%- if message['tool_calls'] is defined and message['tool_calls'] -%}"
    "{{- raise_exception('tool_calls are not supported; put the call text in content') -}}"
    "{%- endif -%}"
    "{%- if message['content'] is not defined or message['content'] is none -%}"
    "{{- raise_exception('chat message without content (role ' ~ role ~ ')') -}}"
    "{%- endif -%}"
    "{%- set ns.text = '' -%}"
    "{%- if message['content'] is string -%}"
    "{%- set ns.text = message['content'] -%}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}"
    "{%- set ns.text = ns.text ~ part['text'] -%}"
    "{%- elif part['type'] in ['image', 'image_url'] and role in ['user', 'assistant'] -%}"
    "{%- set ns.text = ns.text ~ '<|image|>' -%}"
    "{%- else -%}"
    "{{- raise_exception('unsupported content part ' ~ part['type'] ~ ' in a ' ~ role ~ ' message') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- if role == 'system' -%}{%- set ns.text = ns.text | trim -%}{%- endif -%}"
    "{{- '<|header_start|>' ~ role ~ '<|header_end|>\n\n' ~ ns.text ~ '<|eot|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|header_start|>assistant<|header_end|>\n\n' -}}{%- endif -%}"
)


def llama4_special_tokens() -> list[str]:
    """The 2048 special tokens in id order (id = base_vocab_size + index), named as in Meta's release."""

    def reserved(group: str, first: int, count: int) -> list[str]:
        return [f"<|{group}_reserved_special_token_{i}|>" for i in range(first, first + count)]

    basic = [BOS, EOS, "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"]  # +0 .. +4
    text = [  # +5 .. +79; the text_post_train numbering skips 6 and 7 in the release
        "<|header_start|>",
        "<|header_end|>",
        "<|eom|>",
        EOT,
        "<|step|>",
        *reserved("text_post_train", 0, 6),
        "<|python_start|>",
        "<|python_end|>",
        PAD,
        *reserved("text_post_train", 8, 61),
    ]
    vision = [  # +80 .. +1133
        "<|image_start|>",
        "<|image_end|>",
        *reserved("vision", 0, 2),
        "<|tile_x_separator|>",
        "<|tile_y_separator|>",
        *reserved("vision", 2, 4),
        "<|image|>",
        *reserved("vision", 6, 1),
        "<|patch|>",
        *reserved("vision", 7, 1041),
    ]
    reasoning = [*reserved("reasoning", 0, 8), "<|reasoning_thinking_start|>", "<|reasoning_thinking_end|>"]
    named = basic + text + vision + reasoning  # +1134 .. +1143 for reasoning
    return named + [f"<|reserved_special_token_{i}|>" for i in range(NUM_SPECIAL - len(named))]


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def train_bpe(text: str, base_vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train a byte-level BPE on `text`; returns (vocab, merges) with ids 0..255 the bytes in byte order
    and id 256 + i the result of merge i (tiktoken's convention: rank = id = merge order)."""
    if base_vocab_size <= 256:
        raise ValueError(f"base_vocab_size must exceed the 256 byte symbols, got {base_vocab_size}")
    symbols = byte_symbols()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = _pre_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=base_vocab_size,
        min_frequency=0,
        show_progress=False,
        initial_alphabet=symbols,
    )
    tok.train_from_iterator([text], trainer)
    merges = [
        tuple(m) if isinstance(m, list) else tuple(m.split(" "))
        for m in json.loads(tok.to_str())["model"]["merges"]
    ]
    if len(merges) != base_vocab_size - 256:
        raise ValueError(
            f"{CORPUS.name} yields {256 + len(merges)} ranks, fewer than base_vocab_size={base_vocab_size}"
        )
    vocab = {s: i for i, s in enumerate(symbols)}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    if len(vocab) != base_vocab_size:  # a merge result repeated or equal to a byte symbol
        raise ValueError(f"BPE training gave {len(vocab)} distinct tokens, expected {base_vocab_size}")
    return vocab, merges


def build_tokenizer(base_vocab_size: int = 2000) -> Tokenizer:
    """The `tokenizers` object of tokenizer.json: BPE + Llama 4 split + specials + BOS post-processor."""
    vocab, merges = train_bpe(CORPUS.read_text(encoding="utf-8"), base_vocab_size)
    # ignore_merges: a pre-token that is itself in the vocabulary is one token, as tiktoken does.
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False, ignore_merges=True)
    )
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in llama4_special_tokens()])
    # As the release: `tokenizer(text)` prepends <|begin_of_text|>; the chat template writes its own
    # BOS and transformers renders chats with add_special_tokens=False, so chats get exactly one.
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS} $A",
                pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1",
                special_tokens=[(BOS, base_vocab_size)],
            ),
        ]
    )
    return tok


def _added(token: str) -> dict:
    return {
        "content": token,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }


def write_tokenizer(
    out_dir: Path, base_vocab_size: int = 2000, model_max_length: int = MODEL_MAX_LENGTH
) -> None:
    """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json, chat_template.json and
    processor_config.json into out_dir (created if missing)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(base_vocab_size)
    (out / "tokenizer.json").write_text(tok.to_str(pretty=True) + "\n", encoding="utf-8")
    specials = llama4_special_tokens()
    config = {
        "added_tokens_decoder": {str(base_vocab_size + i): _added(t) for i, t in enumerate(specials)},
        "bos_token": BOS,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOT,  # the Instruct release's end of turn; generation stops on eot, eom and eos
        "extra_special_tokens": {},
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": model_max_length,
        "pad_token": PAD,
        "processor_class": "Llama4Processor",
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    _write_json(out / "tokenizer_config.json", config)
    _write_json(
        out / "special_tokens_map.json",
        {k: _added(config[k]) for k in ("bos_token", "eos_token", "pad_token")},
    )
    # The processor reads its chat template from chat_template.json; without it Llama4Processor
    # would fall back to the template built into transformers.
    _write_json(out / "chat_template.json", {"chat_template": CHAT_TEMPLATE})
    _write_json(
        out / "processor_config.json",
        {
            "fake_image_token": "<|image|>",
            "image_token": "<|image|>",
            "patch_size": 14,
            "pixel_shuffle_ratio": 0.5,
            "processor_class": "Llama4Processor",
        },
    )


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
