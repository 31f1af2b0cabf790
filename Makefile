# The two commands: `make run` and `make test`. Each creates .venv if missing and installs everything
# (pinned by requirements.lock) before it runs.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.raypipe-installed
# The CPU build of torch lies on this disk; a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: install run test smoke bench clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c requirements.lock -e ".[all,test]"
	@touch $(STAMP)

run: install
	$(BIN)/raypipe run

test: install
	$(BIN)/python -m pytest

smoke: install
	$(BIN)/raypipe run --smoke-test

clean:
	rm -rf runs .pytest_cache
