# Two commands do all the set-up: `make demo` and `make test`. Both create .venv on first use
# and install the pinned, tested versions from requirements-dev.lock (which includes the runtime
# set, requirements.lock, that the images install).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_WORKDIR ?= demo-work

.PHONY: demo test lint contracts pytest stack-test bench lock clean

$(STAMP): requirements.lock requirements-dev.lock pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "Installing pinned dependencies into $(VENV) (first run takes a few minutes)..."
	@# (grep drops pip's notes about package mirrors absent on this machine)
	@$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.lock 2>&1 \
		| { grep -v "^WARNING: Location" || true; }; test $${PIPESTATUS[0]} -eq 0
	@# setuptools prints build-backend notices for editable installs; show them only on failure.
	@$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -e . \
		> $(VENV)/install-project.log 2>&1 || { cat $(VENV)/install-project.log; exit 1; }
	@$(BIN)/python -m pip check > /dev/null
	@touch $@

demo: $(STAMP)
	@$(BIN)/unet-pipeline demo --workdir $(DEMO_WORKDIR)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

contracts: $(STAMP)
	$(BIN)/lint-imports

pytest: $(STAMP)
	$(BIN)/python -m pytest -q -m "not stack"

# The compose stack's services as local processes (tests/stack: PostgreSQL on 127.0.0.1:5432,
# venvs per image cached under ~/.cache/unet-pipeline/stack); a few minutes, longer when cold.
stack-test: $(STAMP)
	$(BIN)/python -m pytest -q -m stack tests/stack

test: lint contracts pytest

bench: $(STAMP)
	$(BIN)/python bench/model.py

# Re-resolve the locks from pyproject's ranges in a scratch venv (needs the package index): the dev
# set is installed and frozen, and deploy/lock.py splits it into requirements.lock (runtime),
# requirements-dev.lock (+ tools) and deploy/mlflow/requirements.txt, all at the same versions.
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install --quiet torch==2.13.0 -e '.[dev]'
	.lock-venv/bin/python -m pip freeze --exclude-editable | grep -v '^unet-pipeline' > .lock-venv/freeze.txt
	.lock-venv/bin/python deploy/lock.py .lock-venv/freeze.txt
	rm -rf .lock-venv

clean:
	rm -rf $(VENV) $(DEMO_WORKDIR) .ruff_cache .pytest_cache
