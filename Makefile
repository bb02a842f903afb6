# The two commands the README starts with: `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= config/agent.toml

.PHONY: run test lint test-tools rabbitmq bench bench-peers bench-fleet chaos clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall only when the project's metadata changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --disable-pip-version-check -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@ $(VENV)/.installed

# The broker is $(MQTT_HOST):$(MQTT_PORT) (default 127.0.0.1:1883). Where nothing answers
# there and Mosquitto is installed, tools/run.py starts a throwaway one for the session
# and prints the events that arrive; where a broker answers, the agent uses it.
run: $(VENV)/.installed
	mkdir -p var/inbox var/state
	$(BIN)/python tools/run.py -c $(CONFIG)

# The tests start their own brokers and need the mosquitto binary; the disk
# fault tests use strace to make a write or an fsync fail, the clock-step test
# libfaketime to move the agent's wall clock, the journald tests
# systemd-journal-remote to write journal files (journald need not run).
test-tools:
	@if command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; then \
		: ; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "mosquitto is missing; installing Debian's mosquitto package"; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q mosquitto; \
	else \
		echo "error: the tests need the mosquitto broker binary, and it is not installed."; \
		echo "       Install it as root (Debian/Ubuntu: apt-get install mosquitto), then run make test again."; \
		exit 1; \
	fi
	@if ! command -v strace >/dev/null 2>&1; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "strace is missing; installing it for the disk fault tests"; \
			DEBIAN_FRONTEND=noninteractive apt-get install -y -q strace \
				|| (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q strace); \
		else \
			echo "note: strace is not installed; the injected-fault tests will be skipped."; \
		fi; \
	fi
	@if ! ls /usr/lib/*/faketime/libfaketimeMT.so.1 >/dev/null 2>&1; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "libfaketime is missing; installing it for the clock-step test"; \
			DEBIAN_FRONTEND=noninteractive apt-get install -y -q faketime \
				|| (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q faketime); \
		else \
			echo "note: libfaketime is not installed; the clock-step test will be skipped."; \
		fi; \
	fi
	@if [ ! -x /lib/systemd/systemd-journal-remote ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "systemd-journal-remote is missing; installing it for the journald tests"; \
			DEBIAN_FRONTEND=noninteractive apt-get install -y -q systemd-journal-remote \
				|| (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q systemd-journal-remote); \
		else \
			echo "note: systemd-journal-remote is not installed; the journald tests will be skipped."; \
		fi; \
	fi

# The AMQP tests use the RabbitMQ on 127.0.0.1:5672: start an installed one that is not running.
rabbitmq:
	@if command -v rabbitmq-server >/dev/null 2>&1 && ! (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; then \
		echo "starting the installed RabbitMQ for the AMQP tests"; \
		rabbitmq-server -detached; \
		for i in $$(seq 60); do (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null && break; sleep 1; done; \
	fi

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Three workers, even on two cores: most tests wait on brokers, agents and the kernel,
# not on a core (on a slow 2-core VM the suite took 7 minutes with two, 5 with three).
# A test module runs on one worker (loadfile): those that make network devices
# are all in tests/test_device_sources.py, and a udev source sees every device.
test: $(VENV)/.installed-test test-tools rabbitmq lint
	$(BIN)/pytest -n 3 --dist loadfile

# The benchmarks (not run by CI): every script in bench/, then one table. They start
# their own brokers and agents on free loopback ports. BENCH_ARGS=--quick: small counts.
BENCH_ARGS ?=
$(VENV)/.installed-bench: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test,bench]'
	touch $@ $(VENV)/.installed-test $(VENV)/.installed

bench: $(VENV)/.installed-bench test-tools
	$(BIN)/python bench/run_all.py $(BENCH_ARGS)

# MQTT forwarding beside the ThingsBoard IoT Gateway and a Mosquitto bridge (not part of
# make bench): installs the gateway into bench/peers/.venv-tb on first use, about 40 min.
# PEERS_ARGS="--runs 1 --quick": a smoke check of a few minutes.
PEERS_ARGS ?=
bench-peers: $(VENV)/.installed-bench test-tools
	$(BIN)/python bench/peers/mqtt_bridge.py $(PEERS_ARGS)

# A fleet on this machine (not part of make bench): a RabbitMQ cluster of three nodes of its
# own (the installed service is left alone), 100 agents, a node killed, the whole cluster down
# for 2 minutes; about 15 min. FLEET_ARGS="--agents 20 --outage 20 --steady 20": a trial run.
FLEET_ARGS ?=
bench-fleet: $(VENV)/.installed-bench test-tools
	$(BIN)/python bench/fleet.py $(FLEET_ARGS)

# The chaos soak (not part of make test or make bench): faults against the real agent for
# CHAOS_MINUTES (default 10), then an account of every event made; exit 1 on a silent
# loss. As root (the agent's state dir goes on a tmpfs). CHAOS_ARGS="--seed N --faults ...".
CHAOS_ARGS ?=
chaos: $(VENV)/.installed-bench test-tools
	$(BIN)/python bench/chaos.py $(if $(CHAOS_MINUTES),--minutes $(CHAOS_MINUTES)) $(CHAOS_ARGS)

clean:
	rm -rf $(VENV) bench/peers/.venv-tb var .pytest_cache .ruff_cache *.egg-info
