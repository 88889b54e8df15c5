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

bench: setup-bench
	$(PY) -m bench

bench-quick: setup-bench
	$(PY) -m bench --quick

setup-bench:
	EXTRAS=test,bench scripts/bootstrap.sh

clean:
	rm -rf $(VENV) build *.egg-info ring/_vring_c*.so ring/_vring_c.c ring/.vring_c.stamp
