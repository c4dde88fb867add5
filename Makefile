# Two entry points: `make repro` runs the pipeline, `make test` runs the tests.
# Both create the virtual environment .venv on first use.
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1

.PHONY: repro test bench install

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# Until the DVC pipeline lands, the main job is the benchmark of the core package on a small
# open_clip ViT with random weights.
repro: $(VENV)/.installed
	$(VENV)/bin/weclip benchmark --arch ViT-S-16 --batch 2 --crop 224 --steps 3 --warmup 1 --infer-images 2 --device cpu

test: $(VENV)/.installed
	$(VENV)/bin/pytest

bench: $(VENV)/.installed
	$(VENV)/bin/weclip benchmark --arch ViT-B-16 --batch 4 --crop 320
