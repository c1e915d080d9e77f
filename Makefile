# The two commands of the README:
#   make book   build the book (own virtual environment, executes every chapter)
#   make test   run every test (lint, unit and doctests on both graph backends, notebooks
#               under nbval, the benchmark smoke run, and the book build)
# Both set up everything they need on a fresh machine.

VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
NBVAL := --nbval --nbval-sanitize-with book/nbval_sanitize.cfg

.PHONY: book test lint unit notebooks bench-smoke clean

# The environment for the book and the tests (torch pinned to the CPU build, see README).
$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/pip install --quiet -r requirements.txt
	touch $@

# The compiled backends build from source against the installed torch (about 17 minutes on
# 2 cores the first time; pip caches the wheels).
$(VENV)/.installed-pyg: $(VENV)/.installed requirements-pyg.txt
	$(BIN)/pip install --quiet --no-build-isolation -r requirements-pyg.txt
	touch $@

book: $(VENV)/.installed
	rm -rf _build/html _build/.doctrees
	$(BIN)/jupyter-book build . -n -W --keep-going
	test -f _build/html/index.html
	@echo "The book is at file://$(CURDIR)/_build/html/index.html"

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Every unit test and docstring example, with torch-cluster/torch-scatter required; then
# the layers again on the pure-torch backend.
unit: $(VENV)/.installed-pyg
	SE3TUTOR_REQUIRE_PYG=1 $(BIN)/pytest -q --durations=5
	SE3TUTOR_BACKEND=torch $(BIN)/pytest -q tests/test_layers.py

notebooks: $(VENV)/.installed
	$(BIN)/pytest -q $(NBVAL) book --durations=0

bench-smoke: $(VENV)/.installed-pyg
	$(BIN)/python bench/radius_graph.py --smoke
	$(BIN)/python bench/transformer.py --smoke
	$(BIN)/python bench/peer.py --smoke

test: lint unit notebooks bench-smoke book

clean:
	rm -rf _build $(VENV) .venv-peer
