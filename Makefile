# Entry points: `make repro` runs the pipeline, `make ui` serves the Prefect UI on its runs,
# `make test` runs the tests (`make test-fast` all but the slow ones). Each creates the virtual
# environment .venv on first use.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: repro ui test test-fast bench install

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# The whole pipeline (dvc.yaml) on the parameters of params.yaml, all its stages reporting to
# one Prefect server (started for it and stopped after, unless PREFECT_API_URL is set or
# `make ui` is serving), so the UI shows the runs while they go.
repro: $(VENV)/.installed
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pipeline.prefect_env serve -- dvc repro

# The Prefect UI on .prefect/ (every run of this folder), at http://127.0.0.1:4200.
ui: $(VENV)/.installed
	$(VENV)/bin/weclip ui

# The tests download nothing: HF_HUB_OFFLINE keeps open_clip off the model hub.
test: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(VENV)/bin/pytest --durations=15

test-fast: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(VENV)/bin/pytest -m "not slow"

bench: $(VENV)/.installed
	$(VENV)/bin/weclip benchmark --arch ViT-B-16 --batch 4 --crop 320
