# Every target sets itself up: the virtual environment is created on first use.
PY      := .venv/bin/python
VENV    := .venv/.installed
DATA    ?= data
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export NO_ALBUMENTATIONS_UPDATE ?= 1
export MLFLOW_TRACKING_URI ?= sqlite:///mlflow.db

.PHONY: sample test lint format bench clean install lock

install: $(VENV)

$(VENV): pyproject.toml requirements.lock
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	# Every dependency at the version requirements.lock names (`make lock` re-resolves it);
	# torch==2.13.0 there takes the CPU wheel on disk, not a CUDA build (README, "Install").
	$(PY) -m pip install --quiet -r requirements.lock
	# Then the project itself, editable, its dependencies already in place.
	$(PY) -m pip install --quiet --no-deps -e '.[dev]'
	# img2dataset asks for the `dataclasses` backport, which shadows the standard library on
	# Python 3.11 and breaks pydantic inside Prefect's server (docs/design.md, trap 1).
	$(PY) -m pip uninstall --yes --quiet dataclasses || true
	touch $(VENV)

## make lock: re-resolve requirements.lock from pyproject.toml with pip's resolver (this machine:
## Linux x86_64, Python 3.11, torch's CPU wheel on disk). It installs nothing; commit the result.
lock:
	$(PY) -m pip install --dry-run --quiet --ignore-installed --report .lock-report.json '.[dev]'
	grep "^#" requirements.lock > requirements.lock.tmp
	$(PY) -c 'import json, re; r = json.load(open(".lock-report.json")); \
	  pins = {re.sub(r"[-_.]+", "-", i["metadata"]["name"]).lower(): i["metadata"]["version"].split("+")[0] for i in r["install"]}; \
	  print("".join(f"{n}=={v}\n" for n, v in sorted(pins.items()) if n not in ("clip-pipeline", "dataclasses")), end="")' \
	  >> requirements.lock.tmp
	mv requirements.lock.tmp requirements.lock
	rm -f .lock-report.json

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
