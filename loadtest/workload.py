"""The requests a load test sends: chat prompts with chosen input and output length distributions,
optionally with images. Built once, seeded, into a JSON file that every side of a comparison reads
(the Locust users and loadtest/engine_direct.py), so they send the very same prompts.

Length specs (tokens):
    fixed:N            every request N
    uniform:LO:HI      uniform integers in [LO, HI]
    sharegpt[:MAX]     ShareGPT-like: log-normal (median 120 prompt / 150 output tokens, sigma
                       1.0 / 0.9: its long tail), clipped to [4, MAX]

Input length is the user message's text in tokens; the chat template adds a few more (the server
reports the real count). With a tokenizer (`--tokenizer DIR` holding tokenizer.json, e.g. the
served checkpoint) text is cut to that many tokens; without one, one word counts as one token.
Every request gets its own slice of text, so the server's prefix cache only ever shares the
system prompt, as it would with real users.

Output length is exact: requests go out with `max_tokens` = the drawn length and `ignore_eos`.
"""

from __future__ import annotations

import base64
import io
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

import maverick

CORPUS = Path(maverick.__file__).parent / "data" / "tokenizer_corpus.txt"
SYSTEM_PROMPT = "You are a helpful assistant. Answer in detail, in plain prose."
# name -> (input spec, output spec, share of requests with an image)
PRESETS = {
    "chat": ("uniform:32:256", "fixed:64", 0.0),
    "fixed": ("fixed:128", "fixed:64", 0.0),
    "sharegpt": ("sharegpt:1024", "sharegpt:256", 0.0),
    "vision": ("uniform:32:128", "fixed:32", 0.5),
}
SHAREGPT = {"input": (120, 1.0), "output": (150, 0.9)}  # (median tokens, sigma of the log)
NUM_IMAGES = 4  # distinct images in a workload; requests with an image pick one


@dataclass(frozen=True)
class Spec:
    input_len: str
    output_len: str
    image_share: float = 0.0
    image_size: tuple[int, int] = (336, 336)  # (width, height): one tile
    num_requests: int = 2000
    seed: int = 0
    temperature: float = 0.0
    stream: bool = True


def preset(name: str, **overrides) -> Spec:
    if name not in PRESETS:
        raise ValueError(f"unknown workload {name!r}; known: {', '.join(PRESETS)}")
    input_len, output_len, share = PRESETS[name]
    fields = {"input_len": input_len, "output_len": output_len, "image_share": share}
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return Spec(**fields)


def draw_lengths(spec: str, n: int, rng: np.random.Generator, side: str) -> list[int]:
    """n lengths from a length spec (see the module docstring); side is "input" or "output"."""
    kind, *args = spec.split(":")
    try:
        nums = [int(a) for a in args]
    except ValueError:
        raise ValueError(f"bad length spec {spec!r}: numbers expected after the kind") from None
    if kind == "fixed" and len(nums) == 1 and nums[0] >= 1:
        return [nums[0]] * n
    if kind == "uniform" and len(nums) == 2 and 1 <= nums[0] <= nums[1]:
        return rng.integers(nums[0], nums[1] + 1, size=n).tolist()
    if kind == "sharegpt" and len(nums) <= 1:
        cap = nums[0] if nums else 4096
        median, sigma = SHAREGPT[side]
        drawn = rng.lognormal(math.log(median), sigma, size=n)
        return np.clip(np.rint(drawn), 4, max(cap, 4)).astype(int).tolist()
    raise ValueError(f"bad length spec {spec!r}; use fixed:N, uniform:LO:HI or sharegpt[:MAX]")


class _Text:
    """Slices of the corpus, cut to a token count (or a word count without a tokenizer)."""

    def __init__(self, tokenizer_dir: Path | None):
        self.words = CORPUS.read_text().split()
        self.tok = None
        if tokenizer_dir is not None:
            import tokenizers

            self.tok = tokenizers.Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))

    def slice(self, start: int, tokens: int) -> str:
        words = [self.words[(start + i) % len(self.words)] for i in range(tokens)]  # never fewer tokens
        if self.tok is None:
            return " ".join(words)
        ids = self.tok.encode(" ".join(words), add_special_tokens=False).ids[:tokens]
        return self.tok.decode(ids)


def _png(width: int, height: int, seed: int) -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def build(spec: Spec, tokenizer_dir: Path | None = None) -> dict:
    """The workload: {"spec", "images" (PNG bytes), "requests" [{messages, max_tokens, image}]}."""
    rng = np.random.default_rng(spec.seed)
    n = spec.num_requests
    inputs = draw_lengths(spec.input_len, n, rng, "input")
    outputs = draw_lengths(spec.output_len, n, rng, "output")
    with_image = (rng.random(n) < spec.image_share).tolist()
    starts = rng.integers(0, 1 << 30, size=n).tolist()
    text = _Text(tokenizer_dir)
    images = (
        [_png(*spec.image_size, seed=spec.seed * 1000 + i) for i in range(NUM_IMAGES)]
        if any(with_image)
        else []
    )
    requests = []
    for i in range(n):
        body = text.slice(starts[i], inputs[i])
        content = f"Summarise this passage and continue it:\n\n{body}"
        image = i % NUM_IMAGES if with_image[i] else None
        if image is not None:
            content = [{"type": "image"}, {"type": "text", "text": content}]
        requests.append(
            {
                "messages": [
                    {"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": content},
                ],
                "max_tokens": outputs[i],
                "image": image,
            }
        )
    return {
        "spec": asdict(spec),
        "tokenizer": str(tokenizer_dir) if tokenizer_dir else None,
        "images": images,
        "requests": requests,
    }


def request_fields(workload: dict, request: dict) -> dict:
    """One request as the server's input fields ({input name: value}, messages as JSON text)."""
    spec = workload["spec"]
    fields = {
        "messages": json.dumps(request["messages"]),
        "max_tokens": request["max_tokens"],
        "temperature": spec["temperature"],
        "ignore_eos": True,
        "stream": spec["stream"],
        "return_num_input_tokens": True,  # TensorRT-LLM servers only count when asked
        "return_num_output_tokens": True,
    }
    if request["image"] is not None:
        fields["images"] = [workload["images"][request["image"]]]
    return fields


def save(workload: dict, path: Path) -> None:
    """As JSON, the images base64-encoded."""
    images = [base64.b64encode(b).decode() for b in workload["images"]]
    Path(path).write_text(json.dumps({**workload, "images": images}))


def load(path: Path) -> dict:
    workload = json.loads(Path(path).read_text())
    workload["images"] = [base64.b64decode(b) for b in workload["images"]]
    return workload
