"""Deployment profiles (server/profiles/): each loads strictly and renders a `maverick` config that
Triton reads; the CPU ones that fit here are served by a real tritonserver, the replicas one with
both of its engines serving; a KIND_MODEL instance finds its own GPU set."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import scrape_metrics, start_triton
from google.protobuf import text_format
from test_triton import direct  # noqa: F401  (the engine-direct fixture the answers must equal)
from tritonclient.grpc import model_config_pb2

from client.llm import GrpcClient
from maverick.plan import MAVERICK_FP8
from maverick.serving.engine_args import EngineArgsError, Instance, engine_config
from maverick.serving.profile import ProfileError, load_profile, profile_names
from server.launch import ServeConfig, render_repository

ROOT = Path(__file__).resolve().parents[1]
KIND = model_config_pb2.ModelInstanceGroup.Kind


def test_the_profiles_of_the_issue_are_there():
    assert set(profile_names()) == {
        "cpu-tiny",
        "cpu-2x",
        "cpu-tp2",
        "h100x8-tp8",
        "h200x8-tp8",
        "h200x4-tp4",
        "h100x8-2xtp4",
    }


def _render(tmp_path, profile: str, engine: dict[str, str] | None = None) -> Path:
    model_dir = ROOT / "models" / "tiny-maverick"
    return render_repository(ServeConfig(model_dir, engine=engine or {}, build_dir=tmp_path, profile=profile))


def _parse(repo: Path, model: str) -> model_config_pb2.ModelConfig:
    """As Triton reads a config.pbtxt: its ModelConfig protobuf, strictly (unknown fields fail)."""
    return text_format.Parse((repo / model / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def _parameters(config: model_config_pb2.ModelConfig) -> dict[str, str]:
    return {key: value.string_value for key, value in config.parameters.items()}


@pytest.mark.parametrize("name", profile_names())
def test_every_profile_renders_a_config_triton_reads(tmp_path, name):
    profile = load_profile(name)
    repo = _render(tmp_path, name)
    for model in ("ensemble", "preprocessing", "postprocessing"):
        assert _parse(repo, model).name == model
    config = _parse(repo, "maverick")
    (group,) = config.instance_group
    assert (KIND.Name(group.kind), group.count) == (profile.kind, profile.instances)
    params = _parameters(config)
    assert {k: params[k] for k in profile.engine} == dict(profile.engine)
    assert params["model_dir"] == str((ROOT / "models" / "tiny-maverick").resolve())
    # the engine accepts every parameter as rendered (what the stub does at load)
    engine = engine_config(params, ROOT, cuda=profile.on_gpu)
    assert engine.tensor_parallel_size == profile.tensor_parallel_size
    # preprocessing refuses prompts by the engine's context length
    assert _parameters(_parse(repo, "preprocessing"))["max_model_len"] == params.get("max_model_len", "")


def test_engine_args_override_the_profile(tmp_path):
    repo = _render(tmp_path, "cpu-tp2", {"max_num_seqs": "8", "tensor_parallel_size": "1"})
    params = _parameters(_parse(repo, "maverick"))
    assert (params["max_num_seqs"], params["tensor_parallel_size"], params["kv_cache_bytes"]) == (
        "8",
        "1",
        load_profile("cpu-tp2").engine["kv_cache_bytes"],
    )
    repo = _render(tmp_path, "h100x8-tp8", {"max_model_len": "4096"})
    assert _parameters(_parse(repo, "preprocessing"))["max_model_len"] == "4096"


GOOD = {
    "description": "a test",
    "kind": "KIND_MODEL",
    "instances": 2,
    "gpus_per_node": 8,
    "gpu_memory_gib": 80,
    "engine": {"tensor_parallel_size": 4, "max_model_len": None, "enable_prefix_caching": True},
}
BAD = [
    ({"gpu": 8}, r"unknown keys \['gpu'\]"),
    ({"kind": "KIND_GPU"}, "kind must be one of"),
    ({"kind": "KIND_CPU"}, r"unknown keys \['gpu_memory_gib', 'gpus_per_node'\]"),
    ({"description": "two\nlines"}, "one non-empty line"),
    ({"instances": 0}, "instances must be a positive integer"),
    ({"instances": 3}, r"needs 3 × 4 = 12 GPUs .* 8 are visible \(gpus_per_node\)"),
    ({"engine": {"tensor_parallel_sise": 4}}, "unknown engine parameter 'tensor_parallel_sise'"),
    ({"engine": {"max_num_seqs": "many"}}, "max_num_seqs: 'many' is not a valid int"),
    ({"engine": {"max_num_seqs": [1]}}, "not a number, string, boolean or null"),
    ({"engine": {"decode_path": "fast"}}, "decode_path: 'fast' is not one of"),
    ({"engine": {"gpu_memory_utilization": 1.5}}, r"gpu_memory_utilization must be in \(0, 1\]"),
    ({"engine": {"model_dir": "/models/x"}}, "the checkpoint is MODEL_DIR's"),
    ({"engine": {"device": "cuda:1"}}, 'engine.device "auto"'),
]


def test_a_good_profile_file_loads(tmp_path):
    path = tmp_path / "good.json"
    path.write_text(json.dumps(GOOD))
    profile = load_profile(path)
    assert profile.gpu_memory_bytes == 80 << 30 and profile.tensor_parallel_size == 4
    assert dict(profile.engine) == {
        "tensor_parallel_size": "4",
        "max_model_len": "none",
        "enable_prefix_caching": "true",
    }


@pytest.mark.parametrize("change, message", BAD, ids=[m for _, m in BAD])
def test_a_bad_profile_file_is_refused_with_its_reason(tmp_path, change, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({**GOOD, **change}))
    with pytest.raises(ProfileError, match=message):
        load_profile(path)


def _launch_refuses(profile: str, model_dir: Path) -> str:
    """`make serve PROFILE=... MODEL_DIR=...`'s launcher: it must exit before starting a server."""
    out = subprocess.run(
        [sys.executable, "-m", "server.launch", "--profile", profile, "--model-dir", str(model_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0 and "serving" not in out.stdout, out.stdout
    return out.stderr


def _checkpoint_config(tmp_path, raw: dict) -> Path:
    """A folder with only a config.json: all the launcher's checks read."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    return tmp_path


def test_the_launcher_refuses_a_checkpoint_the_profile_cannot_split(tiny_ckpt, tmp_path):
    raw = json.loads((tiny_ckpt / "config.json").read_text())
    raw["text_config"].update(num_attention_heads=5, num_key_value_heads=1)
    err = _launch_refuses("cpu-tp2", _checkpoint_config(tmp_path, raw))
    assert "num_attention_heads (5) does not divide by tensor_parallel_size 2" in err


def test_the_launcher_refuses_a_checkpoint_the_profile_cannot_hold(tmp_path):
    err = _launch_refuses("h100x8-2xtp4", _checkpoint_config(tmp_path, MAVERICK_FP8))
    assert "388.3 GiB of weights" in err and "use tensor_parallel_size 8" in err


# -- which GPUs a KIND_MODEL instance takes --------------------------------------------------------

TWO_TP4 = {"name": "maverick", "instance_group": [{"name": "maverick_0", "kind": "KIND_MODEL", "count": 2}]}


def _args(name: str, kind: str = "MODEL") -> dict[str, str]:
    """What Triton's Python backend hands initialize() (a KIND_MODEL instance's device id is 0)."""
    return {"model_instance_name": name, "model_instance_kind": kind, "model_instance_device_id": "0"}


@pytest.fixture
def gpus(monkeypatch):
    """Pretend this process sees `n` GPUs (engine_config only counts them)."""

    def see(n: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)

    return see


def test_each_instance_takes_its_own_gpu_set(gpus, tmp_path):
    gpus(8)
    params = {"model_dir": str(tmp_path), "tensor_parallel_size": "4"}
    instances = [Instance.from_args(_args(f"maverick_0_{i}"), TWO_TP4) for i in range(2)]
    configs = [engine_config(params, tmp_path, instance) for instance in instances]
    assert [(c.device, c.dtype) for c in configs] == [("cuda:0", "bfloat16"), ("cuda:4", "bfloat16")]
    # instances of a later group count after the earlier groups'
    two_groups = {"name": "maverick", "instance_group": [{"count": 1}, {"count": 1}]}
    assert Instance.from_args(_args("maverick_1_0"), two_groups).index == 1


def test_an_instance_whose_gpus_are_not_there_fails_clearly(gpus, tmp_path):
    gpus(4)
    params = {"model_dir": str(tmp_path), "tensor_parallel_size": "4"}
    with pytest.raises(
        EngineArgsError, match=r"instance maverick_0_1 needs 2 × 4 = 8 GPUs .*; 4 are visible"
    ):
        engine_config(params, tmp_path, Instance.from_args(_args("maverick_0_1"), TWO_TP4))


def test_a_kind_gpu_instance_keeps_the_device_triton_gave_it(gpus, tmp_path):
    gpus(2)
    config = {"name": "maverick", "instance_group": [{"kind": "KIND_GPU", "count": 1, "gpus": [1]}]}
    args = {**_args("maverick_0_0", "GPU"), "model_instance_device_id": "1"}
    instance = Instance.from_args(args, config)
    assert engine_config({"model_dir": str(tmp_path)}, tmp_path, instance).device == "cuda:1"


# -- served by a real tritonserver ------------------------------------------------------------------
# cpu-tiny is what the `triton` fixture serves (the default profile); cpu-2x is started below;
# cpu-tp2 in test_triton_tp.py.


def _loaded_config(server) -> dict:
    """The maverick model's config as the running server loaded it."""
    with urllib.request.urlopen(f"http://{server.http_url}/v2/models/maverick/config") as r:
        return json.load(r)


def test_cpu_tiny_is_what_the_server_loads(triton):
    group = _loaded_config(triton)["instance_group"]
    assert [(g["kind"], g["count"]) for g in group] == [("KIND_CPU", 1)]


@pytest.fixture(scope="module")
def replicas(tiny_ckpt, tmp_path_factory):
    """cpu-2x: two maverick instances, each its own engine process. Verbose logging, for the line
    Triton's Python backend logs per execute: "model maverick, instance maverick_0_1, executing
    N requests"."""
    build = tmp_path_factory.mktemp("replicas")
    server = start_triton(tiny_ckpt, build, profile="cpu-2x", log_verbose=1)
    yield server
    assert server.stop() == 0, f"tritonserver did not exit cleanly; see {build / 'server.log'}"


def _requests_per_instance(server) -> dict[str, int]:
    log = (server.cfg.build_dir / "server.log").read_text()
    counts: dict[str, int] = {}
    for instance, n in re.findall(r"instance (maverick_\d+_\d+), executing (\d+) requests", log):
        counts[instance] = counts.get(instance, 0) + int(n)
    return counts


def test_two_replicas_serve_sixteen_streams_each_as_served_alone(replicas, direct):  # noqa: F811
    """Greedy answers through either replica equal the engine's own (alone); Triton's own account
    of which instance executed which request shows both engines served."""
    group = _loaded_config(replicas)["instance_group"]
    assert [(g["kind"], g["count"]) for g in group] == [("KIND_CPU", 2)]
    fields = [
        dict(text=f"Replica {i}: the {['river', 'lamp', 'road', 'bell'][i % 4]} said", max_tokens=6 + i % 4)
        for i in range(16)
    ]

    def stream(f: dict) -> str:
        with GrpcClient(replicas.grpc_url) as c:
            return "".join(chunk.text for chunk in c.stream(temperature=0.0, **f))

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(stream, fields))
    assert answers == [direct(temperature=0.0, **f)[0] for f in fields]
    counts = _requests_per_instance(replicas)
    assert set(counts) == {"maverick_0_0", "maverick_0_1"}, counts
    assert sum(counts.values()) == 16, counts
    # each instance publishes its own series (sampled every 0.5 s), the tokens it generated
    time.sleep(1.2)
    generated = {
        labels["model_instance"]: value
        for name, labels, value in scrape_metrics(replicas.cfg.metrics_port)
        if name == "maverick_generation_tokens_total"
    }
    assert set(generated) == set(counts) and all(generated.values()), generated
