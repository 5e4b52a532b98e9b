"""From a chat (OpenAI message shape) or raw text, plus images, to the engine's `Prompt`.

Chat template -> token ids (the template writes the one BOS) -> each image decoded with limits,
tiled, and its `<|image|>` placeholder expanded into the Llama 4 image-token layout.

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
from maverick.image import ImageError, ImageTokenIds, expand_image_placeholders, load_image, preprocess
from maverick.tokenizer import Tokenizer

MAX_IMAGES = 8  # per prompt; Meta tested up to 5


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


def image_inputs(images: Sequence[bytes | Image.Image]) -> list[tuple[ImageInput, tuple[int, int]]]:
    out = []
    for i, im in enumerate(images):
        try:
            pil = im if isinstance(im, Image.Image) else load_image(im)
            processed = preprocess(pil)
        except ImageError as e:
            raise ImageError(f"image {i}: {e}") from None
        out.append((ImageInput.from_pixels(processed.pixel_values), processed.aspect_ratio))
    return out


def build_prompt(
    tokenizer: Tokenizer, text: str, images: Sequence[bytes | Image.Image] = (), *, add_bos: bool = True
) -> Prompt:
    """A raw prompt: `text` with one `<|image|>` per image, in order."""
    if len(images) > MAX_IMAGES:
        raise ImageError(f"{len(images)} images; at most {MAX_IMAGES} per prompt")
    processed = image_inputs(images)
    ids = tokenizer.encode(text, add_bos=add_bos)
    ids = expand_image_placeholders(ids, [ar for _, ar in processed], image_token_ids(tokenizer))
    return Prompt(ids, tuple(img for img, _ in processed))


def build_chat_prompt(
    tokenizer: Tokenizer,
    messages: Sequence[dict],
    images: Sequence[bytes | Image.Image] = (),
    *,
    system: str | None = None,
) -> Prompt:
    """A chat prompt with the assistant header appended, ready to generate the reply."""
    chat = tokenizer.render_chat(messages, add_generation_prompt=True, system=system)
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
    return build_prompt(tokenizer, chat.text, ordered, add_bos=False)


def image_token_ids(tokenizer: Tokenizer) -> ImageTokenIds:
    return ImageTokenIds(
        image_start=tokenizer.image_start_id,
        image_end=tokenizer.image_end_id,
        image=tokenizer.image_id,
        patch=tokenizer.patch_id,
        tile_x_sep=tokenizer.tile_x_separator_id,
        tile_y_sep=tokenizer.tile_y_separator_id,
    )
