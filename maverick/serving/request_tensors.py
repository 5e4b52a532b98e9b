"""A checked request on its way from preprocessing to the `maverick` step, as tensors (a row per
prompt of a batched request): `input_ids` (right-padded), `pixel_values` (all tiles of all images),
`image_tiles` (tiles per image) and `request`, a JSON string with the sampling parameters, the
response options, and how many of the row's ids and images are the prompt's. A direct caller of
`maverick` writes these too, so reading them checks everything (`InvalidRequest`).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import torch

from maverick.engine.api import ImageInput, Prompt, SamplingParams
from maverick.serving.request import MAX_BATCH, GenerateRequest, InvalidRequest, ResponseOptions


def to_tensors(*reqs: GenerateRequest) -> dict[str, np.ndarray]:
    """Batch-k tensors for the `maverick` step, one row per request: input_ids [k, longest]
    (right-padded with 0), pixel_values [k, most tiles, 3, 336, 336] and image_tiles [k, most
    images] (zero-padded), request [k, 1]; each request's JSON says how many ids and images are its."""
    pixels, tiles, metas = [], [], []
    for req in reqs:
        images = req.prompt.images
        pixels.append(
            torch.cat([im.pixel_values for im in images]).numpy()
            if images
            else np.zeros((0, 3, 336, 336), dtype=np.float32)
        )
        tiles.append([im.num_tiles for im in images])
        meta = {
            "sampling": dataclasses.asdict(req.params),
            "options": dataclasses.asdict(req.options),
            "num_tokens": len(req.prompt.token_ids),
            "num_images": len(images),
        }
        metas.append([json.dumps(meta).encode()])
    ids = np.zeros((len(reqs), max(len(r.prompt.token_ids) for r in reqs)), dtype=np.int32)
    image_tiles = np.zeros((len(reqs), max(map(len, tiles))), dtype=np.int32)
    pixel_values = np.zeros((len(reqs), max(len(p) for p in pixels), 3, 336, 336), dtype=np.float32)
    for b, req in enumerate(reqs):
        ids[b, : len(req.prompt.token_ids)] = req.prompt.token_ids
        image_tiles[b, : len(tiles[b])] = tiles[b]
        pixel_values[b, : len(pixels[b])] = pixels[b]
    return {
        "input_ids": ids,
        "pixel_values": pixel_values,
        "image_tiles": image_tiles,
        "request": np.array(metas, dtype=object),
    }


def from_tensors(t: dict[str, np.ndarray]) -> list[GenerateRequest]:
    """Inverse of to_tensors: the batch's requests, in order."""
    shapes = {name: arr.shape for name, arr in t.items()}
    sizes = {s[0] if s else 0 for s in shapes.values()}
    if any(len(s) < 2 for s in shapes.values()) or len(sizes) != 1 or 0 in sizes or t["request"].size == 0:
        raise InvalidRequest(f"malformed request tensors: shapes {shapes}")
    return [_from_row({name: arr[b] for name, arr in t.items()}) for b in range(t["request"].shape[0])]


def _check_options(o: ResponseOptions) -> None:
    """ResponseOptions as a direct caller of `maverick` may have written them (preprocessing's
    are right): types and ranges, so that nothing odd reaches the packed responses."""
    flags = (o.stream, o.default_max_tokens, o.flow_control, o.return_num_input_tokens,
             o.return_num_output_tokens, o.return_perf_metrics)  # fmt: skip
    if not all(isinstance(f, bool) for f in flags):
        raise ValueError("the response options' flags must be booleans")
    if o.echo_text is not None and not isinstance(o.echo_text, str):
        raise ValueError("echo_text must be a string or null")
    sizes = (o.batch_index, o.batch_size)
    if not all(type(v) is int for v in sizes) or not 0 <= o.batch_index < o.batch_size <= MAX_BATCH:
        raise ValueError(f"batch_index / batch_size must be integers, 0 <= index < size <= {MAX_BATCH}")


def _from_row(t: dict[str, np.ndarray]) -> GenerateRequest:
    try:
        meta = json.loads(bytes(t["request"].reshape(-1)[0]).decode())
        params = SamplingParams(**meta["sampling"])
        options = ResponseOptions(**meta["options"])
        num_tokens, num_images = int(meta["num_tokens"]), int(meta["num_images"])
        _check_options(options)
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as e:
        raise InvalidRequest(f"malformed request tensor: {e}") from None
    except RecursionError:  # JSON nested deeper than the interpreter recurses
        raise InvalidRequest("malformed request tensor: nested too deeply") from None
    ids, all_tiles = t["input_ids"].reshape(-1), t["image_tiles"].reshape(-1)
    if not (0 < num_tokens <= ids.size and 0 <= num_images <= all_tiles.size):
        raise InvalidRequest(f"malformed request tensor: {num_tokens} ids and {num_images} images do not fit")
    tiles = all_tiles[:num_images].tolist()
    if any(n < 1 for n in tiles):
        raise InvalidRequest(f"image_tiles must be positive tile counts, got {tiles}")
    pixels = torch.from_numpy(np.ascontiguousarray(t["pixel_values"][: sum(tiles)]))
    if sum(tiles) != pixels.shape[0]:
        raise InvalidRequest(
            f"image_tiles add up to {sum(tiles)} but pixel_values has {pixels.shape[0]} tiles"
        )
    images = tuple(ImageInput.from_pixels(p) for p in pixels.split(tiles)) if tiles else ()
    return GenerateRequest(Prompt(ids[:num_tokens].tolist(), images), params, options)
