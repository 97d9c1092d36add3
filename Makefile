# Two commands do all the set-up: `make demo` and `make test`. Both create .venv on first use
# and install the pinned, tested versions from requirements.lock.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_WORKDIR ?= demo-work

.PHONY: demo test lint contracts pytest bench lock clean

$(STAMP): requirements.lock pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "Installing pinned dependencies into $(VENV) (first run takes a few minutes)..."
	@# (grep drops pip's notes about package mirrors absent on this machine)
	@$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.lock 2>&1 \
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
	$(BIN)/python -m pytest -q

test: lint contracts pytest

bench: $(STAMP)
	$(BIN)/python bench/model.py

# Re-resolve the lock from pyproject's ranges in a scratch venv (needs the package index).
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install --quiet torch==2.13.0 -e '.[dev]'
	{ echo "# Pinned, tested together on Python 3.11 (CPU). Regenerate with: make lock"; \
	  echo "# torch is the CPU build; on a CUDA machine see README (GPU install)."; \
	  .lock-venv/bin/python -m pip freeze --exclude-editable | grep -v '^unet-pipeline'; } > requirements.lock
	rm -rf .lock-venv

clean:
	rm -rf $(VENV) $(DEMO_WORKDIR) .ruff_cache .pytest_cache
