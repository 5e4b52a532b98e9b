"""An fp32 copy of a checkpoint in transformers' own layout, for engines that cannot read ours.

vLLM's CPU path (scripts/bench_peer.py's peer) cannot run compressed-tensors FP8 experts; it loads
the bf16 release's layout (`feed_forward.experts.gate_up_proj` / `down_proj`, fused) in fp32. The
copy is the FP8 checkpoint with every expert dequantized (weight × weight_scale per row), fused and
written by transformers' `save_pretrained`: the same numbers that tests/reference.py's oracle runs.

    .venv/bin/python scripts/fused_copy.py SRC DST
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
STAMP = "fused_copy_source.json"  # what the copy was made from, to remake it when that changes
# Everything but the weights, config.json and the shard index (save_pretrained writes those):
# tokenizer, chat template, image processor, generation defaults.
SIDE_FILES = ("*.json", "*.jinja", "*.model", "*.txt")


def source_id(src: Path) -> str:
    """Identifies the source's contents cheaply: its config and index, and each weight file's name,
    size and modification time (hashing the weights would take minutes on the real checkpoint)."""
    h = hashlib.sha256()
    for f in sorted(src.iterdir()):
        if f.suffix == ".safetensors":
            st = f.stat()
            h.update(f"{f.name} {st.st_size} {st.st_mtime_ns}\n".encode())
        elif f.name in ("config.json", "model.safetensors.index.json"):
            h.update(f.name.encode() + b"\n" + f.read_bytes())
    return h.hexdigest()


def make_fused_copy(src: str | Path, dst: str | Path) -> Path:
    """Writes the fp32 fused-layout copy of src into dst, unless dst already holds one of this src."""
    src, dst = Path(src).resolve(), Path(dst)
    want = {"source": str(src), "id": source_id(src)}
    stamp = dst / STAMP
    if stamp.exists() and json.loads(stamp.read_text()) == want:
        return dst
    sys.path.insert(0, str(ROOT / "tests"))  # tests/reference.py: the oracle's dequantize-and-fuse loader
    from reference import load_reference

    model = load_reference(src)  # fp32, experts dequantized and fused, loaded strictly
    if dst.exists():
        shutil.rmtree(dst)
    # Say fp32 throughout (the source says bf16); load_reference already dropped quantization_config.
    for cfg in (model.config, model.config.text_config, model.config.vision_config):
        cfg.dtype = torch.float32
    model.save_pretrained(dst)
    # After save_pretrained, whose generation_config.json is the model class's, not the source's.
    for pattern in SIDE_FILES:
        for f in src.glob(pattern):
            if f.name not in ("config.json", "model.safetensors.index.json"):
                shutil.copy2(f, dst / f.name)
    stamp.write_text(json.dumps(want, indent=2) + "\n")  # last: a copy cut short has no stamp
    return dst


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__.strip().splitlines()[-1].strip())
    print(make_fused_copy(sys.argv[1], sys.argv[2]))
