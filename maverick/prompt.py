"""From a chat (OpenAI message shape) or raw text, plus images, to the engine's `Prompt`.

Chat template -> token ids (the template writes the one BOS; special-token text in the messages
stays text unless the caller allows it) -> the prompt's length from the images' headers, refused
past the budget before any pixel is decoded -> each image decoded with limits, tiled, and its
`<|image|>` placeholder expanded into the Llama 4 image-token layout.

Image parts in messages may carry their bytes as a data URL
(`{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}`); parts without data
(`{"type": "image"}`) take the next image from `images`, in order. Nothing is fetched from a
network: an http(s) URL is an error.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence

from PIL import Image

from maverick.engine.api import ImageInput, Prompt
from maverick.image import (
    ImageError,
    ImageTokenIds,
    decode_image,
    expand_image_placeholders,
    image_token_count,
    open_image,
    preprocess,
)
from maverick.tokenizer import Tokenizer

MAX_IMAGES = 8  # per prompt; Meta tested up to 5
# Decoded pixels of all of a prompt's images: Llama 4 sees at most 16 tiles (1.8 Mpx) of each, so
# this only bounds the decoding work one request may ask for (eight 12 Mpx photos fit).
MAX_TOTAL_PIXELS = 100_000_000


class PromptTooLong(ValueError):
    """The prompt does not fit the model's context (the server answers INVALID_ARG)."""


def _part_bytes(part: dict) -> bytes | None:
    """The bytes a message image part carries, or None when it refers to a separately sent image."""
    url = part.get("image_url")
    url = url.get("url") if isinstance(url, dict) else url
    if url is None:
        return None
    if not isinstance(url, str) or not url.startswith("data:"):
        raise ImageError("image_url must be a data URL (data:image/...;base64,...); URLs are not fetched")
    header, _, payload = url.partition(",")
    if not header.endswith(";base64"):
        raise ImageError("image_url data URLs must be base64-encoded")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("image_url carries invalid base64 data") from None


def _open(images: Sequence[bytes | Image.Image]) -> list[Image.Image]:
    """Each image's header, checked; pixels are decoded later."""
    opened, total = [], 0
    for i, im in enumerate(images):
        try:
            opened.append(im if isinstance(im, Image.Image) else open_image(im))
        except ImageError as e:
            raise ImageError(f"image {i}: {e}") from None
        total += opened[-1].width * opened[-1].height
    if total > MAX_TOTAL_PIXELS:
        raise ImageError(f"the images have {total} pixels in all, more than the limit of {MAX_TOTAL_PIXELS}")
    return opened


def _decode(
    opened: Sequence[Image.Image], given: Sequence[bytes | Image.Image]
) -> list[tuple[ImageInput, tuple[int, int]]]:
    out = []
    for i, (im, source) in enumerate(zip(opened, given, strict=True)):
        try:  # an image given as pixels is used as it is
            processed = preprocess(source if isinstance(source, Image.Image) else decode_image(im))
        except ImageError as e:
            raise ImageError(f"image {i}: {e}") from None
        out.append((ImageInput.from_pixels(processed.pixel_values), processed.aspect_ratio))
    return out


def _with_images(
    tokenizer: Tokenizer,
    ids: list[int],
    images: Sequence[bytes | Image.Image],
    max_model_len: int | None,
) -> Prompt:
    """Prompt ids with one <|image|> per image -> the Prompt. Its length, from the images' headers,
    must leave one token of max_model_len to generate, or PromptTooLong before any pixel is decoded."""
    if len(images) > MAX_IMAGES:
        raise ImageError(f"{len(images)} images; at most {MAX_IMAGES} per prompt")
    layout = image_token_ids(tokenizer)
    placeholders = ids.count(layout.image)
    if placeholders != len(images):
        raise ImageError(f"prompt has {placeholders} <|image|> placeholders but {len(images)} images")
    opened = _open(images)
    if max_model_len is not None:
        n = len(ids) - len(images) + sum(image_token_count(im.height, im.width) for im in opened)
        if n >= max_model_len:  # the engine's rule, with the same message
            raise PromptTooLong(
                f"the prompt has {n} tokens; this model serves at most {max_model_len - 1} prompt tokens "
                f"(max_model_len {max_model_len}, one left to generate)"
            )
    processed = _decode(opened, images)
    ids = expand_image_placeholders(ids, [ar for _, ar in processed], layout)
    return Prompt(ids, tuple(img for img, _ in processed))


def build_prompt(
    tokenizer: Tokenizer,
    text: str,
    images: Sequence[bytes | Image.Image] = (),
    *,
    add_bos: bool = True,
    max_model_len: int | None = None,
) -> Prompt:
    """A raw prompt: `text` with one `<|image|>` per image, in order. The caller wrote its format,
    so special-token text in it is parsed."""
    ids = tokenizer.encode(text, add_bos=add_bos)
    return _with_images(tokenizer, ids, images, max_model_len)


def build_chat_prompt(
    tokenizer: Tokenizer,
    messages: Sequence[dict],
    images: Sequence[bytes | Image.Image] = (),
    *,
    system: str | None = None,
    tools: Sequence[dict] | None = None,
    allow_special_tokens: bool = False,
    max_model_len: int | None = None,
) -> Prompt:
    """A chat prompt with the assistant header appended, ready to generate the reply. Special-token
    text in the messages is plain text unless allow_special_tokens (trusted callers only). `tools`:
    OpenAI's function tools, listed in the system message (Tokenizer.render_chat)."""
    chat = tokenizer.render_chat(messages, add_generation_prompt=True, system=system, tools=tools)
    supplied = iter(images)
    ordered: list[bytes | Image.Image] = []
    for part in chat.images:
        data = _part_bytes(part)
        if data is None:
            data = next(supplied, None)
            if data is None:
                raise ImageError(
                    f"the messages have {len(chat.images)} image parts but only {len(images)} images"
                )
        ordered.append(data)
    leftover = sum(1 for _ in supplied)
    if leftover:
        raise ImageError(f"{leftover} image(s) given but the messages have no image part for them")
    ids = tokenizer.encode_chat(chat, allow_special_tokens)
    return _with_images(tokenizer, ids, ordered, max_model_len)


def image_token_ids(tokenizer: Tokenizer) -> ImageTokenIds:
    return ImageTokenIds(
        image_start=tokenizer.image_start_id,
        image_end=tokenizer.image_end_id,
        image=tokenizer.image_id,
        patch=tokenizer.patch_id,
        tile_x_sep=tokenizer.tile_x_separator_id,
        tile_y_sep=tokenizer.tile_y_separator_id,
    )
