# cloudpacs: every target sets itself up (scripts/bootstrap.sh) so a fresh clone needs no manual step.
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: setup run test test-fast lint format memcheck bench lock clean

setup:
	@bash scripts/bootstrap.sh

## Start all five services and the gateway on this machine (embedded adapters, no external servers).
run: setup
	@$(PY) -m embedded

## The full test suite, real servers included (they are started by the tests themselves); the browser
## tests need Debian's chromium and playwright-core, installed here when missing.
test: setup
	@bash scripts/install_browser.sh
	@$(PY) -m pytest $(PYTEST_ARGS)

## Unit tests only (no servers, a few seconds).
test-fast: setup
	@$(PY) -m pytest tests/unit $(PYTEST_ARGS)

lint: setup
	@$(PY) -m ruff check .
	@$(PY) -m ruff format --check .
	@$(PY) -m mypy

format: setup
	@$(PY) -m ruff format .
	@$(PY) -m ruff check --fix .

## Peak RSS of every service process during a 1 GB multi-instance STOW and a 500 MB single-instance STOW.
memcheck: setup
	@$(PY) -m scripts.memcheck

## Side-by-side benchmark against Orthanc (installs Orthanc from Debian packages; run as root).
## SCALE=N: QIDO-RS over N studies per metadata adapter; BENCH_ARGS: more options (python -m bench -h).
bench: setup
	@$(PY) -m bench $(if $(SCALE),--scale $(SCALE)) $(BENCH_ARGS)

## Re-pin requirements/runtime.txt from requirements/runtime.in.
lock:
	@rm -rf .lockvenv && python3 -m venv .lockvenv && .lockvenv/bin/pip install -q -r requirements/runtime.in \
	  && .lockvenv/bin/pip freeze > requirements/runtime.txt.new && rm -rf .lockvenv \
	  && echo "wrote requirements/runtime.txt.new: review, then move it over requirements/runtime.txt"

clean:
	rm -rf var .pytest_cache .mypy_cache .ruff_cache
