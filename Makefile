# uadct: `make demo` runs the whole chain on a generated cohort; `make test` runs the test suite.
# Both create .venv when missing and install everything (CPU torch pinned first, so a bare
# `torch` requirement never pulls a multi-GB CUDA build on a CPU machine).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
UADCT := $(VENV)/bin/uadct
TORCH_PIN ?= torch==2.13.0
DEMO_DIR ?= demo_out

.PHONY: install atlas demo test test-fast docs clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

atlas: install
	$(UADCT) atlas fetch sri24

demo: atlas
	$(PY) examples/quickstart.py --output $(DEMO_DIR)

test: atlas
	$(PY) -m pytest -q

# test-fast skips the tests marked @pytest.mark.slow: full-size deepbet/elastix runs, the short fits of
# each network model, exact-resume and torchrun/kill -9 runs, ONNX export and checkpoint round trips of
# every model, and the end-to-end CLI train/score/evaluate runs (under 2 min on 2 cores; `make test` runs all)
test-fast: atlas
	$(PY) -m pytest -q -m "not slow"

docs: install
	$(PY) -m pip install -q -e '.[docs]'
	$(VENV)/bin/mkdocs build -f mkdocs.yml

clean:
	rm -rf $(DEMO_DIR) .pytest_cache site
