# Each target does its own set-up: a virtualenv in .venv with the project and its test extras.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
# pip warns about every package the machine's extra local indexes lack; keep the noise out of the log
QUIET := 2>&1 | { grep -v 'is ignored: it is neither a file nor a directory' || true; }
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip $(QUIET)
	$(PY) -m pip install -q -e '.[test]' $(QUIET)
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ladle demo

test: $(STAMP)
	@[ "$${LADLE_SKIP_POSTGRES:-0}" = 1 ] || bash deploy/dev-services.sh
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) bench/soup_vs_imp.py
	$(PY) bench/fanout.py
	$(PY) bench/api_load.py

clean:
	rm -rf $(VENV) .ladle .pytest_cache
