# The two commands a new user needs are `make serve` and `make test`; both set up the venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PROTOS := $(shell find protos -name '*.proto' | sort)
PROTOC := $(BIN)/python -m grpc_tools.protoc -I protos --plugin=protoc-gen-mypy_grpc=$(BIN)/protoc-gen-mypy_grpc
# protoc writes the messages' .pyi; mypy-protobuf types the service stubs and servicers.
STUBS = --python_out=$(1) --pyi_out=$(1) --grpc_python_out=$(1) --mypy_grpc_out=quiet:$(1)

.PHONY: setup serve migrate bootstrap test test-deep lint generate check-generated bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

## Serve on the embedded default (SQLite file under var/), migrating and bootstrapping on first start.
serve: $(STAMP)
	$(BIN)/agentpost-environments serve --migrate --bootstrap-if-empty

migrate: $(STAMP)
	$(BIN)/agentpost-environments migrate

## The suite, on SQLite and, when AGENTPOST_TEST_POSTGRES_URL is set, on PostgreSQL.
test: $(STAMP)
	$(BIN)/python -m pytest -q

## The isolation state machine for at least 10,000 steps on each database.
test-deep: $(STAMP)
	AGENTPOST_ISOLATION_EXAMPLES=450 AGENTPOST_ISOLATION_STEPS=30 $(BIN)/python -m pytest -q -p no:cacheprovider tests/test_isolation_property.py

lint: $(STAMP) check-generated
	$(BIN)/ruff check service tests
	$(BIN)/ruff format --check service tests
	$(BIN)/mypy
	$(BIN)/buf lint protos

generate: $(STAMP)
	rm -rf generated/agentpost
	mkdir -p generated
	$(PROTOC) $(call STUBS,generated) $(PROTOS)

## Regenerates the stubs into a scratch folder and fails on any difference from the committed ones.
check-generated: $(STAMP)
	@tmp=$$(mktemp -d) && \
	$(PROTOC) $(call STUBS,$$tmp) $(PROTOS) && \
	diff -r $$tmp/agentpost generated/agentpost && rm -rf $$tmp && echo "generated stubs are fresh"

bench: $(STAMP)
	$(BIN)/python -m tests.bench

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
