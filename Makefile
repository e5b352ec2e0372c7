# The two commands of the README: `make demo` and `make test`. Both create .venv on first use.
# `make demo` builds the builtin MoE and fetches its task on first use (cached under $DRLORA_HOME).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch is pinned here (a local CPU wheel on our machines); pyproject only declares a range so that GPU users
# keep their own CUDA build. Installing it first means the range is already satisfied afterwards.
TORCH_PIN ?= torch==2.13.0

.PHONY: test demo bench setup clean

# drlora and its runtime dependencies: all `make demo` needs.
$(VENV)/.core: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_PIN)"
	$(PY) -m pip install --quiet -e .
	touch $@

# plus pytest and lm-evaluation-harness (the optional `eval` extra, whose agreement with our scorer is tested).
$(VENV)/.installed: $(VENV)/.core
	$(PY) -m pip install --quiet -e ".[test,eval]"
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest -q

demo: $(VENV)/.core
	$(VENV)/bin/drlora train configs/demo.yaml

# step time and memory against the frozen model and PEFT (docs/PERFORMANCE.md); e.g. make bench ARGS="--configs olmoe-e64"
bench: $(VENV)/.core
	$(PY) bench/step_time.py $(ARGS)

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
