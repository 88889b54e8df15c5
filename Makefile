# vmchannel: `make run` starts the back-end on its built-in default configuration,
# `make test` runs the whole test suite. Both set up what they need first.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup run test bench bench-quick clean

setup:
	scripts/bootstrap.sh

run: setup
	$(VENV)/bin/vmchannel serve

test: setup
	scripts/ensure-guest-deps.sh
	VMCHANNEL_RING=c $(PY) -m pytest -q tests

bench: setup
	$(PY) -m bench

bench-quick: setup
	$(PY) -m bench --quick

clean:
	rm -rf $(VENV) build *.egg-info ring/_vring_c*.so ring/_vring_c.c ring/.vring_c.stamp
