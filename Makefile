# The two commands a new user needs are `make serve` and `make test`; both set up the venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PROTOS := $(shell find protos -name '*.proto' | sort)
# google/api/annotations.proto (the REST mapping) comes from the pinned googleapis-common-protos
# package, whose wheel ships the .proto files beside their Python modules: its install root is an
# include path. Nothing is vendored and nothing is fetched. (Evaluated when used: after setup.)
GOOGLEAPIS_PROTOS = $(shell $(BIN)/python -c 'import google.api, pathlib; print(pathlib.Path(list(google.api.__path__)[0]).parents[1])')
PROTOC = $(BIN)/python -m grpc_tools.protoc -I protos -I $(GOOGLEAPIS_PROTOS) --plugin=protoc-gen-mypy_grpc=$(BIN)/protoc-gen-mypy_grpc
# protoc writes the messages' .pyi; mypy-protobuf types the service stubs and servicers.
STUBS = --python_out=$(1) --pyi_out=$(1) --grpc_python_out=$(1) --mypy_grpc_out=quiet:$(1)

.PHONY: setup serve migrate bootstrap test test-deep lint breaking generate check-generated descriptors bench bench-large clean

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

## buf reads the protos as an image that protoc builds (buf alone would fetch google/api from a
## registry); `--path agentpost` keeps the rules to our files, not the imported ones.
lint: $(STAMP) check-generated breaking
	$(BIN)/ruff check service tests
	$(BIN)/ruff format --check service tests
	$(BIN)/mypy
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	$(PROTOC) --include_imports --include_source_info -o $$tmp/protos.binpb $(PROTOS) && \
	$(BIN)/buf lint $$tmp/protos.binpb --config protos/buf.yaml --path agentpost && \
	echo "buf lint: clean"

## buf breaking: the protos of the work tree against those of the base commit, both built by
## protoc as above. The base is where this branch left main (merge-base) or, on main itself, the
## previous commit (HEAD^1), so every change to main is checked once. A clone without that
## commit (shallow, or not a git checkout) cannot compare and says so instead of failing.
breaking: $(STAMP)
	@base=""; \
	main=$$(git rev-parse -q --verify main || git rev-parse -q --verify origin/main || true); \
	head=$$(git rev-parse -q --verify HEAD || true); \
	if [ -n "$$main" ] && [ -n "$$head" ] && [ "$$main" != "$$head" ]; then \
		base=$$(git merge-base HEAD "$$main" || true); \
	elif [ -n "$$head" ]; then \
		base=$$(git rev-parse -q --verify 'HEAD^1' || true); \
	fi; \
	if [ -z "$$base" ] || ! git cat-file -e "$$base:protos" 2>/dev/null; then \
		echo "buf breaking: skipped, no base commit with protos/ in this clone (shallow? run git fetch --deepen=1)"; \
		exit 0; \
	fi; \
	tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	git archive "$$base" protos | tar -x -C $$tmp && \
	$(BIN)/python -m grpc_tools.protoc -I $$tmp/protos -I $(GOOGLEAPIS_PROTOS) --include_imports \
		--include_source_info -o $$tmp/base.binpb $$(find $$tmp/protos -name '*.proto' | sort) && \
	$(PROTOC) --include_imports --include_source_info -o $$tmp/head.binpb $(PROTOS) && \
	$(BIN)/buf breaking $$tmp/head.binpb --against $$tmp/base.binpb --config protos/buf.yaml --path agentpost && \
	echo "buf breaking: no breaking change against $$(git rev-parse --short $$base)"

generate: $(STAMP)
	rm -rf generated/agentpost
	mkdir -p generated
	$(PROTOC) $(call STUBS,generated) $(PROTOS)

## Regenerates the stubs into a scratch folder and fails on any difference from the committed ones.
check-generated: $(STAMP)
	@tmp=$$(mktemp -d) && \
	$(PROTOC) $(call STUBS,$$tmp) $(PROTOS) && \
	diff -r $$tmp/agentpost generated/agentpost && rm -rf $$tmp && echo "generated stubs are fresh"

## The descriptor set a gRPC-JSON transcoder (Envoy's grpc_json_transcoder) needs for the REST
## mapping: the protos, their imports, and the error details it renders into JSON error bodies.
descriptors: $(STAMP)
	mkdir -p var
	$(PROTOC) --include_imports --include_source_info -o var/agentpost-environments.binpb \
		$(PROTOS) google/rpc/status.proto google/rpc/error_details.proto
	@echo "wrote var/agentpost-environments.binpb"

bench: $(STAMP)
	$(BIN)/python -m tests.bench $(BENCH_ARGS)

## The hot paths on 1,000,000 keys and 100,000 environments in one organization (beside 10,000
## small organizations) against a small database: seeds both (about 7 minutes), then measures.
bench-large: $(STAMP)
	$(BIN)/python -m tests.bench.large $(BENCH_ARGS)

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache tests/node/node_modules
