"""maverick.image against transformers' Llama 4 image processor and processor (the oracle).

Images are generated here (seeded noise over gradients); nothing is downloaded.
"""

from __future__ import annotations

import base64
import io
import json
import random
import re
import struct
import zlib
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from maverick import image as mi
from maverick.image import (
    ImageError,
    ImageTokenIds,
    best_grid,
    decode_image,
    expand_image_placeholders,
    fit_size,
    image_processor_config,
    image_prompt_ids,
    image_token_count,
    load_image,
    open_image,
    preprocess,
)

transformers = pytest.importorskip("transformers")
pytest.importorskip("torchvision")


def make_rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    """[H, W, 3] uint8: gradients (structure that resizing must keep) plus seeded noise."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :]
    ones = np.ones((height, width), dtype=np.float32)
    base = np.stack([255 * y * ones, 255 * x * ones, 127 + 120 * np.sin(9 * (x + y))], -1)
    noise = rng.normal(0, 30, (height, width, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def make_image(height: int, width: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rgb = Image.fromarray(make_rgb(height, width, seed))
    if mode == "RGBA":
        alpha = np.random.default_rng(seed + 1).integers(0, 256, (height, width), dtype=np.uint8)
        return Image.merge("RGBA", (*rgb.split(), Image.fromarray(alpha)))
    if mode == "P":
        return rgb.quantize(colors=64, method=Image.Quantize.MEDIANCUT)
    return rgb.convert(mode)


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    """Llama4ImageProcessorFast as AutoImageProcessor builds it from our preprocessor_config.json."""
    d = tmp_path_factory.mktemp("image_processor")
    (d / "preprocessor_config.json").write_text(json.dumps(image_processor_config()))
    return transformers.AutoImageProcessor.from_pretrained(d)


def oracle_tiles(oracle, image: Image.Image, **kwargs) -> tuple[torch.Tensor, tuple[int, int]]:
    out = oracle(image, return_tensors="pt", **kwargs)
    return out["pixel_values"], tuple(out["aspect_ratios"][0].tolist())


# ------------------------------------------------------------------------------------------ configuration


def test_config_loads_as_the_release_processor(oracle):
    assert type(oracle).__name__ in ("Llama4ImageProcessor", "Llama4ImageProcessorFast")
    assert oracle.size["height"] == oracle.size["width"] == mi.TILE_SIZE
    assert oracle.max_patches == mi.MAX_TILES and oracle.resize_to_max_canvas is False
    assert list(oracle.image_mean) == list(oracle.image_std) == [0.5, 0.5, 0.5]
    assert oracle.rescale_factor == 1 / 255 and int(oracle.resample) == 2
    assert oracle.do_convert_rgb and oracle.do_resize and oracle.do_rescale and oracle.do_normalize


# ------------------------------------------------------------------------------------------ pixel values

CASES = [  # (height, width, mode)
    (7, 5, "RGB"),  # tiny: upscaled to one tile
    (3000, 4000, "RGB"),  # huge: 3 x 4 tiles, strong downscale
    (900, 400, "RGB"),  # portrait
    (400, 900, "RGB"),  # landscape
    (336, 336, "RGB"),  # exactly one tile, no resize
    (672, 1008, "RGB"),  # exactly 2 x 3 tiles, no resize
    (1, 2000, "RGB"),  # extreme aspect: the resized height floors to 1 pixel
    (2000, 1, "RGB"),
    (337, 335, "RGB"),  # one pixel over a tile
    (500, 700, "RGBA"),  # alpha is dropped, not composited
    (600, 450, "L"),
    (350, 800, "P"),
    (200, 300, "LA"),
    (3355, 1232, "RGB"),  # float32 vs float64 floor() differ here: the reference's precision matters
]


@pytest.mark.parametrize("height,width,mode", CASES)
def test_pixels_equal_oracle(oracle, height, width, mode):
    image = make_image(height, width, mode)
    ref, ref_ratio = oracle_tiles(oracle, image)
    ours = preprocess(image)
    assert ours.aspect_ratio == ref_ratio
    assert ours.pixel_values.dtype == torch.float32
    assert ours.pixel_values.shape == ref.shape
    assert torch.equal(ours.pixel_values, ref.float())  # bit-identical


def test_pixels_equal_oracle_resize_to_max_canvas(oracle):
    image = make_image(250, 180)
    ref, ref_ratio = oracle_tiles(oracle, image, resize_to_max_canvas=True)
    ours = preprocess(image, resize_to_max_canvas=True)
    assert ours.aspect_ratio == ref_ratio == (5, 3)  # 15 tiles: the largest scale, 5.6
    assert torch.equal(ours.pixel_values, ref.float())


def test_pixels_equal_oracle_without_native_uint8_resize(oracle, monkeypatch):
    # CPUs without AVX2 (and GPUs) resize through float32 and round; both sides must switch together.
    from torchvision.transforms.v2.functional import _geometry

    monkeypatch.setattr(_geometry, "_do_native_uint8_resize_on_cpu", lambda interpolation: False)
    monkeypatch.setattr(mi, "_native_uint8_bilinear", lambda: False)
    image = make_image(555, 777)
    ref, _ = oracle_tiles(oracle, image)
    assert torch.equal(preprocess(image).pixel_values, ref.float())


def test_tiles_are_row_major_and_padding_black():
    # 336 x 504 fits a 1 x 2 canvas with no resize: tile 0 is the left 336 columns, tile 1 the rest
    # padded black on the right.
    image = make_image(336, 504)
    out = preprocess(image)
    assert out.aspect_ratio == (1, 2) and out.pixel_values.shape == (3, 3, 336, 336)
    pixels = torch.from_numpy(make_rgb(336, 504)).permute(2, 0, 1)
    expected_left = mi._normalize(pixels[:, :, :336])
    assert torch.equal(out.pixel_values[0], expected_left)
    assert torch.equal(out.pixel_values[1, :, :, :168], mi._normalize(pixels[:, :, 336:]))
    assert bool((out.pixel_values[1, :, :, 168:] == -1).all())  # black is -1 after normalisation


def test_canvas_choice_equals_oracle_on_many_sizes():
    # The size arithmetic alone (no pixels), against the oracle's own functions, on random sizes.
    from transformers.image_utils import SizeDict
    from transformers.models.llama4 import image_processing_llama4 as ref

    resolutions = torch.tensor(ref.find_supported_resolutions(16, SizeDict(height=336, width=336)))
    rng = random.Random(0)
    sizes = [(464, 5017), (3355, 1232), (1, 1), (1, 100_000), (336, 337)]
    sizes += [(rng.randint(1, 6000), rng.randint(1, 6000)) for _ in range(1500)]
    sizes += [(rng.randint(1, 700), rng.randint(1, 700)) for _ in range(1500)]
    for i, (h, w) in enumerate(sizes):
        to_max = i % 4 == 3
        canvas = ref.get_best_fit((h, w), resolutions, resize_to_max_canvas=to_max)
        bound = canvas if to_max else (min(max(h, 336), canvas[0]), min(max(w, 336), canvas[1]))
        want_h, want_w = ref.get_max_res_without_distortion((h, w), bound)
        rows, cols = best_grid(h, w, resize_to_max_canvas=to_max)
        assert (rows * 336, cols * 336) == tuple(canvas.tolist()), (h, w)
        got = fit_size(h, w, rows * 336, cols * 336, resize_to_max_canvas=to_max)
        assert got == (max(int(want_h), 1), max(int(want_w), 1)), (h, w, to_max)


def test_preprocess_rejects_zero_size():
    with pytest.raises(ImageError, match="zero size"):
        preprocess(Image.new("RGB", (0, 5)))


# ------------------------------------------------------------------------------------------ decoding


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


@pytest.mark.parametrize(
    "mode,fmt",
    [
        ("RGB", "PNG"),
        ("RGBA", "PNG"),
        ("L", "PNG"),
        ("P", "PNG"),
        ("RGB", "JPEG"),
        ("RGBA", "WEBP"),
        ("P", "GIF"),
        ("RGB", "BMP"),
    ],
)
def test_load_image_equals_transformers_load_image(mode, fmt):
    data = encode(make_image(40, 60, mode), fmt)
    ours = load_image(data)
    ref = transformers.image_utils.load_image(base64.b64encode(data).decode())
    assert ours.mode == "RGB" and ours.size == (60, 40)
    assert np.array_equal(np.asarray(ours), np.asarray(ref))


def test_load_image_applies_exif_orientation():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = encode(make_image(40, 60), "JPEG", exif=exif)
    ours = load_image(data)
    ref = transformers.image_utils.load_image(base64.b64encode(data).decode())
    assert ours.size == (40, 60)
    assert np.array_equal(np.asarray(ours), np.asarray(ref))


def test_load_image_gif_takes_first_frame():
    frames = [make_image(30, 20, "P", seed=s) for s in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    ours = load_image(buf.getvalue())
    assert np.array_equal(np.asarray(ours), np.asarray(frames[0].convert("RGB")))


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height but carries a few bytes of pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


@pytest.mark.parametrize(
    "data,message",
    [
        (b"", "empty"),
        (b"hello, this is text and not a picture", "not an image"),
        (b"%PDF-1.4\n" + b"\0" * 100, "not an image"),
        (png_header(0, 5), "not an image"),  # Pillow refuses zero-size headers as unidentifiable
        (png_header(100_000, 100_000), "limit"),  # past twice Pillow's limit: its DecompressionBombError
        (png_header(10_000, 10_000), "limit"),  # past Pillow's limit: its DecompressionBombWarning
        (png_header(9_000, 9_000), "9000x9000 = 81000000 pixels"),  # under Pillow's, over ours
    ],
)
def test_bad_images_are_clear_errors(data, message):
    with pytest.raises(ImageError, match=message):
        load_image(data)


def test_truncated_images_are_clear_errors():
    image = make_image(200, 300)
    for fmt in ("PNG", "JPEG"):
        data = encode(image, fmt)
        with pytest.raises(ImageError, match=f"cannot decode the {fmt} image"):
            load_image(data[: len(data) // 2])


def test_limits_are_parameters():
    data = encode(make_image(40, 60), "PNG")
    with pytest.raises(ImageError, match="2400 pixels, more than the limit of 2399"):
        load_image(data, max_pixels=2399)
    with pytest.raises(ImageError, match="bytes, more than the limit of 10"):
        load_image(data, max_bytes=10)
    assert load_image(data, max_pixels=2400).size == (60, 40)


def test_open_image_reads_the_header_only():
    # a 6000 x 4000 PNG header with 64 bytes of pixel data: opened at once, failing only to decode
    opened = open_image(png_header(6000, 4000))
    assert opened.size == (6000, 4000)
    with pytest.raises(ImageError, match="cannot decode the PNG image"):
        decode_image(opened)
    data = encode(make_image(40, 60), "PNG")
    assert np.array_equal(np.asarray(decode_image(open_image(data))), np.asarray(load_image(data)))


# ------------------------------------------------------------------------------------------ prompt layout

IDS = ImageTokenIds(image_start=1, image_end=2, image=3, patch=4, tile_x_sep=5, tile_y_sep=6)


def test_layout_single_tile():
    assert image_prompt_ids((1, 1), IDS) == [1, 3] + [4] * 144 + [2]


def test_layout_grid():
    ids = image_prompt_ids((2, 3), IDS, tokens_per_tile=2)
    row = [4, 4, 5, 4, 4, 5, 4, 4, 6]
    assert ids == [1] + row + row + [3, 4, 4, 2]
    assert len(image_prompt_ids((2, 2), IDS)) == 727
    assert len(image_prompt_ids((4, 4), IDS)) == 2467


def test_token_count_from_the_size_alone():
    """What the header's size promises is what the decoded image lays out, also when its EXIF
    orientation turns it (the grid turns with it, with as many tiles)."""
    rng = random.Random(3)
    sizes = [(1, 1), (336, 336), (337, 336), (400, 300), (7000, 7000), (1, 100_000), (5017, 464)]
    sizes += [(rng.randint(1, 6000), rng.randint(1, 6000)) for _ in range(300)]
    for h, w in sizes:
        n = len(image_prompt_ids(best_grid(h, w), IDS))
        assert image_token_count(h, w) == image_token_count(w, h) == n, (h, w)
    for h, w in [(40, 700), (300, 900)]:
        exif = Image.Exif()
        exif[0x0112] = 6  # displayed turned: the decoded image is w x h
        data = encode(make_image(h, w), "JPEG", exif=exif)
        turned = preprocess(load_image(data))
        assert turned.aspect_ratio == best_grid(w, h)
        header = open_image(data)
        assert image_token_count(header.height, header.width) == len(
            image_prompt_ids(turned.aspect_ratio, IDS)
        )


def test_expand_placeholders():
    prompt = [9, 3, 8, 3, 7]
    out = expand_image_placeholders(prompt, [(1, 1), (1, 2)], IDS, tokens_per_tile=1)
    assert out == [9, 1, 3, 4, 2, 8, 1, 4, 5, 4, 6, 3, 4, 2, 7]
    with pytest.raises(ImageError, match=re.escape("2 <|image|> placeholders but 1 images")):
        expand_image_placeholders(prompt, [(1, 1)], IDS)
    with pytest.raises(ImageError, match=re.escape("0 <|image|> placeholders but 1 images")):
        expand_image_placeholders([9], [(1, 1)], IDS)


def test_llama4_ids_are_the_release_offsets():
    ids = ImageTokenIds.llama4()
    assert (ids.image_start, ids.image_end, ids.tile_x_sep, ids.tile_y_sep, ids.image, ids.patch) == (
        200080,
        200081,
        200084,
        200085,
        200090,
        200092,
    )


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    tiny_tokenizer = pytest.importorskip("maverick.tiny_tokenizer")
    d = tmp_path_factory.mktemp("processor")
    tiny_tokenizer.write_tokenizer(d)
    (d / "preprocessor_config.json").write_text(json.dumps(image_processor_config()))
    if not (d / "processor_config.json").exists():
        (d / "processor_config.json").write_text(json.dumps({"processor_class": "Llama4Processor"}))
    return transformers.AutoProcessor.from_pretrained(d)


@pytest.mark.parametrize("sizes", [[(300, 200)], [(900, 400), (120, 1500)]])
def test_prompt_equals_processor(processor, sizes):
    images = [make_image(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": "What differs here?"}]
    text = processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    ref = processor(text=text, images=images, add_special_tokens=False, return_tensors="pt")

    ids = ImageTokenIds.from_vocab(processor.tokenizer.get_vocab())
    base = 2000  # the tiny vocabulary's specials start at base_vocab_size, at the release's offsets
    assert ids == replace(
        ImageTokenIds.llama4(),
        **{f: getattr(ImageTokenIds.llama4(), f) - 200_000 + base for f in ids.__dataclass_fields__},
    )
    prompt = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    processed = [preprocess(image) for image in images]
    ours = expand_image_placeholders(prompt, [p.aspect_ratio for p in processed], ids)
    assert ours == ref["input_ids"][0].tolist()
    assert torch.equal(torch.cat([p.pixel_values for p in processed]), ref["pixel_values"].float())
