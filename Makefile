# The README's commands. `make train` and `make test` set everything up on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install -q --disable-pip-version-check -c requirements.lock
STAMP  := $(VENV)/.installed
ARGS   ?=
TRAIN_CONFIG ?= configs/tiny.toml

.PHONY: setup train test bench clean

setup: $(STAMP)

# torch first (the local CPU wheel), then the build backend, then lima_kernels (pure Python, its
# own package) and lima-core in place, built against that torch (--no-build-isolation), with
# every version pinned by requirements.lock.
# Debian's chromium for the annotation page's browser test (Playwright drives /usr/bin/chromium;
# its own browser download is never used); installed as root only where it is missing.
$(STAMP): pyproject.toml kernels/pyproject.toml requirements.lock CMakeLists.txt $(wildcard csrc/*)
	test -x /usr/bin/chromium || (export DEBIAN_FRONTEND=noninteractive; apt-get install -y chromium || (apt-get update && apt-get install -y chromium))
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) scikit-build-core==1.1.2
	$(PIP) --no-build-isolation -e ./kernels
	$(PIP) --no-build-isolation -e '.[test]'
	touch $(STAMP)

train: setup
	$(PY) -m lima_core.train --config $(TRAIN_CONFIG) $(ARGS)

# The linter first (ruff, configured in pyproject.toml): a lint error fails the suite.
test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q tests

bench: setup
	$(PY) -m pytest bench/

clean:
	rm -rf $(VENV) build runs .pytest_cache
