# Each target does its own set-up: a virtualenv in .venv with the project and its test and bench extras.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
# pip warns about every package the machine's extra local indexes lack; keep the noise out of the log
QUIET := 2>&1 | { grep -v 'is ignored: it is neither a file nor a directory' || true; }
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Debian's Fashion-MNIST (IDX files in /usr/share/datasets/fashion-mnist): the built-in offline dataset that
# fashion_mnist jobs, the demo, the tests and the benchmarks read; installed as root when missing.
FASHION_MNIST := /usr/share/datasets/fashion-mnist

.PHONY: demo test bench clean vendor datasets

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip $(QUIET)
	$(PY) -m pip install -q -e '.[test,bench]' $(QUIET)
	touch $(STAMP)

datasets:
	test -f $(FASHION_MNIST)/train-images-idx3-ubyte.gz || { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; }

demo: $(STAMP) datasets
	$(VENV)/bin/ladle demo

test: $(STAMP) datasets
	command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium; }
	@[ "$${LADLE_SKIP_POSTGRES:-0}" = 1 ] || bash deploy/dev-services.sh
	$(PY) -m pytest

bench: $(STAMP) datasets
	command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
	$(PY) bench/soup_vs_imp.py
	$(PY) bench/fanout.py
	$(PY) bench/api_load.py
	$(PY) bench/search_vs_default.py
	$(PY) bench/perp.py
	$(PY) bench/sfw_vs_sgd.py
	$(PY) bench/sparse_inference.py

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
	rm -rf $(VENV) .ladle .pytest_cache
