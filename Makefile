# Every target sets itself up on a fresh machine: the venv is created on first use. Inside the
# NGC Triton container (/opt/tritonserver) the system Python is used instead, as its Python
# backend stub embeds that interpreter.
PYTHON ?= python3
NGC := $(wildcard /opt/tritonserver/bin/tritonserver)
VENV ?= .venv
PY := $(if $(NGC),$(PYTHON),$(VENV)/bin/python)
EXTRAS := $(if $(NGC),client,test)
DEFAULT_MODEL := models/tiny-maverick
MODEL_DIR ?= $(DEFAULT_MODEL)
HTTP_PORT ?= 8000
GRPC_PORT ?= 8001
METRICS_PORT ?= 8002
ENGINE_ARGS ?=
# a deployment profile, server/profiles/$(PROFILE).json: the maverick model's instances and engine settings
PROFILE ?= cpu-tiny
TRACE_FILE ?=
SERVING_NICE ?= 10

.DEFAULT_GOAL := help
.PHONY: help venv tiny-model serve stop test lint format gpu-check bench loadtest clean

help:
	@echo "make serve       tritonserver on MODEL_DIR (default: the embedded tiny checkpoint), ports 8000/8001/8002"
	@echo "                 (ENGINE_ARGS=\"key=value ...\", TRACE_FILE=path: Triton's per-request trace,"
	@echo "                 SERVING_NICE=0..19: the stubs' niceness above the engine process, default 10)"
	@echo "                 PROFILE=name: server/profiles/name.json (cpu-tiny, cpu-tp2, cpu-2x, h100x8-tp8, ...)"
	@echo "make stop        stop it"
	@echo "make test        lint + the whole test suite (CPU)"
	@echo "make tiny-model  build the embedded default checkpoint into $(DEFAULT_MODEL)"
	@echo "make gpu-check   on a GPU: FP8 path, decode kernels and CUDA graphs against their references"
	@echo "make bench       engine vs transformers generate on the tiny model -> results/bench/ (BENCH_ARGS=...)"
	@echo "make loadtest    Locust against a running server -> results/loadtest/run/ (USERS, DURATION, WORKLOAD, LOADTEST_ARGS=...)"
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
		$(if $(ENGINE_ARGS),--engine $(ENGINE_ARGS)) \
		$(if $(TRACE_FILE),--trace-file $(TRACE_FILE)) --serving-nice $(SERVING_NICE)

stop:
	-pkill -INT -f "[t]ritonserver --model-repository=$(CURDIR)/build/model_repository"

lint: venv
	$(PY) -m ruff check maverick tests scripts client server model_repository loadtest
	$(PY) -m ruff format --check maverick tests scripts client server model_repository loadtest

format: venv
	$(PY) -m ruff format maverick tests scripts client server model_repository loadtest
	$(PY) -m ruff check --fix maverick tests scripts client server model_repository loadtest

test: venv tiny-model lint
	$(PY) -m pytest -q

gpu-check: venv tiny-model
	$(PY) scripts/gpu_check.py --model-dir $(MODEL_DIR)

# Performance numbers come from here, never from timed tests. results/ is gitignored.
BENCH_ARGS ?=
bench: venv tiny-model
	$(PY) scripts/bench_engine.py --model-dir $(MODEL_DIR) --out results/bench $(BENCH_ARGS)

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

clean:
	rm -rf $(VENV) models results build .pytest_cache .ruff_cache
