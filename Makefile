# The two commands of the README: `make run` and `make test`. Each installs what it needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: run test install gateways lint bench lab clean

run: $(STAMP)
	sh scripts/ensure_bubblewrap.sh
	$(BIN)/python scripts/run_stack.py

test: $(STAMP) gateways
	sh scripts/ensure_bubblewrap.sh
	sh scripts/ensure_chromium.sh
	sh scripts/ensure_postgres.sh
	$(BIN)/python -m pytest

# Virtualenvs of Jupyter Enterprise Gateway and Kernel Gateway, which the tests and
# `make bench` start on loopback ports (each pins its own jupyter_server/jupyter_client).
gateways:
	PYTHON=$(PYTHON) sh scripts/gateway_venvs.sh

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,ui]'
	touch $(STAMP)

# JupyterLab on the transcripts, with every live session kernel attachable (optional extra).
LAB_ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root,)
lab: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[lab]'
	$(BIN)/jupyter lab --no-browser $(LAB_ROOT_FLAG) \
		--ServerApp.root_dir=notebooks \
		--ServerApp.allow_external_kernels=True \
		--ServerApp.external_connection_dir=$${KERNEL_MCP_RUNTIME_DIR:-data/runtime}/kernels

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/mypy

bench: $(STAMP) gateways
	sh scripts/ensure_bubblewrap.sh
	for b in kernel_layer gateway mcp_server agent_turn notebook_export; do \
		[ -f bench/$$b.py ] || continue; $(BIN)/python bench/$$b.py || exit 1; done

clean:
	rm -rf $(VENV) data .gateway-venvs
