# Two commands do all the set-up on a fresh machine: `make run` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test install protos typecheck bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first: pins the CPU build so the range in pyproject.toml installs nothing more.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

protos: $(STAMP)
	$(BIN)/python -m protos.generate

run: $(STAMP)
	$(BIN)/potluck up

test: $(STAMP)
	$(BIN)/python -m protos.generate --check
	$(BIN)/mypy server scheduler node_agent protos
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

bench: $(STAMP)
	$(BIN)/potluck bench

clean:
	rm -rf $(VENV)
