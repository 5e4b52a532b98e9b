"""scripts/bench_slice.py on the CPU at --small shapes: every case is measured, the byte formulas are
the built modules' own parameter bytes, and the projection is the stated arithmetic. No timing is
asserted beyond "measured" (performance numbers come from `make bench-slice` on a GPU)."""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))  # as the script runs
import bench_slice as bs  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("slice")
    args = ["--device", "cpu", "--small", "--iters", "2", "--cpu-threads", "1", "--out", str(out)]
    result = bs.main(args)
    return result, out


def test_every_case_has_a_measured_row(run):
    result, out = run
    wl = bs.small_workload()
    rows = result["rows"]
    got = {(r["section"], r["layer"], r["tokens"], r["context"]) for r in rows}
    assert len(got) == len(rows)  # no case measured twice
    want = set()
    for layer in ("dense", "moe", "nope"):
        want |= {("decode", layer, b, c) for b, c in itertools.product(wl.decode_batches, wl.decode_contexts)}
        want.add(("decode", layer, wl.concurrency, wl.avg_context))  # the projection's point
        want |= {("prefill", layer, n, n) for n in wl.prefill_lens}
    want |= {("lm_head", "lm_head", b, 0) for b in wl.decode_batches}
    assert got == want
    for r in rows:
        assert r["time_s"] > 0 and r["bytes"] > 0 and r["flops"] > 0, r
        assert r["hbm_pct"] is None and r["tc_pct"] is None  # the CPU: not applicable
        assert r["bandwidth_bytes_per_s"] == pytest.approx(r["bytes"] / r["time_s"])

    on_disk = json.loads((out / "slice.json").read_text())
    assert on_disk["rows"] == json.loads(json.dumps(rows))
    assert on_disk["meta"]["decode_path"].startswith("DecodeMetadata with torch_kernels=True")
    md = (out / "slice.md").read_text()
    for heading in ("## Decode step", "## Prefill", "## LM head", "## Projection: one decode step"):
        assert heading in md
    assert "3164" in md and "vLLM's published number, as cited in the project's issue" in md
    # one markdown row per measured case
    dense_rows = sum(line.startswith("| dense RoPE |") for line in md.splitlines())
    assert dense_rows == len(bs.decode_cases(wl)) + len(wl.prefill_lens)


def test_layer_kinds_follow_maverick_pattern():
    kinds = {k.key: k for k in bs.layer_kinds(bs.maverick_workload().cfg)}
    assert {k: (v.index, v.count) for k, v in kinds.items()} == {
        "dense": (0, 24),
        "moe": (1, 12),
        "nope": (3, 12),
    }


@pytest.mark.parametrize(
    ("workload", "precision", "device"),
    [
        (bs.small_workload, bs.Precision(torch.float32, False), "cpu"),  # what the CPU run builds
        (bs.small_workload, bs.Precision(torch.bfloat16, True), "cpu"),
        (bs.maverick_workload, bs.Precision(torch.bfloat16, True), "meta"),  # the GPU run's, unallocated
        (bs.maverick_workload, bs.Precision(torch.bfloat16, False), "meta"),
    ],
)
def test_weight_bytes_formula_is_the_modules_parameter_bytes(workload, precision, device):
    cfg = workload().cfg
    for kind in bs.layer_kinds(cfg):
        layer = bs.build_layer(cfg, kind.index, precision, device)
        actual = sum(p.numel() * p.element_size() for p in layer.parameters())
        formula = bs.layer_weight_bytes(
            cfg, cfg.is_moe(kind.index), precision.act_bytes, precision.fp8_experts
        )
        assert formula.total == actual, kind
        if cfg.is_moe(kind.index):
            experts = layer.feed_forward.experts
            routed = sum(p.numel() * p.element_size() for p in experts.parameters())
            assert formula.per_expert * cfg.num_local_experts == routed
            assert formula.always == actual - routed
    head = bs.build_lm_head(cfg, precision, device)
    assert bs.lm_head_bytes(cfg, precision.act_bytes) == head.weight.numel() * head.weight.element_size()


def test_decode_row_bytes_are_weights_touched_plus_kv(run):
    """A row's bytes from the modules themselves: the non-expert parameters, the routed experts' worth,
    and the KV window read (B * keys) plus the new token written (B), 2 * kv_heads * head_dim * 4."""
    result, _ = run
    cfg = bs.small_workload().cfg
    prec = bs.Precision(torch.float32, False)
    for r in (r for r in result["rows"] if r["section"] == "decode"):
        index = {"dense": 0, "moe": 1, "nope": 3}[r["layer"]]
        layer = bs.build_layer(cfg, index, prec, "meta")
        weights = sum(p.numel() * p.element_size() for p in layer.parameters())
        if r["layer"] != "dense":
            routed = sum(p.numel() * p.element_size() for p in layer.feed_forward.experts.parameters())
            E = cfg.num_local_experts
            assert r["experts_expected"] == pytest.approx(E * (1 - (1 - 1 / E) ** r["tokens"]))
            assert 1 <= r["experts_hit"] <= min(E, r["tokens"])
            weights = weights - routed + routed / E * r["experts_hit"]  # the experts the step read
        kv = r["tokens"] * (r["keys"] + 1) * 2 * cfg.num_key_value_heads * cfg.head_dim * 4
        assert r["bytes"] == pytest.approx(weights + kv)


def test_keys_seen_chunked_and_full():
    cfg = bs.maverick_workload().cfg
    assert bs.keys_seen(cfg, 0, 1023) == 1024 and bs.keys_seen(cfg, 3, 1023) == 1024
    assert bs.keys_seen(cfg, 1, 8191) == 8192  # the last position of the first chunk sees all of it
    assert bs.keys_seen(cfg, 1, 8192) == 1 and bs.keys_seen(cfg, 3, 8192) == 8193  # RoPE: a new chunk


def test_expected_experts_against_direct_computation():
    assert bs.expected_experts(128, 1) == pytest.approx(1.0)
    assert bs.expected_experts(128, 0) == 0
    # exhaustive: every assignment of B tokens to E experts, equally likely
    for E, B in ((4, 3), (5, 4), (3, 6)):
        direct = sum(len(set(a)) for a in itertools.product(range(E), repeat=B)) / E**B
        assert bs.expected_experts(E, B) == pytest.approx(direct)
    assert bs.expected_experts(128, 64) == pytest.approx(128 * (1 - (127 / 128) ** 64))


def test_collective_costs_are_the_stated_formulas():
    comm = bs.CommModel()
    assert (comm.ranks, comm.alpha_s, comm.bus_bytes_per_s) == (8, 10e-6, 360e9)
    nbytes = 64 * 5120 * 2
    assert comm.all_reduce_s(nbytes) == pytest.approx(10e-6 + 2 * 7 / 8 * nbytes / 360e9)
    assert comm.all_gather_s(nbytes) == pytest.approx(10e-6 + 7 / 8 * nbytes / 360e9)


def test_projection_arithmetic(run):
    result, _ = run
    wl = bs.small_workload()
    H, V, L = wl.cfg.hidden_size, wl.full_vocab, wl.cfg.num_hidden_layers
    t = {(r["section"], r["layer"], r["tokens"], r["context"]): r["time_s"] for r in result["rows"]}

    def ar(nbytes):
        return 10e-6 + 2 * 7 / 8 * nbytes / 360e9

    def ag(nbytes):
        return 10e-6 + 7 / 8 * nbytes / 360e9

    def step(B, c):
        layers = (
            24 * t["decode", "dense", B, c] + 12 * t["decode", "moe", B, c] + 12 * t["decode", "nope", B, c]
        )
        return layers + t["lm_head", "lm_head", B, 0] + (2 * L + 1) * ar(B * H * 2) + ag(B * V * 2)

    steps = {(s["batch"], s["context"]): s for s in result["projection"]["steps"]}
    assert set(steps) == {(b, c) for b in wl.decode_batches for c in wl.decode_contexts} | {(64, 48)}
    for (B, c), s in steps.items():
        assert s["step_s"] == pytest.approx(step(B, c))
        assert s["tokens_per_s"] == pytest.approx(B / step(B, c))

    tp = result["projection"]["throughput"]
    n = wl.input_tokens  # small: the prompt is a measured prefill length
    prefill = sum(k * t["prefill", key, n, n] for k, key in ((24, "dense"), (12, "moe"), (12, "nope")))
    prefill += t["lm_head", "lm_head", 1, 0] + (2 * L + 1) * ar(n * H * 2) + ag(V * 2)
    C, out = wl.concurrency, wl.output_tokens
    want = C * out / (out * step(C, wl.avg_context) + C * prefill)
    assert tp["prefill_s"] == pytest.approx(prefill)
    assert tp["output_tokens_per_s"] == pytest.approx(want)
    assert tp["ratio_to_reference"] == pytest.approx(want / 3164)


def test_gpu_detection_and_specs():
    assert bs.detect_gpu(torch.device("cpu")) is None
    specs = {s.name: s for s in bs.GPU_SPECS}
    assert specs["H100 SXM"].hbm_bytes_per_s == 3.35e12 and specs["H200 SXM"].hbm_bytes_per_s == 4.8e12
    for s in specs.values():
        assert (s.fp8_flops, s.bf16_flops, s.nvlink_bytes_per_s) == (1979e12, 989e12, 900e9) and s.source


def test_a_failing_case_is_reported_and_the_rest_measured(tmp_path, monkeypatch):
    """A GPU run gets one try: a case that raises is a Failures entry, every other case is measured
    and written, and a projection missing a case says so rather than inventing it."""
    real = bs.measure_prefill

    def flaky(layer, kind, wl, tokens, *args):
        if kind.key == "moe" and tokens == max(wl.prefill_lens):
            raise RuntimeError("out of memory (simulated)")
        return real(layer, kind, wl, tokens, *args)

    monkeypatch.setattr(bs, "measure_prefill", flaky)
    args = ["--device", "cpu", "--small", "--iters", "1", "--cpu-threads", "1", "--out", str(tmp_path)]
    result = bs.main(args)
    assert [f["case"].split()[:2] for f in result["failures"]][0] == ["prefill", "MoE"]
    assert "out of memory (simulated)" in (tmp_path / "slice.md").read_text()
    assert (
        sum(r["section"] == "prefill" for r in result["rows"])
        == 3 * len(bs.small_workload().prefill_lens) - 1
    )
    assert result["projection"]["steps"]  # decode steps need no prefill
