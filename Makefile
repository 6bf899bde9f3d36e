# Two commands set up everything: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
COMPAT := .venv-compat
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8787

.PHONY: install run test deploy-test lint fmt typecheck bench bench-quick profile soak compat clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[server,openai,dev]'
	touch $(STAMP)

install: $(STAMP)

# The published till-ac SDK shares our import name, so it lives in its own venv.
$(COMPAT)/.installed:
	$(PYTHON) -m venv $(COMPAT)
	$(COMPAT)/bin/pip install --quiet 'till-ac==0.1.1' 'openai>=1.40'
	touch $@

compat: $(COMPAT)/.installed

run: $(STAMP)
	$(BIN)/till serve --host $(HOST) --port $(PORT)

test: $(STAMP) $(COMPAT)/.installed
	TILL_COMPAT_PYTHON=$(CURDIR)/$(COMPAT)/bin/python $(BIN)/pytest

# The compose topology with local processes (deploy/README.md, "make deploy-test"): Debian's
# nginx with deploy/nginx.conf, three `till serve`, redis-server with AOF. Prints its figures.
deploy-test: $(STAMP)
	$(BIN)/pytest -m deploy -s -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

fmt: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Benchmarks: wrk is used when installed (apt-get install wrk), else a built-in driver.
bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

bench-quick: $(STAMP)
	$(BIN)/python benchmarks/run.py --quick

profile: $(STAMP)
	$(BIN)/python benchmarks/run.py --profile

# The long versions of the concurrency and fault tests (minutes): SOAK_ARGS="--seconds 600".
soak: $(STAMP)
	$(BIN)/python benchmarks/soak.py $(SOAK_ARGS)

clean:
	rm -rf $(VENV) $(COMPAT) .pytest_cache .mypy_cache .ruff_cache
