# Two commands for a fresh machine:  `make demo`  and  `make test`.
# Both build .venv in the repo first (torch pinned to the local 2.13.0 CPU wheel).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv demo test test-slow bench lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: anything else pulls multi-GB CUDA builds.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[trainer,dev]"
	# the [openclip] query-encoder path, tested with a torchvision stub (never install torchvision/timm)
	$(BIN)/python -m pip install -q --no-deps open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4
	touch $(STAMP)

demo: venv
	$(BIN)/kaizen demo

test: venv
	$(BIN)/python -m pytest -q -m "not slow and not gpu"

test-slow: venv
	$(BIN)/python -m pytest -q -m slow

bench: venv
	$(BIN)/python bench/engine.py

lint: venv
	$(BIN)/ruff check runtime trainer export tests bench

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
