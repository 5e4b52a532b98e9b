"""Llama 4 image input: decode bytes, tile and normalise the pixels, lay out the prompt's image tokens.

Preprocessing is Meta's, as shipped in transformers' `Llama4ImageProcessorFast` (`Llama4ImageProcessor`
in transformers 5; the oracle in tests/test_image.py), reproduced bit for bit:

1. Choose a canvas of rows x cols tiles (rows * cols <= max_tiles) that needs the least upscaling,
   or, when every canvas is smaller than the image, the least downscaling; ties go to the smallest.
2. Resize keeping the aspect ratio (bilinear, antialiased), never enlarging a side past
   max(that side, tile_size) unless `resize_to_max_canvas`.
3. Pad black on the bottom and right to the canvas; split it into tiles, row-major.
4. With more than one tile, append a global thumbnail: the whole image squashed to one tile.
5. Rescale by 1/255 and normalise with mean = std = 0.5, in bfloat16 like the original.

Only torch, numpy and Pillow are used at run time.
"""

from __future__ import annotations

import io
import math
import platform
import threading
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

TILE_SIZE = 336
MAX_TILES = 16
TOKENS_PER_TILE = 144  # (336 / 14)^2 = 576 patches per tile, pixel shuffle 0.5 keeps a quarter
MAX_PIXELS = 50_000_000  # ~8000 x 6000; decoded RGB is 3 bytes a pixel
MAX_BYTES = 32 << 20
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")  # JPEG includes multi-picture (MPO) files


class ImageError(ValueError):
    """An image we cannot use, with the reason in one line (the server answers INVALID_ARG)."""


# ---------------------------------------------------------------------------------------------- decoding


def load_image(data: bytes, *, max_pixels: int = MAX_PIXELS, max_bytes: int = MAX_BYTES) -> Image.Image:
    """Decode image bytes into an RGB image, as transformers' `load_image` does (EXIF rotation, then
    `convert("RGB")`: alpha is dropped, not composited). Animated formats give their first frame.

    The pixel count is checked from the header before any pixel is decoded.
    """
    return decode_image(open_image(data, max_pixels=max_pixels, max_bytes=max_bytes))


# Pillow's decompression-bomb warning is made an error while a header is read; catch_warnings
# changes the process's filters, so one thread at a time.
_HEADER_LOCK = threading.Lock()


def open_image(data: bytes, *, max_pixels: int = MAX_PIXELS, max_bytes: int = MAX_BYTES) -> Image.Image:
    """The image's header, checked: format, size and pixel count. No pixel is decoded yet: its
    `size` (before EXIF rotation, which does not change the tile count) is what the prompt's
    image tokens follow from (`image_token_count`)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageError(f"image must be bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise ImageError("image is empty (0 bytes)")
    if len(data) > max_bytes:
        raise ImageError(f"image is {len(data)} bytes, more than the limit of {max_bytes}")
    try:
        # Pillow warns (and past twice its limit raises) on huge headers; make both our error.
        with _HEADER_LOCK, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)  # reads the header only
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"image has more than the limit of {max_pixels} pixels ({exc})") from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"bytes are not an image in a supported format ({', '.join(FORMATS)})") from None
    except Exception as exc:  # a malformed header can raise anything from a plugin
        raise ImageError(f"cannot read the image header: {exc}") from None

    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageError(f"image has zero size ({width}x{height})")
    if width * height > max_pixels:
        raise ImageError(
            f"image is {width}x{height} = {width * height} pixels, more than the limit of {max_pixels}"
        )
    return image


def decode_image(image: Image.Image) -> Image.Image:
    """The pixels of an image from `open_image`: EXIF rotation applied, RGB."""
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
        return image if image.mode == "RGB" else image.convert("RGB")
    except Exception as exc:  # truncated or corrupt pixel data
        raise ImageError(
            f"cannot decode the {image.format} image ({image.width}x{image.height}): {exc}"
        ) from None


# ------------------------------------------------------------------------------------------ preprocessing


@dataclass(frozen=True)
class ProcessedImage:
    pixel_values: torch.Tensor  # [rows * cols (+1 thumbnail when rows * cols > 1), 3, tile, tile] float32
    aspect_ratio: tuple[int, int]  # (rows, cols) of tiles


def tile_grids(max_tiles: int) -> list[tuple[int, int]]:
    """Every (rows, cols) with rows * cols <= max_tiles."""
    return [(r, n // r) for n in range(1, max_tiles + 1) for r in range(1, n + 1) if n % r == 0]


def best_grid(
    height: int,
    width: int,
    *,
    tile_size: int = TILE_SIZE,
    max_tiles: int = MAX_TILES,
    resize_to_max_canvas: bool = False,
) -> tuple[int, int]:
    """(rows, cols) of the canvas an image of height x width is fitted into."""
    grids = torch.tensor(tile_grids(max_tiles))  # [N, 2] int64
    canvas = grids * tile_size
    # float32 like the reference, so that equal scales compare equal the same way.
    scales = torch.minimum(canvas[:, 0] / height, canvas[:, 1] / width)  # [N], the limiting side's scale
    upscales = scales[scales >= 1]
    if upscales.numel() > 0:
        chosen = upscales.max() if resize_to_max_canvas else upscales.min()
    else:
        chosen = scales.max()  # every canvas shrinks the image: shrink the least
    tied = grids[scales == chosen]
    rows, cols = tied[(tied[:, 0] * tied[:, 1]).argmin()].tolist()  # least padding
    return rows, cols


def _ratio(num: int, den: int, f32: bool) -> float:
    return np.float32(num) / np.float32(den) if f32 else num / den


def fit_size(
    height: int,
    width: int,
    canvas_h: int,
    canvas_w: int,
    *,
    tile_size: int = TILE_SIZE,
    resize_to_max_canvas: bool = False,
) -> tuple[int, int]:
    """The largest (h, w) with the image's aspect ratio inside the canvas; unless resize_to_max_canvas,
    a side is never enlarged past max(that side, tile_size)."""
    # The reference holds canvas sides as int64 tensors, so a ratio whose numerator is a canvas side is
    # float32 (and so is any comparison or product with it), the others float64. We keep the same
    # precisions so that floor() lands on the same pixel.
    bounds = []
    for side, canvas_side in ((height, canvas_h), (width, canvas_w)):
        cap = side if resize_to_max_canvas else max(side, tile_size)
        use_canvas = resize_to_max_canvas or canvas_side < cap
        bounds.append((canvas_side, True) if use_canvas else (cap, False))
    (bound_h, f32_h), (bound_w, f32_w) = bounds
    scale_h, scale_w = _ratio(bound_h, height, f32_h), _ratio(bound_w, width, f32_w)
    if f32_h or f32_w:
        width_limits = np.float32(scale_w) < np.float32(scale_h)
    else:
        width_limits = scale_w < scale_h
    if width_limits:
        new_h = min(math.floor(np.float32(height) * scale_w if f32_w else height * scale_w), bound_h)
        new_w = bound_w
    else:
        new_h = bound_h
        new_w = min(math.floor(np.float32(width) * scale_h if f32_h else width * scale_h), bound_w)
    return max(new_h, 1), max(new_w, 1)


def _native_uint8_bilinear() -> bool:
    # torchvision resizes uint8 natively on CPUs with a vectorised kernel and through float32 (then
    # rounds) elsewhere; the two differ by 1 on some pixels, so we follow the same rule.
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or platform.machine() in (
        "aarch64",
        "arm64",
    )


def _resize(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[1, 3, H, W] uint8 -> [1, 3, h, w] uint8, bilinear with antialias (half-pixel centres)."""
    if tuple(pixels.shape[-2:]) == size:
        return pixels
    if _native_uint8_bilinear():
        return F.interpolate(pixels, size=size, mode="bilinear", align_corners=False, antialias=True)
    out = F.interpolate(pixels.float(), size=size, mode="bilinear", align_corners=False, antialias=True)
    return out.round_().to(torch.uint8)


def _normalize(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 in [-1, 1]. The original rescales and normalises in bfloat16; so do we, so that
    the values are bit-identical and exact in the bf16 the vision tower runs in."""
    x = pixels.to(torch.bfloat16) * (1 / 255)
    return ((x - 0.5) / 0.5).float()


def preprocess(
    image: Image.Image,
    *,
    tile_size: int = TILE_SIZE,
    max_tiles: int = MAX_TILES,
    resize_to_max_canvas: bool = False,
) -> ProcessedImage:
    """Tile and normalise one image for the vision tower."""
    if tile_size < 1 or max_tiles < 1:
        raise ValueError(f"tile_size and max_tiles must be positive, got {tile_size} and {max_tiles}")
    if image.width < 1 or image.height < 1:
        raise ImageError(f"image has zero size ({image.width}x{image.height})")
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    pixels = torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).unsqueeze(0)  # [1, 3, H, W]
    height, width = pixels.shape[-2:]

    rows, cols = best_grid(
        height, width, tile_size=tile_size, max_tiles=max_tiles, resize_to_max_canvas=resize_to_max_canvas
    )
    canvas_h, canvas_w = rows * tile_size, cols * tile_size
    new_h, new_w = fit_size(
        height, width, canvas_h, canvas_w, tile_size=tile_size, resize_to_max_canvas=resize_to_max_canvas
    )
    resized = _resize(pixels, (new_h, new_w))
    canvas = F.pad(resized, (0, canvas_w - new_w, 0, canvas_h - new_h))  # black bottom/right
    tiles = (
        _normalize(canvas[0])  # [3, rows*T, cols*T]
        .view(3, rows, tile_size, cols, tile_size)
        .permute(1, 3, 0, 2, 4)  # [rows, cols, 3, T, T], row-major tiles
        .reshape(rows * cols, 3, tile_size, tile_size)
    )
    if rows * cols > 1:
        thumbnail = _normalize(_resize(pixels, (tile_size, tile_size)))  # [1, 3, T, T]
        tiles = torch.cat([tiles, thumbnail])
    return ProcessedImage(pixel_values=tiles, aspect_ratio=(rows, cols))


# ----------------------------------------------------------------------------------- prompt token layout


@dataclass(frozen=True)
class ImageTokenIds:
    """The special-token ids an image's prompt layout is made of."""

    image_start: int
    image_end: int
    image: int  # also the placeholder that marks where an image goes in the prompt
    patch: int
    tile_x_sep: int
    tile_y_sep: int

    @classmethod
    def llama4(cls) -> ImageTokenIds:
        """The ids in Llama 4's released vocabulary (the tiny checkpoint keeps the same offsets)."""
        return cls(
            image_start=200080,
            image_end=200081,
            image=200090,
            patch=200092,
            tile_x_sep=200084,
            tile_y_sep=200085,
        )

    @classmethod
    def from_vocab(cls, vocab: Mapping[str, int]) -> ImageTokenIds:
        names = dict(
            image_start="<|image_start|>",
            image_end="<|image_end|>",
            image="<|image|>",
            patch="<|patch|>",
            tile_x_sep="<|tile_x_separator|>",
            tile_y_sep="<|tile_y_separator|>",
        )
        missing = [token for token in names.values() if token not in vocab]
        if missing:
            raise ValueError(f"vocabulary lacks the image tokens {missing}")
        return cls(**{field: vocab[token] for field, token in names.items()})


def image_prompt_ids(
    aspect_ratio: tuple[int, int], ids: ImageTokenIds, tokens_per_tile: int = TOKENS_PER_TILE
) -> list[int]:
    """The ids that replace one <|image|> placeholder:
    <|image_start|> [rows of tiles: patches <|tile_x_separator|> ... patches <|tile_y_separator|>]
    <|image|> thumbnail patches <|image_end|>; a single tile has no tile rows (147 ids at 144/tile)."""
    rows, cols = aspect_ratio
    patches = [ids.patch] * tokens_per_tile
    out = [ids.image_start]
    if rows * cols > 1:
        for _ in range(rows):
            for col in range(cols):
                out += patches
                if col < cols - 1:
                    out.append(ids.tile_x_sep)
            out.append(ids.tile_y_sep)
    out += [ids.image, *patches, ids.image_end]
    return out


def image_token_count(
    height: int, width: int, *, max_tiles: int = MAX_TILES, tokens_per_tile: int = TOKENS_PER_TILE
) -> int:
    """How many ids `image_prompt_ids` lays out for an image of this size, from its size alone (a
    header's): the tile count decides it, and a rotated image takes the rotated grid, of as many
    tiles."""
    rows, cols = best_grid(height, width, max_tiles=max_tiles)
    tiles = rows * cols
    return tokens_per_tile + 3 + (tiles * (tokens_per_tile + 1) if tiles > 1 else 0)


def expand_image_placeholders(
    prompt_ids: Sequence[int],
    aspect_ratios: Sequence[tuple[int, int]],
    ids: ImageTokenIds,
    tokens_per_tile: int = TOKENS_PER_TILE,
) -> list[int]:
    """Replace each <|image|> placeholder, in order, with the layout of the matching image."""
    placeholders = sum(1 for t in prompt_ids if t == ids.image)
    if placeholders != len(aspect_ratios):
        raise ImageError(f"prompt has {placeholders} <|image|> placeholders but {len(aspect_ratios)} images")
    out: list[int] = []
    images = iter(aspect_ratios)
    for token in prompt_ids:
        if token == ids.image:
            out += image_prompt_ids(next(images), ids, tokens_per_tile)
        else:
            out.append(token)
    return out


# ----------------------------------------------------------------------------------- checkpoint metadata


def image_processor_config() -> dict:
    """preprocessor_config.json as in the Llama 4 release."""
    return {
        "crop_size": None,
        "data_format": "channels_first",
        "default_to_square": True,
        "device": None,
        "do_center_crop": None,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_processor_type": "Llama4ImageProcessorFast",
        "image_std": [0.5, 0.5, 0.5],
        "input_data_format": None,
        "max_patches": MAX_TILES,
        "processor_class": "Llama4Processor",
        "resample": 2,  # PIL.Image.BILINEAR
        "rescale_factor": 1 / 255,
        "resize_to_max_canvas": False,
        "return_tensors": None,
        "size": {"height": TILE_SIZE, "width": TILE_SIZE},
    }
