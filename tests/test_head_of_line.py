"""No head-of-line blocking: a running stream keeps flowing, and small requests are served, while
requests that once froze the server arrive: 64 bad words of 256 KiB (tokenized inside the engine
loop, they stopped every stream for seconds) and eight 7000 x 7000 PNGs (decoded for many seconds
before being refused for the prompt's length). Now preprocessing refuses both at once, from the
words' sizes and the images' headers, on worker threads of its own. The probe's longest gap is
the one timed bound of the suite, and a loose one: a token takes milliseconds here."""

from __future__ import annotations

import io
import json
import threading
import time

import numpy as np
from PIL import Image

from client.llm import GrpcClient, HttpClient, ServerError

MAX_GAP_S = 1.0


def _png(width: int, height: int) -> bytes:
    """A large, well-compressed PNG (stripes): cheap to send, costly to decode."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[::7] = 200
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _chat(n_images: int) -> str:
    return json.dumps(
        [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": "?"}]}]
    )


def test_a_stream_keeps_flowing_while_heavy_requests_arrive(triton):
    huge = _png(7000, 7000)
    heavy = {
        "bad words": (
            {"text_input": "hi", "bad_words": [f"w{i:02d} " * (64 << 10) for i in range(64)]},
            "bytes",
        ),
        "eight 7000x7000 PNGs": ({"messages": _chat(8), "images": [huge] * 8}, "pixels in all"),
        "eight 2000x1500 PNGs": ({"messages": _chat(8), "images": [_png(2000, 1500)] * 8}, "max_model_len"),
    }
    arrivals: list[float] = []
    probe_done = threading.Event()

    def probe():
        with GrpcClient(triton.grpc_url) as c:
            for chunk in c.stream(text="Probe: go on.", max_tokens=1500, ignore_eos=True, temperature=0.0):
                arrivals.append(chunk.time)
        probe_done.set()

    results: dict[str, tuple[str, float]] = {}

    def send(name: str, fields: dict) -> None:
        start = time.monotonic()
        try:
            HttpClient(triton.http_url).generate_fields({**fields, "max_tokens": 4})
            results[name] = ("ok", time.monotonic() - start)
        except ServerError as e:
            results[name] = (e.message, time.monotonic() - start)

    threading.Thread(target=probe, daemon=True).start()
    while len(arrivals) < 5 and not probe_done.is_set():
        time.sleep(0.01)
    t0 = time.monotonic()
    senders = [threading.Thread(target=send, args=(name, f)) for name, (f, _) in heavy.items()]
    senders += [
        threading.Thread(target=send, args=(f"small {i}", {"text_input": f"small {i}"})) for i in range(20)
    ]
    for t in senders:
        t.start()
    for t in senders:
        t.join()
    t1 = time.monotonic()
    assert probe_done.wait(120)

    for name, (_, refusal) in heavy.items():
        assert refusal in results[name][0], (name, results[name])
    assert all(results[f"small {i}"][0] == "ok" for i in range(20)), results
    assert arrivals[-1] > t1, "the probe ended before the heavy requests did: nothing was measured"
    during = [t for t in arrivals if t < t0][-1:] + [t for t in arrivals if t0 <= t <= t1]
    during += [t for t in arrivals if t > t1][:1]
    longest = float(np.diff(during).max())
    small = sorted(results[f"small {i}"][1] for i in range(20))
    print(
        f"probe: longest gap {longest * 1e3:.0f} ms over {t1 - t0:.2f} s; heavy answered in "
        + ", ".join(f"{name} {results[name][1]:.2f} s" for name in heavy)
        + f"; 20 small requests: median {small[10]:.2f} s, max {small[-1]:.2f} s"
    )
    assert longest < MAX_GAP_S
