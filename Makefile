# celery-api: see the README. Every target installs what it needs into .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 8000
export PORT

.PHONY: run test serve worker beat migrate bench install install-test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip

$(VENV)/.installed: $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/pip install -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -e '.[test,dev]'
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

run: install
	$(BIN)/python -m celery_api.devstack

serve: install
	$(BIN)/gunicorn -c gunicorn.conf.py wsgi:app

INSTANCE := $${INSTANCE_PATH:-instance}

worker: install
	mkdir -p $(INSTANCE)
	$(BIN)/celery -A wsgi:celery_app worker --loglevel $${LOG_LEVEL:-INFO} \
		--hostname $${WORKER_HOSTNAME:-celery@%h} \
		$${WORKER_CONCURRENCY:+--concurrency $$WORKER_CONCURRENCY} \
		--statedb $${CELERY_API_WORKER_STATE_DB:-$(INSTANCE)/worker-%p.state}

beat: install
	mkdir -p $(INSTANCE)
	$(BIN)/celery -A wsgi:celery_app beat --loglevel $${LOG_LEVEL:-INFO} \
		--schedule $${CELERY_API_BEAT_SCHEDULE:-$(INSTANCE)/celerybeat-schedule}

migrate: install
	$(BIN)/flask --app wsgi db upgrade

test: install-test
	$(BIN)/ruff check .
	$(BIN)/pytest $(PYTEST_ARGS)

lint: install-test
	$(BIN)/ruff check .

# About 15 minutes: writes docs/BENCHMARKS.md. wrk (Debian) is used when installed.
bench: install-test
	$(BIN)/python bench/compare.py --write
	$(BIN)/python bench/history.py --write
	$(BIN)/python bench/embedded_broker.py

clean:
	rm -rf $(VENV) instance .pytest_cache
