# One command each: `make demo` (install + the whole StABlE story on built-in data) and
# `make test` (install + the test suite). Both create .venv with pip when it is missing.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO_OUT ?= demo_output
# Extra pip arguments, e.g. EXTRAS=test,distributed,mace,cuda12 on a GPU machine. `distributed`
# (Ray) and `mace` (mace-torch) are in by default: their tests are part of the default suite.
EXTRAS ?= test,distributed,mace

.PHONY: install demo test test-all bench-quick clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install -e '.[$(EXTRAS)]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" OUT="$(DEMO_OUT)" bash examples/demo.sh

# pytest's last line gives the counts and the total time; --durations lists the slowest
# tests, so a test that grows is seen. Its exit status is make's: a failure, an error, a
# timeout (pyproject: 600 s per test) and "no tests collected" (5) all fail the target.
# PYTEST_ARGS: more arguments, e.g. PYTEST_ARGS="tests/test_models.py -x".
PYTEST_ARGS ?=
test: $(STAMP)
	$(PY) -m pytest -q --durations=10 $(PYTEST_ARGS)

# Also the slow end-to-end tests (minutes).
test-all: $(STAMP)
	$(PY) -m pytest -q --durations=10 -m "slow or not slow" $(PYTEST_ARGS)

# The benchmark scripts' --quick smoke runs (the slow tests that exercise them).
bench-quick: $(STAMP)
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

clean:
	rm -rf $(DEMO_OUT) .pytest_cache
