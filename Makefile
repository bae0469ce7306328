# The two entry points (see README): `make run` and `make test`. Both set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= examples/sst2-minilm-lora.yaml

.PHONY: setup run test bench compile clean

setup:
	bash scripts/setup.sh

run: setup
	$(VENV)/bin/kftune run $(CONFIG)

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) bench/overhead.py

compile: setup
	$(VENV)/bin/kftune compile $(CONFIG) -o pipeline.yaml

clean:
	rm -rf runs pipeline.yaml
