"""`python -m loadtest.trace`: per-model queue and compute times from Triton's trace file, on a
hand-made trace (exact numbers) and on the trace a real tritonserver writes (`make serve
TRACE_FILE=...`)."""

from __future__ import annotations

import json
import time

import pytest
from conftest import start_triton

from client.llm import GrpcClient
from loadtest.trace import main, read_trace, summarize

MS = 1_000_000  # ns


def _request(trace_id, model, parent, stamps, request_id="r"):
    """Entries as Triton's "triton" trace mode writes them: one naming the request, then one per
    timestamp."""
    head = {"id": trace_id, "model_name": model, "model_version": 1, "request_id": request_id}
    if parent:
        head["parent_id"] = parent
    return [head] + [{"id": trace_id, "timestamps": [{"name": n, "ns": ns}]} for n, ns in stamps]


def test_summary_of_a_hand_made_trace(tmp_path):
    trace = [
        *_request(
            1,
            "ensemble",
            0,
            [
                ("REQUEST_START", 0),
                ("INFER_RESPONSE_COMPLETE", 40 * MS),
                ("INFER_RESPONSE_COMPLETE", 60 * MS),
                ("REQUEST_END", 70 * MS),
            ],
        ),
        *_request(
            2,
            "postprocessing",
            1,
            [("QUEUE_START", 10 * MS), ("COMPUTE_START", 12 * MS), ("COMPUTE_END", 13 * MS)],
        ),
        *_request(
            3,
            "postprocessing",
            1,
            [("QUEUE_START", 20 * MS), ("COMPUTE_START", 24 * MS), ("COMPUTE_END", 27 * MS)],
        ),
    ]
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(trace))
    records = read_trace(path)
    assert sorted((r["id"], r["model"], r["parent_id"]) for r in records) == [
        (1, "ensemble", 0),
        (2, "postprocessing", 1),
        (3, "postprocessing", 1),
    ]
    s = summarize(records)
    post, ens = s["postprocessing"], s["ensemble"]
    assert post["requests"] == 2 and ens["requests"] == 1
    assert post["queue_s"]["p50"] == pytest.approx(0.003)  # 2 and 4 ms
    assert post["compute_s"]["p50"] == pytest.approx(0.002)  # 1 and 3 ms
    assert post["busy"] == pytest.approx(4 / 15)  # 4 ms of compute in 12..27 ms
    assert ens["first_response_s"]["p50"] == pytest.approx(0.040)  # the first of its responses
    assert ens["request_s"]["p50"] == pytest.approx(0.070)
    assert ens["queue_s"]["p50"] is None and ens["busy"] is None
    out = tmp_path / "summary.json"
    assert main([str(path), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["postprocessing"]["requests"] == 2


def test_trace_of_a_real_server(tiny_ckpt, tmp_path):
    trace_file = tmp_path / "trace.json"
    server = start_triton(tiny_ckpt, tmp_path, trace_file=trace_file)
    client_ttft = {}
    try:
        with GrpcClient(server.grpc_url) as client:
            for rid in ("a", "b"):
                sent = time.monotonic()
                chunks = list(client.stream(request_id=rid, text="Hello", max_tokens=6, ignore_eos=True))
                client_ttft[rid] = chunks[0].time - sent
                assert sum(c.num_output_tokens for c in chunks) == 6
    finally:
        assert server.stop() == 0
    records = read_trace(trace_file)  # written when the server stopped
    by_model = {}
    for rec in records:
        by_model.setdefault(rec["model"], []).append(rec)
    ensembles = {r["id"]: r for r in by_model["ensemble"]}
    assert sorted(r["request_id"] for r in ensembles.values()) == ["a", "b"]
    assert len(by_model["preprocessing"]) == len(by_model["maverick"]) == 2
    assert 2 <= len(by_model["postprocessing"]) <= 2 * 6  # one per streamed response
    # every step belongs to one of the two ensemble requests
    assert all(
        r["parent_id"] in ensembles
        for m in ("preprocessing", "maverick", "postprocessing")
        for r in by_model[m]
    )
    # the server's first response lies inside the client's TTFT
    for rec in ensembles.values():
        t = rec["t"]
        assert (
            0 < min(t["INFER_RESPONSE_COMPLETE"]) - min(t["REQUEST_START"]) < client_ttft[rec["request_id"]]
        )
    s = summarize(records)
    for model in ("preprocessing", "maverick", "postprocessing"):
        assert s[model]["queue_s"]["p50"] >= 0 and s[model]["compute_s"]["p50"] > 0
        assert 0 < s[model]["busy"] <= 1
