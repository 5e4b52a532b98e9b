"""Our Llama 4 against transformers' on the same tiny checkpoint, fp32.

Prompts are longer than three attention chunks (the tiny model's chunk is 32 tokens), one of them
with two images of different tile grids. Logits must match at every position and 32 greedy tokens
must be identical, whether a prompt runs alone, packed with others into one flat batch, in
prefill chunks, or decoding one token at a time through the paged cache next to other sequences.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from paged import PagedDriver
from PIL import Image
from transformers import AutoProcessor

from maverick.image import preprocess

NEW_TOKENS = 32
# |ours - transformers| / max|transformers logit|. Measured ~1e-6; the bound leaves room for BLAS order.
REL_TOL = 1e-5


def _image(h: int, w: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) % 256], axis=-1)
    noise = rng.integers(0, 60, size=(h, w, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def processor(tiny_ckpt):
    return AutoProcessor.from_pretrained(tiny_ckpt)


@pytest.fixture(scope="module")
def text_prompt(processor) -> list[int]:
    messages = [
        {"role": "system", "content": "You are a terse assistant. Answer in one short paragraph."},
        {
            "role": "user",
            "content": "Explain how a paged KV cache works, why blocks help batching, and what "
            "chunked local attention changes about which keys a query can see. Give an example with numbers: "
            "say 4,096 tokens in blocks of 16, a chunk of 8,192, and twelve requests of mixed lengths. Then "
            "list three ways a scheduler could starve a long prompt, and how to avoid each one.",
        },
    ]
    ids = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    ids = list(ids["input_ids"][0] if isinstance(ids["input_ids"][0], list) else ids["input_ids"])
    assert len(ids) > 3 * 32
    return ids


@pytest.fixture(scope="module")
def image_prompt(processor):
    images = [_image(500, 300, 0), _image(200, 700, 1)]  # 2x1 and 1x3 tile grids (+ thumbnails)
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "text", "text": "and"},
                {"type": "image"},
                {"type": "text", "text": "Compare the two pictures."},
            ],
        }
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    batch = processor(text=text, images=images, return_tensors="pt", add_special_tokens=False)
    ids = batch["input_ids"][0].tolist()
    ours = torch.cat([preprocess(im).pixel_values for im in images])
    assert torch.equal(ours, batch["pixel_values"].float()), "our tiling differs from transformers'"
    return ids, batch["pixel_values"].float(), ours


@pytest.fixture(scope="module")
def ref_outputs(reference, text_prompt, image_prompt):
    """transformers: full prompt logits and 32 greedy tokens for both prompts."""
    out = {}
    with torch.no_grad():
        for name, ids, pixels in (("text", text_prompt, None), ("image", image_prompt[0], image_prompt[1])):
            input_ids = torch.tensor([ids])
            logits = reference(input_ids=input_ids, pixel_values=pixels, use_cache=False).logits[0]
            gen = reference.generate(
                input_ids=input_ids,
                pixel_values=pixels,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                do_sample=False,
                pad_token_id=0,
            )
            out[name] = (logits, gen[0, len(ids) :].tolist())
    return out


def _assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    err = (ours - ref).abs().max().item() / ref.abs().max().item()
    print(f"relative logit error {err:.2e} over {tuple(ref.shape)}")
    assert err <= REL_TOL, f"relative logit error {err:.2e} > {REL_TOL:.0e}"
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_prompt_logits_match_transformers(ours_fp32, text_prompt, image_prompt, ref_outputs):
    image_ids, _, pixels = image_prompt
    driver = PagedDriver(ours_fp32)
    (text_logits,) = driver.step([("t", text_prompt, None)])
    _assert_close(text_logits, ref_outputs["text"][0])
    (image_logits,) = driver.step([("i", image_ids, ours_fp32.encode_images(pixels))])
    _assert_close(image_logits, ref_outputs["image"][0])


def test_packed_flat_batch_matches_transformers(ours_fp32, text_prompt, image_prompt, ref_outputs):
    """Both prompts and a second copy of the text prompt fed in different chunk schedules, all packed."""
    image_ids, _, pixels = image_prompt
    embeds = ours_fp32.encode_images(pixels)
    driver = PagedDriver(ours_fp32, num_blocks=256)
    patch = ours_fp32.config.image_token_id
    cut_t, cut_i = 45, 200  # mid-chunk; the image cut lands inside the first image's patches
    n_img = sum(t == patch for t in image_ids[:cut_i])
    first = driver.step(
        [("a", text_prompt, None), ("b", text_prompt[:cut_t], None), ("c", image_ids[:cut_i], embeds[:n_img])]
    )
    second = driver.step([("c", image_ids[cut_i:], embeds[n_img:]), ("b", text_prompt[cut_t:], None)])
    _assert_close(first[0], ref_outputs["text"][0])
    _assert_close(torch.cat([first[1], second[1]]), ref_outputs["text"][0])
    _assert_close(torch.cat([first[2], second[0]]), ref_outputs["image"][0])


@pytest.mark.parametrize("prefill_chunk", [None, 20])
def test_greedy_decode_matches_transformers(ours_fp32, text_prompt, image_prompt, ref_outputs, prefill_chunk):
    image_ids, _, pixels = image_prompt
    driver = PagedDriver(ours_fp32, num_blocks=256)
    assert driver.greedy("t", text_prompt, NEW_TOKENS, prefill_chunk=prefill_chunk) == ref_outputs["text"][1]
    got = driver.greedy(
        "i", image_ids, NEW_TOKENS, ours_fp32.encode_images(pixels), prefill_chunk=prefill_chunk
    )
    assert got == ref_outputs["image"][1]


def test_concurrent_decode_in_one_batch(ours_fp32, text_prompt, image_prompt, ref_outputs):
    """Two sequences decode side by side, one token each per step, sharing the flat batch."""
    image_ids, _, pixels = image_prompt
    driver = PagedDriver(ours_fp32, num_blocks=256)
    logits = driver.step([("t", text_prompt, None), ("i", image_ids, ours_fp32.encode_images(pixels))])
    toks = {"t": [int(logits[0][-1].argmax())], "i": [int(logits[1][-1].argmax())]}
    for _ in range(NEW_TOKENS - 1):
        step = driver.step([(sid, [seq[-1]], None) for sid, seq in toks.items()])
        for seq, lg in zip(toks.values(), step, strict=True):
            seq.append(int(lg[-1].argmax()))
    assert toks["t"] == ref_outputs["text"][1]
    assert toks["i"] == ref_outputs["image"][1]


def test_rope_matches_the_complex_form():
    """apply_rope's interleaved-table form rotates exactly as (a + ib)(cos + i sin) written out,
    and as transformers' complex-number apply_rotary_emb (to rounding)."""
    from transformers.models.llama4.modeling_llama4 import apply_rotary_emb

    from maverick.layers.rope import apply_rope, rope_cos_sin, rotation_tables

    g = torch.Generator().manual_seed(0)
    positions = torch.tensor([0, 1, 5, 31, 32, 1000, 70000])
    x = torch.randn(len(positions), 6, 32, generator=g) * 3  # [T, heads, head_dim]
    cos, sin = rope_cos_sin(positions, 32, 500000.0)  # [T, 16]
    got = apply_rope(x, *rotation_tables(cos, sin))
    a, b = x[..., 0::2], x[..., 1::2]
    c, s = cos[:, None], sin[:, None]
    assert torch.equal(got, torch.stack((a * c - b * s, a * s + b * c), dim=-1).flatten(-2))
    freqs_cis = torch.polar(torch.ones_like(cos), torch.atan2(sin, cos))[None]  # [1, T, 16]
    want, _ = apply_rotary_emb(x[None], x[None], freqs_cis)
    assert (got - want[0]).abs().max() <= 1e-5
    bf16 = apply_rope(x.bfloat16(), *rotation_tables(cos, sin))
    assert bf16.dtype == torch.bfloat16 and (bf16.float() - got).abs().max() <= 0.1
