# celery-api: see the README. Every target installs what it needs into .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 8000
export PORT

.PHONY: run test serve worker webhook-worker beat migrate bench screenshots install install-test lint lock clean

# Every install is from the lock files (see "Dependencies and the lock file" in the README):
# requirements.lock for running, requirements-test.lock (runtime + extras test, dev) for the
# suite, then this project itself with --no-deps. Editing a lock reinstalls.
LOCK := requirements.lock
TEST_LOCK := requirements-test.lock
# pip itself, at the version the locks were made with (pip-tools brings it into the test lock).
PIP_PIN = $(shell grep -E '^pip==' $(TEST_LOCK))

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The project is built with the setuptools and wheel pinned in the lock (no build isolation,
# which would fetch the newest ones).
$(VENV)/.installed: $(BIN)/python $(LOCK) $(TEST_LOCK) setup.cfg pyproject.toml
	$(BIN)/python -m pip install --quiet '$(PIP_PIN)'
	$(BIN)/pip install -r $(LOCK)
	$(BIN)/pip install --no-deps --no-build-isolation -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed $(TEST_LOCK)
	$(BIN)/pip install -r $(TEST_LOCK)
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

# Webhook deliveries (README, Webhooks): only the `webhooks` queue, in threads (each
# delivery waits on a receiver's network, not on a CPU), so a slow receiver never holds a
# task worker. Task workers (make worker) do not consume `webhooks`.
webhook-worker: install
	$(BIN)/celery -A wsgi:celery_app worker --queues webhooks --pool threads \
		--concurrency $${WEBHOOK_CONCURRENCY:-8} --loglevel $${LOG_LEVEL:-INFO} \
		--hostname $${WEBHOOK_WORKER_HOSTNAME:-webhooks@%h} --without-gossip --without-mingle

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
	$(BIN)/python bench/launch_ceiling.py --write
	$(BIN)/python bench/limit_roundtrips.py
	$(BIN)/python bench/history.py --write
	$(BIN)/python bench/schedules.py --write
	$(BIN)/python bench/waiting.py --write
	$(BIN)/python bench/console.py --write
	$(BIN)/python bench/embedded_broker.py

# The console's screenshots in docs/console/ (the README shows them): Debian's chromium.
screenshots: install-test
	$(BIN)/python bench/console_screenshots.py

# Re-generate both locks from setup.cfg with pip-compile (pip-tools, from the dev extra).
# Pins are kept wherever setup.cfg still allows them; to move them on:
#   make lock UPGRADE='--upgrade-package flask'      (one package, and what it needs)
#   make lock UPGRADE=--upgrade                      (everything)
# The test lock is constrained by the runtime lock, so both pin the same runtime versions.
PIP_COMPILE = CUSTOM_COMPILE_COMMAND="make lock" $(BIN)/pip-compile --quiet --allow-unsafe \
	--strip-extras --build-deps-for editable --no-emit-index-url --no-emit-find-links \
	--no-emit-trusted-host $(UPGRADE)

lock: install-test
	$(PIP_COMPILE) --output-file $(LOCK) setup.cfg
	$(PIP_COMPILE) --extra test --extra dev --constraint $(LOCK) --output-file $(TEST_LOCK) setup.cfg

clean:
	rm -rf $(VENV) instance .pytest_cache
