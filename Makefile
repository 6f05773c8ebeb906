# The two commands a newcomer needs: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
EXTRAS := dev,demo,kafka,rabbitmq,nats,redis,webhook,testing,docs

.PHONY: demo test lint unit bench schema docs clean image

# A stamp of this Makefile's own, not the venv's outbox-relay script: a .venv made by hand (the
# README's install, with fewer extras) must still get the extras these targets need.
READY  := $(VENV)/.installed-by-make

$(READY): pyproject.toml Makefile
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { apt-get update -qq && apt-get install -y -qq python3-venv && $(PYTHON) -m venv $(VENV); }
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[$(EXTRAS)]'
	@touch $@

$(BIN)/outbox-relay: $(READY)

demo: $(READY)
	$(BIN)/outbox-relay demo --duration 15s

# mypy cannot follow the editable install's import hook, so it reads the package through links
# named as installed: outbox_relay -> relay/*, outbox_relay/connectors -> connectors/.
lint: $(READY)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	@rm -rf $(VENV)/typecheck && mkdir -p $(VENV)/typecheck/outbox_relay
	@ln -s $(CURDIR)/relay/* $(VENV)/typecheck/outbox_relay/
	@ln -s $(CURDIR)/connectors $(VENV)/typecheck/outbox_relay/connectors
	$(BIN)/mypy

# Installs the servers the tests need when missing, then lints and runs every test against real
# servers the tests start themselves (or RELAY_TEST_PG_DSN / KAFKA_BOOTSTRAP_SERVERS when set), on two
# pytest-xdist workers (each starts its own private servers), with the slowest tests listed.
test: lint
	bash tests/install-servers.sh
	@$(BIN)/pytest -n 2 --dist loadgroup --durations=15; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: that is a failure"; exit 1; fi; exit $$rc

unit: $(READY)
	$(BIN)/pytest tests/unit tests/contract

bench: $(READY)
	bash tests/install-servers.sh
	for b in bench_polling_file bench_polling_kafka bench_polling_rabbitmq bench_logical bench_more_sinks bench_versions; do $(BIN)/python -m tests.bench.$$b || exit 1; done

schema: $(READY)
	$(BIN)/outbox-relay schema > config/relay.schema.json

# The documentation site (docs/, mkdocs.yml) into site/; --strict fails on a broken link.
docs: $(READY)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# The container image, outbox-relay:<version>, built with podman from local images only:
# tests/deploy/podman-setup installs podman when missing and, when the Dockerfile's pinned base is
# not in podman's storage, makes a local stand-in for it (once; later builds find it) that --from
# puts in the pinned FROM's place. pip inside the build reaches PyPI. Docker format: OCI has no HEALTHCHECK.
IMAGE := outbox-relay:$(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
image: export CONTAINERS_CONF ?= $(CURDIR)/tests/deploy/containers.conf
image:
	flags=$$(bash tests/deploy/podman-setup --build-flags) && podman build $$flags --format=docker --tag $(IMAGE) .

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info site
