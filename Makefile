# One venv for everything. TORCH_SPEC picks the torch build: the default is the CPU wheel
# available offline here; on a CUDA machine use e.g. TORCH_SPEC="torch --index-url ...".
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test lint format demo demo-sdxl bench bench-memory clean

setup: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: setup
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

test: setup lint
	$(PY) -m pytest -q -n 2  # two workers: the CLI tests run one thread each

demo: setup
	$(PY) -m tools.demo

demo-sdxl: setup  # the same demo on the SDXL-layout model with sdxl_train_textual_inversion.py
	$(PY) -m tools.demo --sdxl

bench: setup
	$(PY) -m bench.bench

bench-memory: setup  # the trainer's peak RSS alone, on the issue-15 command
	$(PY) -m bench.trainer_memory

clean:
	rm -rf .cache demo_output demo_output_sdxl bench/results
