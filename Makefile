# Every target sets itself up: the virtual environment is created on first use.
PY      := .venv/bin/python
VENV    := .venv/.installed
DATA    ?= data
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export NO_ALBUMENTATIONS_UPDATE ?= 1
export MLFLOW_TRACKING_URI ?= sqlite:///mlflow.db

.PHONY: sample test lint format bench clean install

install: $(VENV)

$(VENV): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	# torch==2.13.0 is pinned in pyproject.toml: pip takes the CPU wheel, not a CUDA build.
	$(PY) -m pip install --quiet -e '.[dev]'
	# img2dataset drags in the `dataclasses` backport, which shadows the standard library on
	# Python 3.11 and breaks pydantic inside Prefect's server (docs/design.md, trap 1).
	$(PY) -m pip uninstall --yes --quiet dataclasses || true
	touch $(VENV)

## make sample: the whole pipeline on the tiny sample web (sample web -> crawl -> curate -> train
## -> evaluate), ephemeral Prefect, SQLite MLflow; ends with the zero-shot table.
sample: $(VENV)
	$(PY) -m flows.pipeline --profile tiny --set data_root=$(DATA)

## make test: lint, then the whole test suite.
test: $(VENV) lint
	$(PY) -m pytest -q

lint: $(VENV)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(VENV)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

bench: $(VENV)
	for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(DATA) mlflow.db mlartifacts
