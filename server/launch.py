"""Start a real `tritonserver` on the model repository (what `make serve` runs).

    python -m server.launch [--profile cpu-tiny] [--model-dir DIR] [--http-port 8000] [--grpc-port 8001]
                            [--metrics-port 8002] [--engine key=value ...] [--trace-file FILE]
                            [--serving-nice N] [--build-dir DIR] [--liveness-interval S] ...

Finds the server: the NGC container's `/opt/tritonserver`, else the one the `nvidia-pytriton`
wheel carries (Triton 2.51), whose Python backend gets the stub built for the running Python.
Renders the repository into `build/http-PORT/model_repository` (one per server) for a deployment
profile (server/profiles/: the `maverick` model's instance group and engine settings), with the
checkpoint folder and the --engine overrides written into the models' parameters (absolute
paths); refuses, before starting anything, a checkpoint the profile cannot split or hold
(maverick/plan.py) and a port in use; removes the shared-memory regions a killed server on the
same port left; lets the stub see this Python's packages, PYTHONPATH first
(MAVERICK_SITE_PACKAGES), tells the stubs how far to step below the engine process in priority
(MAVERICK_SERVING_NICE, see maverick/serving/priority.py), and runs the server as its child until
it stops, probing that the whole stack answers (server/liveness.py): a wedged stack is stopped and
the launcher exits with status 3.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

from maverick.config import ConfigError, ModelConfig
from maverick.plan import Plan, check_divisible, check_fits
from maverick.serving.priority import ENV as SERVING_NICE_ENV
from maverick.serving.priority import MAX_NICE, SERVING_NICE, parse_serving_nice
from maverick.serving.profile import (
    DEFAULT_PROFILE,
    Profile,
    ProfileError,
    load_profile,
    profile_engine_config,
    profile_names,
)
from server.liveness import LivenessPolicy
from server.processes import (
    EXIT_WEDGED,
    port_free,
    remove_stale_regions,
    run_server,
    server_ready,
    shm_region_prefix,
)

ROOT = Path(__file__).resolve().parents[1]
REPOSITORY = ROOT / "model_repository"
NGC_SERVER = Path("/opt/tritonserver")
MODELS_WITH_CHECKPOINT = ("preprocessing", "maverick")
ADMIN_APIS = "model-repository,trace,logging,shared-memory"  # Triton's restricted-API categories


@dataclass(frozen=True)
class Triton:
    binary: Path
    backend_dir: Path
    lib_dirs: tuple[Path, ...] = ()


@dataclass
class ServeConfig:
    model_dir: Path = ROOT / "models" / "tiny-maverick"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    engine: dict[str, str] = field(default_factory=dict)  # overrides of the maverick model's parameters
    build_dir: Path = ROOT / "build"
    log_verbose: int = 0
    trace_file: Path | None = None  # Triton traces every request's timestamps here (written at exit)
    serving_nice: int = SERVING_NICE  # the stubs' niceness above the engine process (0: equal)
    profile: str = DEFAULT_PROFILE  # server/profiles/<profile>.json: instance group, engine settings
    # Triton's admin APIs (model repository control, tracing, logging, shared memory) need this key
    # in a header; None leaves them open, as Triton does. Inference is never gated (docs/api.md).
    admin_key: str | None = None
    openai_port: int = 0  # the OpenAI-compatible API server (openai_api/) beside Triton; 0: none


def free_ports(n: int) -> list[int]:
    """n TCP ports free on this host right now (for servers started by tests and scripts)."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def find_triton(build_dir: Path) -> Triton:
    if (NGC_SERVER / "bin" / "tritonserver").is_file():
        return Triton(NGC_SERVER / "bin" / "tritonserver", NGC_SERVER / "backends")
    try:
        import pytriton
    except ImportError:
        sys.exit("no tritonserver: not in the NGC container, and the nvidia-pytriton wheel is not installed")
    pkg = Path(pytriton.__file__).parent / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = pkg / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        sys.exit(f"nvidia-pytriton has no Python backend stub for Python {version}")
    backend = build_dir / "triton_backends" / "python"
    backend.mkdir(parents=True, exist_ok=True)
    for src in (
        pkg / "backends" / "python" / "libtriton_python.so",
        pkg / "backends" / "python" / "triton_python_backend_utils.py",
        stub,
    ):
        dst = backend / src.name
        if not dst.exists() or dst.stat().st_mtime < src.stat().st_mtime:
            shutil.copy2(src, dst)
    libs = Path(pytriton.__file__).parents[1] / "nvidia_pytriton.libs"
    return Triton(
        pkg / "bin" / "tritonserver", backend.parent, (libs, Path(sysconfig.get_config_var("LIBDIR")))
    )


def _set_parameter(pbtxt: str, key: str, value: str) -> str:
    """Set `parameters { key: KEY value: { string_value: ... } }`, adding the entry if absent."""
    pattern = re.compile(
        r'(parameters\s*\{\s*key:\s*"' + re.escape(key) + r'"\s*value:\s*\{\s*string_value:\s*")[^"]*(")'
    )
    if pattern.search(pbtxt):
        return pattern.sub(lambda m: m.group(1) + value + m.group(2), pbtxt)
    return pbtxt + f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}\n'


def _set_instance_group(pbtxt: str, profile: Profile) -> str:
    """The model's one `instance_group [ ... ]`, replaced by the profile's."""
    group = f"instance_group [ {{ kind: {profile.kind} count: {profile.instances} }} ]"
    text, n = re.subn(r"instance_group\s*\[[^\]]*\]", group, pbtxt)
    if n != 1:
        raise ValueError(f"expected one instance_group in the maverick config, found {n}")
    return text


def engine_parameters(
    model_dir: Path, overrides: dict[str, str] | None = None, profile: str = DEFAULT_PROFILE
) -> dict[str, str]:
    """The `maverick` model's engine parameters as Triton hands them to it for this checkpoint and
    profile: what tests and benchmarks use to run the engine directly, configured exactly as served."""
    text = (REPOSITORY / "maverick" / "config.pbtxt").read_text()
    params = dict(re.findall(r'key: "(\w+)" value: \{ string_value: "([^"]*)" \}', text))
    return {
        **params,
        **load_profile(profile).engine,
        "model_dir": str(Path(model_dir).resolve()),
        **(overrides or {}),
    }


def render_repository(cfg: ServeConfig) -> Path:
    """A copy of model_repository with this run's checkpoint and engine settings in it."""
    out = cfg.build_dir / "model_repository"
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(REPOSITORY, out, ignore=shutil.ignore_patterns("__pycache__"))
    for model in MODELS_WITH_CHECKPOINT:
        path = out / model / "config.pbtxt"
        path.write_text(_set_parameter(path.read_text(), "model_dir", str(cfg.model_dir.resolve())))
    profile = load_profile(cfg.profile)
    settings = {**profile.engine, **cfg.engine}  # --engine overrides the profile
    path = out / "maverick" / "config.pbtxt"
    text = _set_instance_group(path.read_text(), profile)
    for key, value in settings.items():
        text = _set_parameter(text, key, value)
    path.write_text(text)
    # preprocessing refuses a prompt the engine cannot hold before it decodes any image
    path = out / "preprocessing" / "config.pbtxt"
    path.write_text(_set_parameter(path.read_text(), "max_model_len", settings.get("max_model_len", "")))
    return out


def check_deployment(cfg: ServeConfig) -> Plan:
    """The capacity plan of this checkpoint under this profile and overrides, or ValueError: a
    dimension the tensor-parallel split needs does not divide, or the weights and one
    max_model_len sequence do not fit the profile's memory (the engine checks again at start,
    against the memory it finds)."""
    profile = load_profile(cfg.profile)
    engine = profile_engine_config(profile, cfg.model_dir, cfg.engine)
    model = ModelConfig.from_dir(cfg.model_dir)
    check_divisible(model.text, engine.tensor_parallel_size)
    return check_fits(
        model, engine, profile.gpu_memory_bytes, str(cfg.model_dir), max_gpus=profile.gpus_per_node or None
    )


def stub_package_dirs(env: dict[str, str]) -> str:
    """What the stubs should import from, in the order this Python sees it: PYTHONPATH's folders,
    then this Python's site-packages. The stubs' embedded interpreter ignores PYTHONPATH; a package
    put on it here (numpy 1.x beside an interpreter whose own numpy is 2.x, say) must win there too."""
    extra = [os.path.abspath(d) for d in env.get("PYTHONPATH", "").split(os.pathsep) if d]
    site_packages = [sysconfig.get_paths()[k] for k in ("purelib", "platlib")]
    return os.pathsep.join(dict.fromkeys([*extra, *site_packages]))


def server_command(cfg: ServeConfig) -> tuple[list[str], dict[str, str]]:
    triton = find_triton(cfg.build_dir)
    repo = render_repository(cfg)
    cmd = [
        str(triton.binary),
        f"--model-repository={repo}",
        f"--backend-directory={triton.backend_dir}",
        f"--http-port={cfg.http_port}",
        f"--grpc-port={cfg.grpc_port}",
        f"--metrics-port={cfg.metrics_port}",
        "--metrics-config=histogram_latencies=true",
        "--allow-cpu-metrics=true",
        f"--log-verbose={cfg.log_verbose}",
        "--exit-timeout-secs=10",
        # Python backend shared-memory regions are named by this prefix: two servers on one host
        # must not share it.
        f"--backend-config=python,shm-region-prefix-name={shm_region_prefix(cfg.http_port)}",
    ]
    if cfg.admin_key:
        # HTTP: header `admin-key: KEY`; gRPC: metadata `triton-grpc-protocol-admin-key: KEY`
        cmd += [
            f"--http-restricted-api={ADMIN_APIS}:admin-key={cfg.admin_key}",
            f"--grpc-restricted-protocol={ADMIN_APIS}:admin-key={cfg.admin_key}",
        ]
    if cfg.trace_file is not None:
        # every request (rate 1), its timestamps only, one file written when the server stops
        # (log-frequency 0); `python -m loadtest.trace` reads it
        cmd += [
            f"--trace-config=triton,file={Path(cfg.trace_file).resolve()}",
            "--trace-config=rate=1",
            "--trace-config=level=TIMESTAMPS",
            "--trace-config=log-frequency=0",
        ]
    env = dict(os.environ)
    env[SERVING_NICE_ENV] = str(cfg.serving_nice)
    env["MAVERICK_SITE_PACKAGES"] = stub_package_dirs(env)
    if triton.lib_dirs:
        env["LD_LIBRARY_PATH"] = os.pathsep.join([*map(str, triton.lib_dirs), env.get("LD_LIBRARY_PATH", "")])
    return cmd, env


class RunningServer:
    """A tritonserver in the background, for tests and scripts: started ready, stopped cleanly."""

    def __init__(self, cfg: ServeConfig, log_path: Path, timeout: float = 180.0):
        self.cfg = cfg
        cmd, env = server_command(cfg)
        self.log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self._wait_ready(timeout, log_path)

    @property
    def http_url(self) -> str:
        return f"localhost:{self.cfg.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"localhost:{self.cfg.grpc_port}"

    def _wait_ready(self, timeout: float, log_path: Path) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tritonserver exited ({self.proc.returncode}); see {log_path}")
            if server_ready(self.cfg.http_port):
                return
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"tritonserver not ready after {timeout:.0f} s; see {log_path}")

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        # A server that gave up at its exit timeout can leave Python backend stubs behind (they
        # hold GBs each): they share the server's process group, so end the group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()
        return self.proc.returncode


def engine_arg(text: str) -> tuple[str, str]:
    """argparse type of a `key=value` engine setting."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    return key, value


def _serving_nice_arg(text: str) -> int:
    try:
        return parse_serving_nice(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--profile",
        default=DEFAULT_PROFILE,
        choices=profile_names(),
        help="deployment profile (server/profiles/NAME.json): instance group and engine settings",
    )
    ap.add_argument("--model-dir", type=Path, default=ServeConfig.model_dir)
    ap.add_argument("--http-port", type=int, default=8000)
    ap.add_argument("--grpc-port", type=int, default=8001)
    ap.add_argument("--metrics-port", type=int, default=8002)
    ap.add_argument(
        "--engine", type=engine_arg, nargs="*", default=[], help="maverick engine settings, key=value"
    )
    ap.add_argument("--log-verbose", type=int, default=0)
    ap.add_argument(
        "--build-dir",
        type=Path,
        default=None,
        help="where the rendered model repository goes (writable; default build/http-PORT, one per "
        "server, so two servers from one checkout keep their own; the images use one under /tmp)",
    )
    ap.add_argument(
        "--admin-key",
        default=os.environ.get("ADMIN_KEY") or None,
        help="Triton's admin APIs (repository control, trace, logging, shared memory) only with this "
        "key in the `admin-key` header (default: $ADMIN_KEY; unset, they are open)",
    )
    ap.add_argument(
        "--openai-port",
        type=int,
        default=9000,
        help="the OpenAI-compatible API (/v1/chat/completions) on this port, beside Triton (0: off)",
    )
    policy = LivenessPolicy()
    ap.add_argument(
        "--liveness-interval",
        type=float,
        default=policy.interval_s,
        help="seconds between the one-token requests that check the whole stack answers (0: off)",
    )
    ap.add_argument("--liveness-timeout", type=float, default=policy.timeout_s)
    ap.add_argument(
        "--liveness-failures",
        type=int,
        default=policy.failures,
        help=f"wedged probes in a row before the server is stopped (exit status {EXIT_WEDGED})",
    )
    ap.add_argument(
        "--trace-file",
        type=Path,
        default=None,
        help="trace every request's timestamps into this file, written when the server stops "
        "(read it with `python -m loadtest.trace`)",
    )
    ap.add_argument(
        "--serving-nice",
        type=_serving_nice_arg,
        metavar=f"0..{MAX_NICE}",
        default=SERVING_NICE,
        help="how many niceness steps the Python backend stubs run below the engine process, so "
        "that on a busy machine the engine loop is not the one that waits (0: equal)",
    )
    args = ap.parse_args()
    if not (args.model_dir / "config.json").is_file():
        sys.exit(
            f"{args.model_dir}: not a checkpoint directory (no config.json); "
            "`make tiny-model` builds the default"
        )
    cfg = ServeConfig(
        args.model_dir,
        args.http_port,
        args.grpc_port,
        args.metrics_port,
        dict(args.engine),
        build_dir=args.build_dir or ROOT / "build" / f"http-{args.http_port}",
        log_verbose=args.log_verbose,
        trace_file=args.trace_file,
        serving_nice=args.serving_nice,
        profile=args.profile,
        admin_key=args.admin_key,
        openai_port=args.openai_port,
    )
    try:
        plan = check_deployment(cfg)
    except (ConfigError, ProfileError, ValueError) as e:
        sys.exit(f"profile {cfg.profile} cannot serve {cfg.model_dir}: {e}")
    if not port_free(cfg.http_port):
        sys.exit(f"port {cfg.http_port} is in use: another server? (`make stop HTTP_PORT={cfg.http_port}`)")
    if cfg.openai_port and not port_free(cfg.openai_port):
        sys.exit(f"port {cfg.openai_port} is in use: set OPENAI_PORT (--openai-port) to another, or 0")
    for path in remove_stale_regions(cfg.http_port):
        print(f"removed {path}, left by a server on port {cfg.http_port} that did not stop cleanly")
    cmd, env = server_command(cfg)
    openai_line = f"  OpenAI  http://localhost:{cfg.openai_port}/v1\n" if cfg.openai_port else ""
    print(
        f"serving {cfg.model_dir} with {cmd[0]}\n"
        f"  profile {cfg.profile}: TP {plan.tensor_parallel_size}, {plan.kv_tokens} KV tokens per instance, "
        f"longest context {plan.longest_context} (`python -m maverick.plan --profile {cfg.profile}`)\n"
        f"  HTTP    http://localhost:{cfg.http_port}  (POST /v2/models/ensemble/generate_stream)\n"
        f"  gRPC    localhost:{cfg.grpc_port}\n"
        f"  metrics http://localhost:{cfg.metrics_port}/metrics\n"
        f"{openai_line}"
        f"Ctrl-C (or `make stop HTTP_PORT={cfg.http_port}`) stops it.",
        flush=True,
    )
    policy = LivenessPolicy(args.liveness_interval, args.liveness_timeout, args.liveness_failures)
    sys.exit(run_server(cmd, env, cfg, policy))


if __name__ == "__main__":
    main()
