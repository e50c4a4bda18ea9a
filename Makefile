# The two commands a newcomer needs: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# The CPU wheel of torch; a looser pin would pull a multi-GB CUDA build on these machines.
TORCH  ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: venv install test test-all demo clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel

# Reinstall only when the package metadata changes. --no-build-isolation makes the build see the
# venv's torch (the C++ extension compiles against it) instead of pulling another torch.
$(VENV)/.installed: $(PY) setup.cfg pyproject.toml $(wildcard setup.py) $(wildcard kernels/csrc/*)
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q --no-build-isolation -e ".[test,plots]"
	@$(PY) -c "import glm.kernels as k; print('glm.kernels:', 'C++ kernels built' if k.available() else k.load_error())"
	touch $@

venv install: $(VENV)/.installed

# pytest exits 5 when it collected no tests; that is a broken suite here, so it fails loudly.
test: $(VENV)/.installed
	$(PY) -m pytest -m "not slow and not cuda" $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: the suite is missing"; exit 1; fi; exit $$rc

test-all: $(VENV)/.installed
	$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: the suite is missing"; exit 1; fi; exit $$rc

# Pretrains a tiny GLM on the embedded corpus (a few minutes on 2 cores) and shows it filling blanks.
demo: $(VENV)/.installed
	$(PY) -m glm demo

clean:
	rm -rf $(VENV) build *.egg-info
