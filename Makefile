# Shortcuts for the two commands in the README (scripts/run.sh, scripts/test.sh), which
# work without make; both set up what they need first.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup setup-bench run test bench bench-quick clean

setup:
	scripts/bootstrap.sh

run:
	scripts/run.sh

test:
	scripts/test.sh

# Extra harness options: make bench ARGS="--profile" (see python -m bench --help).
bench: setup-bench
	$(PY) -m bench $(ARGS)

bench-quick: setup-bench
	$(PY) -m bench --quick $(ARGS)

setup-bench:
	EXTRAS=test,bench scripts/bootstrap.sh

clean:
	rm -rf $(VENV) build *.egg-info ring/_vring_c*.so ring/_vring_c.c ring/.vring_c.stamp
