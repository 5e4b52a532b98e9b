# Every target sets itself up on a fresh machine: the venv is created on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL_DIR ?= models/tiny-maverick

.DEFAULT_GOAL := help
.PHONY: help venv tiny-model test lint format gpu-check clean

help:
	@echo "make test        lint + the whole test suite (CPU)"
	@echo "make tiny-model  build the embedded default checkpoint into $(MODEL_DIR)"
	@echo "make gpu-check   the tiny model and the FP8 path on CUDA against the CPU oracle"
	@echo "make lint | format | clean"

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $@

venv: $(VENV)/.installed

# The tiny checkpoint is generated (seeded, deterministic), never committed.
$(MODEL_DIR)/config.json: $(VENV)/.installed maverick/tiny.py maverick/tiny_tokenizer.py maverick/data/tokenizer_corpus.txt
	$(PY) -m maverick.tiny $(MODEL_DIR)

tiny-model: $(MODEL_DIR)/config.json

lint: venv
	$(PY) -m ruff check maverick tests scripts
	$(PY) -m ruff format --check maverick tests scripts

format: venv
	$(PY) -m ruff format maverick tests scripts
	$(PY) -m ruff check --fix maverick tests scripts

test: venv tiny-model lint
	$(PY) -m pytest -q

gpu-check: venv tiny-model
	$(PY) scripts/gpu_check.py --model-dir $(MODEL_DIR)

clean:
	rm -rf $(VENV) models .pytest_cache .ruff_cache
