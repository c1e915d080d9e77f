# The two commands of the README:
#   make book   build the book (own virtual environment, executes every chapter)
#   make test   run every test (lint, unit and doctests on both graph backends, notebooks
#               under nbval, the benchmark smoke run, the book build, the book in a browser,
#               and the chapters in a Colab-like environment)
# Both set up everything they need on a fresh machine (but the system packages that
# .ci/run installs: Chromium and ChromeDriver for browser-check).

VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
NBVAL := --nbval --nbval-sanitize-with book/nbval_sanitize.cfg

.PHONY: book test lint unit quick notebooks bench-smoke browser-check colab-check clean

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

# MathJax 3 is served with the book, so that the math renders offline: installed from the
# npm registry at build time (not committed), its es5/ bundle staged in _build/static, which
# _config.yml gives Sphinx as a static path (pages load _static/mathjax/tex-mml-chtml.js).
MATHJAX_VERSION ?= 3.2.2
MATHJAX_STAMP := _build/npm/.mathjax-$(MATHJAX_VERSION)

$(MATHJAX_STAMP):
	npm install --prefix _build/npm --no-save --no-audit --no-fund --loglevel=error \
		mathjax@$(MATHJAX_VERSION)
	rm -rf _build/static/mathjax
	mkdir -p _build/static
	cp -R _build/npm/node_modules/mathjax/es5 _build/static/mathjax
	touch $@

book: $(VENV)/.installed $(MATHJAX_STAMP)
	rm -rf _build/html _build/.doctrees
	$(BIN)/jupyter-book build . -n -W --keep-going
	test -f _build/html/index.html
	@echo "The book is at file://$(CURDIR)/_build/html/index.html"

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python ci/make_student_notebooks.py --check  # student exercises = generated ones
	$(BIN)/python ci/check_notebook_width.py  # code in the chapters fits the page (80 columns)

# Every unit test and docstring example, with torch-cluster/torch-scatter required; then
# the layers again on the pure-torch backend.
unit: $(VENV)/.installed-pyg
	SE3TUTOR_REQUIRE_PYG=1 $(BIN)/pytest -q --durations=5
	SE3TUTOR_BACKEND=torch $(BIN)/pytest -q tests/test_layers.py

# The quick loop while editing: the unit tests and doctests without the slow ones (training
# subprocesses, torchrun, torch.compile, student notebooks run), on whatever backend is there.
quick: $(VENV)/.installed
	$(BIN)/pytest -q -m "not slow"

notebooks: $(VENV)/.installed
	$(BIN)/pytest -q $(NBVAL) book --durations=0

bench-smoke: $(VENV)/.installed-pyg
	$(BIN)/python bench/radius_graph.py --smoke
	$(BIN)/python bench/transformer.py --smoke --backends e3nn,cuequivariance
	$(BIN)/python bench/transformer.py --gpu  # skipped (and says so) without CUDA
	$(BIN)/python bench/peer.py --smoke
	$(BIN)/python bench/headline.py --smoke
	$(BIN)/python bench/nbody.py --smoke
	$(BIN)/python bench/potential_variants.py --smoke
	$(BIN)/python bench/transformer.py --smoke --compile --points 300  # torch.compile traces
	$(BIN)/python bench/attention_overflow.py --smoke
	$(BIN)/python bench/normalization_depth.py --smoke
	$(BIN)/python bench/bulk_copper.py --smoke

# Every chapter page of the built book in headless Chromium (ci/browser_check.py): the math
# rendered, every figure loaded, the Colab and Binder buttons there; screenshots in
# _build/screenshots. First the checker's own tests on small hand-made pages.
browser-check: book
	$(BIN)/pytest -q ci/test_browser_check.py
	$(BIN)/python ci/browser_check.py

# Every chapter in a Colab-like environment of its own (.venv-colab: another torch release,
# the newest e3nn, se3tutor without its optional compiled extras); see ci/colab_env.sh.
colab-check:
	PYTHON=$(PYTHON) bash ci/colab_env.sh

test: lint unit notebooks bench-smoke book browser-check colab-check

clean:
	rm -rf _build $(VENV) .venv-peer .venv-equiformer .venv-colab
