# make run: serve on http://127.0.0.1:5000 with the echo agent; make test: the whole suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 5000

.PHONY: install run test clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	touch $@

run: install
	CHATAPP_ENV=development $(BIN)/flask --app wsgi db upgrade
	@echo
	@echo "Try it (the token is valid for an hour):"
	@CHATAPP_ENV=development $(BIN)/flask --app wsgi create-token demo --expires-in 3600 --curl http://127.0.0.1:$(PORT)
	@echo
	CHATAPP_ENV=development $(BIN)/flask --app wsgi run --host 127.0.0.1 --port $(PORT) --with-threads

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache

# make bench: the benchmark of bench/README.md, on PostgreSQL (a few minutes; it writes
# bench/results/<date>-<commit>.md). BENCH_ARGS="--sqlite", "--scenarios S1,S3", "--runs 1"...
# make bench-deps: wrk, nginx and its echo module, and pgbouncer (--instances), from Debian's packages, when missing.
BENCH_ARGS ?=
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: bench bench-deps

bench: install bench-deps
	$(BIN)/python bench/run.py $(BENCH_ARGS)

bench-deps:
	@if command -v wrk >/dev/null 2>&1 && { command -v nginx >/dev/null 2>&1 || test -x /usr/sbin/nginx; } \
		&& test -f /usr/lib/nginx/modules/ngx_http_echo_module.so \
		&& { command -v pgbouncer >/dev/null 2>&1 || test -x /usr/sbin/pgbouncer; }; then \
		echo "bench-deps: wrk, nginx and its echo module, and pgbouncer are installed"; \
	else \
		$(SUDO) apt-get update && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
			wrk nginx libnginx-mod-http-echo pgbouncer; \
	fi

# make e2e: gunicorn with production settings on 127.0.0.1, then newman (postman/) and schemathesis
# (/openapi.json) against it (e2e/run.py). newman is installed from package-lock.json into node_modules/.
.PHONY: e2e

e2e: install node_modules/.installed
	$(BIN)/python e2e/run.py

node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund
	touch $@
