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
