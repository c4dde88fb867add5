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

repro: $(VENV)/.installed
	$(VENV)/bin/weclip smoke

test: $(VENV)/.installed
	$(VENV)/bin/pytest

bench: $(VENV)/.installed
	$(PY) -m weclip.benchmark --arch ViT-B-16 --batch 2 --crop 320 --steps 3
