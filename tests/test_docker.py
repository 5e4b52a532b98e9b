"""The container images' parts that run without a container engine: docker/entrypoint.sh, started
as the images start it (configured by environment variables), serves a streamed answer and stops
cleanly on SIGTERM (`docker stop`) and SIGINT (Ctrl-C); the Dockerfiles pin what constraints.txt
pins, and say which CUDA build of torch the GPU image takes. The images themselves are built by
hand (docker/podman-local.sh): CI has no container engine."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import psutil
import pytest
from conftest import free_ports, ready_url, wait_ok

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILES = {"gpu": DOCKER / "Dockerfile", "cpu": DOCKER / "Dockerfile.cpu"}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[_canonical(name)] = version
    return pins


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    lines = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(m[1].upper(), m[2].strip()) for m in re.finditer(r"^\s*(\w+)\s+(.*)$", text, re.M)]


def pip_installs(path: Path) -> list[list[str]]:
    """The arguments of every `pip install` in the Dockerfile's RUN instructions."""
    out = []
    for op, args in instructions(path):
        if op == "RUN":
            for command in re.split(r"&&|;", args):
                words = command.split()
                if "pip" in words and words[words.index("pip") + 1 : words.index("pip") + 2] == ["install"]:
                    out.append(words[words.index("pip") + 2 :])
    return out


def arg_default(path: Path, name: str) -> str:
    (value,) = [
        args.partition("=")[2] for op, args in instructions(path) if op == "ARG" and args.startswith(name)
    ]
    return value


_OPTIONS_WITH_VALUE = {"-c", "--constraint", "-r", "--requirement", "-i", "--index-url", "--extra-index-url"}


def requirements(args: list[str]) -> tuple[list[str], list[str]]:
    """`pip install` arguments: (requirements named, local paths installed: `-e .[extra]`, `.`)."""
    named, local, words = [], [], iter(args)
    for word in words:
        if word in _OPTIONS_WITH_VALUE:
            next(words)
        elif word in {"-e", "--editable"}:
            local.append(next(words).strip("'\""))
        elif not word.startswith("-"):
            word = word.strip("'\"")
            (local if word.startswith(".") else named).append(word)
    return named, local


@pytest.mark.parametrize("image", DOCKERFILES)
def test_the_images_pin_what_constraints_pin(image):
    """Every package a Dockerfile names has constraints.txt's version (torch included: the GPU
    image takes the same release, built for its CUDA), and the project's own install is constrained
    by constraints.txt itself."""
    pins = constraints()
    installs = pip_installs(DOCKERFILES[image])
    assert installs, f"no pip install in {DOCKERFILES[image]}"
    pinned = {}
    for args in installs:
        named, local = requirements(args)
        for req in named:
            name, sep, version = req.partition("==")
            assert sep, f"{image}: unpinned {req!r} in `pip install {' '.join(args)}`"
            pinned[_canonical(name)] = version
        if local:  # the project: its dependencies come under constraints.txt
            assert "-c" in args and args[args.index("-c") + 1] == "constraints.txt", args
    assert pinned.get("torch") == pins["torch"]
    for name, version in pinned.items():
        if name in pins:
            assert version == pins[name], f"{image}: {name}=={version}, constraints.txt has {pins[name]}"
    assert any(requirements(args)[1] for args in installs), "the project itself is not installed"


def test_the_gpu_image_takes_the_torch_build_for_its_cuda():
    """The GPU image's base tag and the torch index agree with the release the Dockerfile's comment
    describes: the tag, its CUDA major.minor, and the cuXYZ wheel index of that CUDA. The CPU image
    takes torch's CPU build."""
    gpu = DOCKERFILES["gpu"]
    tag = re.fullmatch(r"nvcr\.io/nvidia/tritonserver:(\d\d\.\d\d)-py3", arg_default(gpu, "BASE"))
    assert tag, arg_default(gpu, "BASE")
    described = re.search(
        rf"^# {re.escape(tag[1])}: Triton [\d.]+ .*? CUDA (\d+)\.(\d+)\.\d+", gpu.read_text(), re.M
    )
    assert described, f"no comment on release {tag[1]} and its CUDA in {gpu}"
    cuda = described[1] + described[2]
    assert arg_default(gpu, "TORCH_INDEX_URL") == f"https://download.pytorch.org/whl/cu{cuda}"
    assert arg_default(DOCKERFILES["cpu"], "TORCH_INDEX_URL") == "https://download.pytorch.org/whl/cpu"


@pytest.mark.parametrize("image", DOCKERFILES)
def test_the_images_run_the_entrypoint_as_a_user_with_a_healthcheck(image):
    ops = instructions(DOCKERFILES[image])
    assert ("ENTRYPOINT", '["/opt/maverick/docker/entrypoint.sh"]') in ops
    (user,) = [args for op, args in ops if op == "USER"]
    assert user.partition(":")[0] not in {"0", "root"}
    (health,) = [args for op, args in ops if op == "HEALTHCHECK"]
    assert "/v2/health/ready" in health and "HTTP_PORT" in health
    assert [op for op, _ in ops].index("USER") > max(i for i, (op, _) in enumerate(ops) if op == "RUN")


def test_the_embedded_checkpoint_is_readable_by_the_images_user(tiny_ckpt):
    """The images generate it as root and serve it as uid 10001."""
    assert not [p.name for p in tiny_ckpt.iterdir() if not p.stat().st_mode & 0o004]


def test_the_build_context_leaves_out_what_is_made_here():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".git", ".venv", "models", "results", "build"} <= ignored


def _make_n(*args: str) -> list[str]:
    """The words of the commands `make -n ARGS` would run."""
    # --no-print-directory: under `make test` (a sub-make) make would print "Entering directory"
    cmd = ["make", "-n", "--no-print-directory", *args]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
    return shlex.split(out.stdout.replace("\\\n", " "))


def test_make_docker_serve_runs_the_gpu_image_as_documented():
    words = _make_n(
        "docker-serve",
        "MODEL_DIR=/data/maverick-fp8",
        "PROFILE=h100x8-tp8",
        "HTTP_PORT=9000",
        "ENGINE_ARGS=max_num_seqs=8 dtype=bfloat16",
    )
    assert words[:2] == ["docker", "run"] and words[-1] == "maverick-triton:gpu"
    pairs = set(zip(words[:-1], words[1:], strict=True))
    assert {("-v", "/data/maverick-fp8:/models:ro"), ("-e", "MODEL_DIR=/models"), ("--gpus", "all")} <= pairs
    assert {("-e", "PROFILE=h100x8-tp8"), ("-e", "ENGINE_ARGS=max_num_seqs=8 dtype=bfloat16")} <= pairs
    assert {("-p", "9000:8000"), ("--ulimit", "memlock=-1"), ("--ulimit", "stack=67108864")} <= pairs
    assert "--shm-size=16g" in words and "--init" in words
    # the default checkpoint is the image's own: nothing to mount
    cpu = _make_n("docker-serve-cpu", "DOCKER=podman")
    assert cpu[:2] == ["podman", "run"] and cpu[-1] == "maverick-triton:cpu"
    assert "-v" not in cpu and not any(w.startswith("MODEL_DIR=") for w in cpu)
    # the OpenAI API's image URL settings reach the container only when set (docs/api.md)
    assert not any(w.startswith("OPENAI_ALLOWED_IMAGE_HOSTS") for w in cpu)
    images = _make_n(
        "docker-serve-cpu", "OPENAI_ALLOWED_IMAGE_HOSTS=img.example", "OPENAI_ALLOW_HTTP_IMAGES=1"
    )
    pairs = set(zip(images[:-1], images[1:], strict=True))
    assert {("-e", "OPENAI_ALLOWED_IMAGE_HOSTS"), ("-e", "OPENAI_ALLOW_HTTP_IMAGES")} <= pairs


def test_make_docker_build_builds_the_images_asked_for():
    both = _make_n("docker-build")
    assert [both[i + 1] for i, w in enumerate(both) if w == "-f"] == [
        "docker/Dockerfile",
        "docker/Dockerfile.cpu",
    ]
    one = _make_n("docker-build", "IMAGE=cpu", "DOCKER=podman")
    assert one[:2] == ["podman", "build"] and one.count("build") == 1 and "docker/Dockerfile.cpu" in one


def _stream(http_port: int, body: dict) -> list[dict]:
    request = urllib.request.Request(
        f"http://localhost:{http_port}/v2/models/ensemble/generate_stream",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as resp:
        return [
            json.loads(line[5:]) for line in resp.read().decode().splitlines() if line.startswith("data:")
        ]


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_the_entrypoint_serves_a_stream_and_stops_on_a_signal(tiny_ckpt, tmp_path, stop):
    """The images' environment, outside a container: the entrypoint execs the launcher (so the
    signal reaches it, not a shell), the server answers a streamed request with the ENGINE_ARGS
    given, and on the signal all exit 0 with nothing left running and the shared memory gone."""
    http, grpc, metrics, openai = free_ports(4)
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHON", "TRACE_FILE", "SERVING_NICE"}}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",  # the image's venv first
        MODEL_DIR=str(tiny_ckpt),
        PROFILE="cpu-tiny",
        HTTP_PORT=str(http),
        GRPC_PORT=str(grpc),
        METRICS_PORT=str(metrics),
        ENGINE_ARGS="max_num_seqs=8 max_num_batched_tokens=512",
        BUILD_DIR=str(tmp_path / "build"),
        ADMIN_KEY="s3cret",
        OPENAI_PORT=str(openai),
    )
    log_path = tmp_path / "entrypoint.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [str(DOCKER / "entrypoint.sh")], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    family: list[psutil.Process] = []
    try:
        assert wait_ok(ready_url(http), 180, proc), log_path.read_text()[-3000:]
        launched = psutil.Process(proc.pid)  # exec'd: no shell left waiting between signal and server
        assert "entrypoint.sh" not in " ".join(launched.cmdline()), launched.cmdline()
        assert wait_ok(f"http://localhost:{openai}/health", 60, proc)  # the OpenAI API beside it
        # ADMIN_KEY: Triton's repository API only with the key; inference stays open (below)
        index = f"http://localhost:{http}/v2/repository/index"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(urllib.request.Request(index, data=b"{}"), timeout=5)
        assert refused.value.code == 403
        keyed = urllib.request.Request(index, data=b"{}", headers={"admin-key": "s3cret"})
        with urllib.request.urlopen(keyed, timeout=5) as r:
            assert {m["name"] for m in json.load(r)} >= {"ensemble", "maverick"}
        assert "s3cret" not in " ".join(launched.cmdline())
        config = (tmp_path / "build" / "model_repository" / "maverick" / "config.pbtxt").read_text()
        assert re.search(r'key: "max_num_seqs" value: \{ string_value: "8" \}', config)
        assert str(tiny_ckpt) in config
        family = [launched, *launched.children(recursive=True)]
        assert any(p.name() == "tritonserver" for p in family)
        assert any("maverick.engine.engine_core" in " ".join(p.cmdline()) for p in family)

        events = _stream(
            http,
            {
                "text_input": "Tell me a story.",
                "max_tokens": 6,
                "ignore_eos": True,
                "temperature": 0.0,
                "stream": True,
                "return_num_output_tokens": True,
            },
        )
        assert len(events) > 1 and not any("error" in e for e in events), events
        assert sum(e["num_output_tokens"] for e in events) == 6
        ids = [i for e in events for i in np.atleast_1d(e["output_token_ids"])]  # one id comes as a number
        assert len(ids) == 6 and all(
            "text_output" in e for e in events
        )  # a text delta may be "" (bytes held back)
        assert events[-1]["finish_reason"] == "length"
    finally:
        if proc.poll() is None:
            proc.send_signal(stop)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
    assert code == 0, log_path.read_text()[-3000:]
    _, alive = psutil.wait_procs(family, timeout=15)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], alive
    assert not list(Path("/dev/shm").glob(f"maverick_{http}_*"))
