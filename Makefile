# The README's two set-up commands: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: demo test venv install install-dev lint typecheck pytest bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# The stamps re-run pip only when pyproject.toml changed.
$(VENV)/.installed: pyproject.toml | $(PY)
	$(PIP) install -q -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(PY)
	$(PIP) install -q -e ".[dev,all]"
	# the real MONAI Label client for the facade's tests; --no-deps: its own dependencies (monai[all], sam2,
	# ...) are not needed by the client module, which needs only requests (in the dev extra)
	$(PIP) install -q --no-deps monailabel==0.8.5
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: install
	$(VENV)/bin/samadapt demo --out out/demo

lint: install-dev
	$(VENV)/bin/ruff check core adapters domains recipes tests benchmarks
	$(VENV)/bin/ruff format --check core adapters domains recipes tests benchmarks

# mypy cannot follow setuptools' editable import hook, so it checks a plain (non-editable) copy.
typecheck: install-dev
	rm -rf build/typecheck
	$(PIP) install -q --no-deps --no-build-isolation --target build/typecheck .
	cd build/typecheck && ../../$(VENV)/bin/mypy -p samadapt

pytest: install-dev
	$(VENV)/bin/pytest -q --durations=25

test: lint typecheck pytest

bench: install-dev
	$(PY) benchmarks/encoder_speed.py
	$(PY) benchmarks/quality_2d.py
	$(PY) benchmarks/volume_speed.py
	$(PY) benchmarks/propagation_stop.py

clean:
	rm -rf build out .pytest_cache .mypy_cache .ruff_cache
