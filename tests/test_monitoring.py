"""The monitoring stack of docker/ against a real server. Prometheus (Debian's package, which
`make prometheus` unpacks into build/prometheus) scrapes the session's tritonserver with the job of
docker/prometheus/prometheus.yml (its target and interval replaced); after a short streamed load,
every query of the Grafana dashboard (docker/grafana/dashboards/maverick.json) must answer with
finite numbers, the token rate and the latency quantiles above zero. Also checked without a server:
the compose file's mounts exist and the dashboard names the datasource Grafana is given."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from conftest import free_ports, wait_ok

from client.llm import GrpcClient, HttpClient

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
PROMETHEUS_CONFIG = DOCKER / "prometheus" / "prometheus.yml"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "maverick.json"
METRICS_PORT = 8002  # the server's metrics port, which the repository's job scrapes
# Grafana's variables as Grafana fills them for a 1 s scrape interval (rate windows of at least 4
# scrapes); 30 s also holds the whole load of the test.
GRAFANA_VARIABLES = {"$__rate_interval": "30s", "$__interval": "5s", "$__range": "1m"}
# Triton exports its GPU series only where it has GPUs: on this CPU server those queries must parse
# and come back empty.
GPU_ONLY = re.compile(r"\bnv_gpu_\w+")
# queries that must be above zero after the load, not only finite (the load's second wave repeats
# the first one's prompt prefix, so the prefix cache hits); matched at the start of a query, so a
# ratio with one of these as its divisor (a queue time can be 0 µs) is not held to it
POSITIVE = re.compile(
    r"histogram_quantile|sum\(rate\((maverick_generation_tokens_total|maverick_prefix_cache_hit_tokens_total)"
    r"|sum by \(model\) \(rate\(nv_inference_request_success\["
)


def prometheus_binary() -> str | None:
    candidates = [os.environ.get("PROMETHEUS"), str(ROOT / "build/prometheus/usr/bin/prometheus")]
    for path in candidates:
        if path and os.access(path, os.X_OK):
            return path
    return shutil.which("prometheus")


def dashboard_queries(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of every panel, rows' nested panels included."""
    queries = []

    def walk(panels):
        for panel in panels:
            queries.extend((panel["title"], t["expr"]) for t in panel.get("targets", []) if t.get("expr"))
            walk(panel.get("panels", []))

    walk(dashboard["panels"])
    return queries


def concrete(expr: str) -> str:
    """A dashboard query with Grafana's variables filled in, as Grafana sends it to Prometheus."""
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, f"a Grafana variable the test does not fill: {expr}"
    return expr


def scrape_config(metrics_port: int) -> dict:
    """The repository's Prometheus config, its server job aimed at this test's server, scraping each
    second."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    jobs = [
        job
        for job in config["scrape_configs"]
        for static in job.get("static_configs", [])
        if any(target.endswith(f":{METRICS_PORT}") for target in static["targets"])
    ]
    assert len(jobs) == 1, f"{PROMETHEUS_CONFIG}: expected one job scraping port {METRICS_PORT}"
    [job] = jobs
    job["static_configs"] = [{"targets": [f"127.0.0.1:{metrics_port}"]}]
    job["scrape_interval"] = job["scrape_timeout"] = "1s"
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["scrape_configs"] = [job]
    return config


def _get(url: str, timeout: float = 5.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


class Prometheus:
    def __init__(self, binary: str, config: dict, workdir: Path):
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        [port] = free_ports(1)
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = workdir / "prometheus.log"
        self.log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if not wait_ok(f"{self.url}/-/ready", 30, self.proc):
            self.stop()
            raise RuntimeError(f"prometheus not ready after 30 s; see {self.log_path}")

    def query(self, expr: str) -> list[dict]:
        """An instant query's result vector; a query Prometheus refuses fails here with its error."""
        try:
            answer = _get(f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        except urllib.error.HTTPError as e:
            raise AssertionError(f"{expr}: {e.read().decode(errors='replace')}") from None
        assert answer["status"] == "success", answer
        assert answer["data"]["resultType"] == "vector", answer
        return answer["data"]["result"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture
def prometheus(request, tmp_path):
    binary = prometheus_binary()
    if binary is None:
        pytest.skip(
            "NO PROMETHEUS: the monitoring stack is NOT tested. `make prometheus` unpacks Debian's "
            "package into build/prometheus (or set PROMETHEUS=/path/to/prometheus)"
        )
    triton = request.getfixturevalue("triton")  # only once there is a Prometheus to scrape it
    prom = Prometheus(binary, scrape_config(triton.cfg.metrics_port), tmp_path / "prometheus")
    yield prom
    prom.stop()


def _stream(triton, i: int) -> int:
    """One streamed request; the prompts share a prefix longer than a KV block, so later ones hit
    the prefix cache. Even ones over HTTP /generate_stream, odd ones over a gRPC stream."""
    text = "The monitoring test asks the tiny model for a story about a lighthouse keeper. " * 3 + str(i)
    client = GrpcClient(triton.grpc_url) if i % 2 else HttpClient(triton.http_url)
    with client as c:
        return sum(chunk.num_output_tokens for chunk in c.stream(text=text, max_tokens=12, ignore_eos=True))


def _number(value: str) -> float:
    return float(value)  # Prometheus writes NaN and Inf as "NaN", "+Inf", which float() reads


def test_every_dashboard_query_answers_from_a_real_server(triton, prometheus):
    queries = dashboard_queries(json.loads(DASHBOARD.read_text()))
    assert len(queries) >= 10, "the dashboard has lost its panels"
    names = {n for _, e in queries for n in re.findall(r"\b(?:maverick|nv)_\w+", e)}
    for needed in (
        "maverick_generation_tokens_total",
        "maverick_time_to_first_token_seconds_bucket",
        "maverick_inter_token_latency_seconds_bucket",
        "maverick_num_requests_running",
        "maverick_num_requests_waiting",
        "maverick_kv_cache_blocks_used",
        "maverick_prefix_cache_hit_tokens_total",
        "maverick_preemptions_total",
        "nv_inference_request_failure",
        "nv_inference_request_success",
    ):
        assert needed in names, f"no dashboard panel queries {needed}"

    # the series exist before the load, so rate() sees them rise
    deadline = time.monotonic() + 20
    while not prometheus.query('up{job="maverick"} == 1'):
        assert time.monotonic() < deadline, f"prometheus never scraped the server; see {prometheus.log_path}"
        time.sleep(0.5)

    with ThreadPoolExecutor(4) as pool:  # two waves: the second one hits the prefix cache
        for wave in range(2):
            tokens = list(pool.map(lambda i: _stream(triton, i), range(wave * 4, wave * 4 + 4)))
            assert tokens == [12] * 4, tokens

    gpu_server = bool(prometheus.query('{__name__=~"nv_gpu_.+"}'))
    # the engine publishes every 0.5 s, Prometheus scrapes every second: wait for both
    deadline = time.monotonic() + 20
    while True:
        problems, answers = [], {}
        for title, expr in queries:
            result = prometheus.query(concrete(expr))
            answers[expr] = result
            values = [_number(sample["value"][1]) for sample in result]
            if GPU_ONLY.search(expr) and not gpu_server:
                if values:
                    problems.append(f"{title}: {expr} answered {values} on a server without GPUs")
            elif not values:
                problems.append(f"{title}: {expr} is empty")
            elif not all(math.isfinite(v) for v in values):
                problems.append(f"{title}: {expr} = {values}, not finite")
            elif POSITIVE.match(expr) and not all(v > 0 for v in values):
                problems.append(f"{title}: {expr} = {values}, expected > 0 after the load")
        if not problems or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert not problems, "dashboard queries without numbers:\n" + "\n".join(problems)

    # the headline panels: quantiles in order and within the histogram's buckets
    for metric, top in (("time_to_first_token", 30.0), ("inter_token_latency", 1.0)):
        pattern = re.compile(rf"histogram_quantile\((0\.\d+), .*maverick_{metric}_seconds_bucket")
        quantiles = sorted((float(m[1]), e) for e in answers if (m := pattern.search(e)))
        assert len(quantiles) >= 2, f"the dashboard has fewer than two {metric} quantiles"
        values = [_number(answers[e][0]["value"][1]) for _, e in quantiles]
        assert values == sorted(values) and 0 < values[-1] <= top, (metric, quantiles, values)


def test_compose_mounts_and_the_dashboard_datasource_exist():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (DOCKER / source).exists(), f"compose service {name} mounts {source}, which is missing"
        build = service.get("build")
        if build:
            dockerfile = DOCKER / build["context"] / build["dockerfile"]
            assert dockerfile.is_file(), f"compose service {name} builds from {dockerfile}, which is missing"
    # Grafana's provisioned datasource is the one every panel names
    provisioned = yaml.safe_load((DOCKER / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    [datasource] = provisioned["datasources"]
    dashboard = json.loads(DASHBOARD.read_text())
    uids = set()

    def walk(panels):
        for panel in panels:
            if "datasource" in panel:
                uids.add(panel["datasource"]["uid"])
            uids.update(t["datasource"]["uid"] for t in panel.get("targets", []))
            walk(panel.get("panels", []))

    walk(dashboard["panels"])
    assert uids == {datasource["uid"]}, (uids, datasource["uid"])
    # and every scrape target (Triton's metrics port, the OpenAI API's port) is the server's network
    # alias in compose
    servers = [s for s in compose["services"].values() if "build" in s]
    for job in yaml.safe_load(PROMETHEUS_CONFIG.read_text())["scrape_configs"]:
        [target] = job["static_configs"][0]["targets"]
        host = target.rsplit(":", 1)[0]
        assert servers and all(host in s["networks"]["default"]["aliases"] for s in servers), target
