# The two commands a newcomer needs: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# The CPU wheel of torch; a looser pin would pull a multi-GB CUDA build on these machines.
TORCH  ?= torch==2.13.0
PYTEST_ARGS ?=
# The venv is not activated by make, so `glm` is not on PATH afterwards; install and demo say how.
GLM_ON_PATH := glm is installed in $(VENV)/bin, not on your PATH: run ". $(VENV)/bin/activate" to use the glm command (or call $(VENV)/bin/glm)

.PHONY: venv install lint test test-all demo demo-finetune kernels gpu-check clean

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

venv: $(VENV)/.installed

install: $(VENV)/.installed
	@echo '$(GLM_ON_PATH)'

# The linter first (config in pyproject.toml), then the suite. pytest exits 5 when it collected no tests;
# that is a broken suite here, so it fails loudly.
lint: $(VENV)/.installed
	$(PY) -m ruff check glm kernels tokenizer tests benchmarks

test: lint
	$(PY) -m pytest -m "not slow and not cuda" $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: the suite is missing"; exit 1; fi; exit $$rc

test-all: $(VENV)/.installed
	$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: the suite is missing"; exit 1; fi; exit $$rc

# Pretrains a tiny GLM on the embedded corpus (minutes on 2 cores: benchmarks/results/demo_cpu.json has the
# recorded time) and shows it filling blanks.
# Unbuffered, so that `make demo > log` shows the progress lines as they come, not at exit.
demo: $(VENV)/.installed
	PYTHONUNBUFFERED=1 $(PY) -m glm demo
	@echo '$(GLM_ON_PATH)'

# Fine-tunes make demo's model (trained first when runs/demo has none) on embedded toy instructions and a toy
# classification task, and shows answers and held-out accuracy before and after.
demo-finetune: $(VENV)/.installed
	PYTHONUNBUFFERED=1 $(PY) -m glm demo-finetune
	@echo '$(GLM_ON_PATH)'

# On a GPU machine: builds the C++ and CUDA kernels into $(PYTHON)'s environment, whose torch must be
# a CUDA build (the CPU venv above never is), e.g. `make kernels PYTHON=python`. The CUDA kernels
# target the GPUs present (TORCH_CUDA_ARCH_LIST="8.0;9.0" to choose); tests: `pytest -m cuda`.
kernels:
	$(PYTHON) -m pip install --no-deps --no-build-isolation -e .
	@$(PYTHON) -c "import glm.kernels as k; print('glm.kernels devices:', sorted(k.devices()), '| CUDA kernels:', k.cuda_load_error() or 'built')"

# On a GPU machine, every GPU measurement in one go: build, the CUDA tests, then the
# attention and decode benchmarks, published as the committed records (benchmarks/results/*_cuda.json,
# with the device name).
gpu-check: kernels
	$(PYTHON) -m pytest -q -m cuda tests/test_kernels_cuda.py tests/test_fast_decode.py -p no:cacheprovider
	$(PYTHON) -m glm bench attention --device cuda --publish
	$(PYTHON) -m glm bench decode --device cuda --publish

clean:
	rm -rf $(VENV) build *.egg-info
