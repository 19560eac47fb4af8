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

## test: the CPU test suite (offline, a few minutes)
test: $(VENV)/.installed $(VENV)/.triton
	$(BIN)/pytest

lint: $(VENV)/.installed
	$(BIN)/ruff check $(SRC)
	$(BIN)/ruff format --check $(SRC)

format: $(VENV)/.installed
	$(BIN)/ruff format $(SRC)
	$(BIN)/ruff check --fix $(SRC)

clean:
	rm -rf $(VENV) logs/*/
