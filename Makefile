# Each target does its own set-up: a virtualenv in .venv holding exactly what the lock names.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
# pip warns about every package the machine's extra local indexes lack; keep the noise out of the log
QUIET := 2>&1 | { grep -v 'is ignored: it is neither a file nor a directory' || true; }
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LOCKED := $(VENV)/.locked

# The lock: every installed version, with its hashes. requirements/dev.txt is what make demo, test and
# bench install (the runtime, the test, bench and docs extras, pip and setuptools); requirements/runtime.txt,
# the same versions without the extras, is what the Docker image installs. `make lock` refreshes both.
LOCK := requirements/dev.txt
LOCK_VENV := .venv-lock
PIP_COMPILE := $(LOCK_VENV)/bin/pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras \
	--no-emit-index-url --no-emit-find-links
LOCK_ARGS ?= --upgrade

# Debian's Fashion-MNIST (IDX files in /usr/share/datasets/fashion-mnist): the built-in offline dataset that
# fashion_mnist jobs, the demo, the tests and the benchmarks read; installed as root when missing.
FASHION_MNIST := /usr/share/datasets/fashion-mnist

.PHONY: demo test bench clean vendor datasets lock docs

# A new lock makes a new virtualenv: nothing that the old lock named stays behind. (Bytecode is compiled at
# install: --no-compile saves a minute here but costs far more where PYTHONDONTWRITEBYTECODE is set, as on
# this machine, where every process then compiles what it imports.)
$(LOCKED): $(LOCK)
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --require-hashes -r $(LOCK) $(QUIET)
	touch $(LOCKED)

# Ladle itself, editable, with nothing more: its dependencies and its build backend are the lock's.
$(STAMP): $(LOCKED) pyproject.toml
	$(PY) -m pip install -q --no-deps --no-build-isolation -e . $(QUIET)
	touch $(STAMP)

# Refresh the lock deliberately (new releases within pyproject.toml's ranges): after changing a dependency
# in pyproject.toml (`make lock LOCK_ARGS=` keeps every other pin), or to take upgrades; then `make test`.
lock:
	test -x $(LOCK_VENV)/bin/pip-compile || { $(PYTHON) -m venv $(LOCK_VENV) \
	  && $(LOCK_VENV)/bin/pip install -q pip==26.3 pip-tools==7.7.0 $(QUIET); }
	$(PIP_COMPILE) $(LOCK_ARGS) -o requirements/runtime.txt pyproject.toml requirements/runtime.in $(QUIET)
	$(PIP_COMPILE) $(LOCK_ARGS) --extra test --extra bench --extra docs -o $(LOCK) \
	  pyproject.toml requirements/runtime.in requirements/dev.in $(QUIET)

datasets:
	test -f $(FASHION_MNIST)/train-images-idx3-ubyte.gz || { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; }

demo: $(STAMP) datasets
	$(VENV)/bin/ladle demo

# The documentation site (docs/, mkdocs.yml) into site/; tests/test_docs.py builds it with --strict
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

test: $(STAMP) datasets
	command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium; }
	@[ "$${LADLE_SKIP_POSTGRES:-0}" = 1 ] || bash deploy/dev-services.sh
	$(PY) -m pytest -n 2 --dist loadfile

bench: $(STAMP) datasets
	command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
	$(PY) bench/soup_vs_imp.py
	$(PY) bench/fanout.py
	$(PY) bench/api_load.py
	$(PY) bench/search_vs_default.py
	$(PY) bench/perp.py
	$(PY) bench/sfw_vs_sgd.py
	$(PY) bench/sparse_inference.py
	$(PY) bench/structured_soups.py
	$(PY) bench/structured.py --gguf ~/.ladle/bench/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
	$(PY) bench/structured_lm.py

# Re-fetch the dashboard's vendored front-end builds and Swagger UI for /docs (versions in api/dashboard/vendor/VERSIONS)
vendor:
	tmp=$$(mktemp -d) && cd $$tmp && npm pack -q chart.js@4.6.1 @dagrejs/dagre@3.1.3 swagger-ui-dist@5.35.0 >/dev/null \
	  && for t in *.tgz; do mkdir -p $${t%.tgz} && tar xzf $$t -C $${t%.tgz}; done \
	  && cp chart.js-4.6.1/package/dist/chart.umd.min.js chart.js-4.6.1/package/LICENSE.md $(CURDIR)/api/dashboard/vendor/ \
	  && mv $(CURDIR)/api/dashboard/vendor/LICENSE.md $(CURDIR)/api/dashboard/vendor/chart.js.LICENSE.md \
	  && cp dagrejs-dagre-3.1.3/package/dist/dagre.min.js $(CURDIR)/api/dashboard/vendor/ \
	  && cp dagrejs-dagre-3.1.3/package/LICENSE $(CURDIR)/api/dashboard/vendor/dagre.LICENSE \
	  && cp swagger-ui-dist-5.35.0/package/swagger-ui-bundle.js swagger-ui-dist-5.35.0/package/swagger-ui.css \
	        $(CURDIR)/api/dashboard/vendor/ \
	  && cp swagger-ui-dist-5.35.0/package/swagger-ui-bundle.js.LICENSE.txt $(CURDIR)/api/dashboard/vendor/ \
	  && cp swagger-ui-dist-5.35.0/package/LICENSE $(CURDIR)/api/dashboard/vendor/swagger-ui.LICENSE \
	  && cp swagger-ui-dist-5.35.0/package/NOTICE $(CURDIR)/api/dashboard/vendor/swagger-ui.NOTICE && rm -rf $$tmp

clean:
	rm -rf $(VENV) $(LOCK_VENV) .ladle .pytest_cache
