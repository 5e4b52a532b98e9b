"""scripts/bench_engine.py in --quick mode writes a well-formed report. No timing is asserted:
performance claims come from the full benchmark run (`make bench`), not from tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_engine.py"


def test_quick_bench_writes_json_markdown_and_png(tiny_ckpt, tmp_path):
    out = tmp_path / "bench"
    cmd = [sys.executable, str(SCRIPT), "--quick", "--model-dir", str(tiny_ckpt), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| c | side |" in proc.stdout  # the table is printed

    result = json.loads((out / "bench.json").read_text())
    assert result["machine"]["dtype"] == "float32" and result["machine"]["torch"]
    assert [lvl["concurrency"] for lvl in result["levels"]] == [1, 2]
    for lvl in result["levels"]:
        for side in ("engine", "transformers"):
            m = lvl[side]
            assert m["requests"] == 3 and m["output_tokens"] > 0 and m["output_tokens_per_s"] > 0
            for key in ("ttft_s", "itl_s", "e2e_s"):
                assert set(m[key]) == {"p50", "p90", "p99", "mean"} and m[key]["p50"] is not None
        # Both sides ran the same requests and produced exactly max_tokens each.
        assert lvl["engine"]["output_tokens"] == lvl["transformers"]["output_tokens"]
        # Greedy fp32: the engine must give transformers' tokens where transformers is exact.
        assert lvl["tokens_checked"] >= 1 and lvl["tokens_match"] == lvl["tokens_checked"]
        assert lvl["speedup"] > 0

    md = (out / "bench.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")]
    assert len(rows) == 4, md  # one row per level and side

    with Image.open(out / "throughput.png") as im:
        assert im.format == "PNG" and im.width > 100 and im.height > 100
        im.verify()
