# lit-cats developer entry points. `make demo` and `make test` set everything up on first use.
PYTHON ?= python3
VENV   ?= .venv
# Any torch >= 2.4 works. The pin keeps set-up reproducible (and on machines with a local
# CPU wheel of this version, small); override with e.g. `make demo TORCH=torch==2.9.1`.
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
SRC    := lit_cats tests $(wildcard benchmarks)

.PHONY: demo test lint format bench-cpu clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

## demo: QLoRA fine-tune of the tiny offline Phi-3 on the shipped cat memes (CPU, ~1 minute)
demo: $(VENV)/.installed
	$(BIN)/lit-cats fit --config configs/qlora.yaml --config configs/tiny.yaml

# Triton's interpreter runs lit_cats/fast/lora_dropout.py's CUDA kernels on the CPU in the tests.
# CUDA builds of torch ship Triton; the CPU build does not. Without a wheel that test skips.
$(VENV)/.triton: $(VENV)/.installed
	$(BIN)/python -c "import triton" 2>/dev/null || $(BIN)/pip install -q triton \
		|| echo "no Triton wheel for this machine: its interpreter test will be skipped"
	touch $@

# llama.cpp for the export round trip (tests/test_export.py), pinned in pyproject's `llama` extra.
# PyPI has only its source for Linux, so it is built once (minutes) into a wheel cache that later
# set-ups install from: portable (no -march=native), without llama.cpp's tools, tests, examples.
LLAMA_CPP  := $(shell sed -n 's/.*"\(llama-cpp-python==[^"]*\)".*/\1/p' pyproject.toml)
WHEELS     ?= $(HOME)/.cache/lit-cats/wheels
LLAMA_ARGS := -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF \
	-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF
LLAMA_PIP  := $(BIN)/pip install -q --find-links $(WHEELS) --only-binary llama-cpp-python

$(VENV)/.llama: $(VENV)/.installed
	$(LLAMA_PIP) "$(LLAMA_CPP)" 2>/dev/null || { \
		echo "building $(LLAMA_CPP) into $(WHEELS) (once; several minutes)"; \
		CMAKE_ARGS="$(LLAMA_ARGS)" $(BIN)/pip wheel -q --no-deps "$(LLAMA_CPP)" -w $(WHEELS) \
		&& $(LLAMA_PIP) "$(LLAMA_CPP)"; }
	touch $@

## test: the CPU test suite (offline, a few minutes)
test: $(VENV)/.installed $(VENV)/.triton $(VENV)/.llama
	$(BIN)/pytest

lint: $(VENV)/.installed
	$(BIN)/ruff check $(SRC)
	$(BIN)/ruff format --check $(SRC)

format: $(VENV)/.installed
	$(BIN)/ruff format $(SRC)
	$(BIN)/ruff check --fix $(SRC)

clean:
	rm -rf $(VENV) logs/*/
