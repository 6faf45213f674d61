# One-line bootstrap for a machine that has only Python 3.10+.
# `make install` builds .venv with pip alone; `make lock` (needs uv) regenerates requirements.lock.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
# torch is installed on its own first, so each machine gets its own build (CPU here, CUDA where the
# platform wheel is CUDA); the lock pins everything else, with dictionary-learning's stale pins
# overridden (see [tool.uv] in pyproject.toml), and is installed with --no-deps.
TORCH_ONLY := '^(torch|triton|nvidia-|cuda-)'

.PHONY: install test discover lock lint clean

$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet --no-deps -r requirements.lock
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(PY) -c "import torch, nnsight, dictionary_learning, transformers, feature_circuits; print('installed: torch', torch.__version__, 'nnsight', nnsight.__version__, 'transformers', transformers.__version__)"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest tests

discover: install
	$(PY) scripts/discover.py --method relp

lint: install
	$(PY) -m ruff check feature_circuits scripts tests

lock:
	uv pip compile pyproject.toml --extra dev --universal --python-version 3.10 --no-annotate --quiet \
	  | grep -vE $(TORCH_ONLY) > requirements.lock

clean:
	rm -rf $(VENV)
