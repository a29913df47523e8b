# Two entry points for a new user: `make demo` and `make test`.
# Both create .venv (CPU torch first, so pip never pulls a multi-GB CUDA build).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/make_demo_manifest.py examples/demo.parquet
	$(BIN)/qwen-batch validate examples/demo.parquet --model tiny
	$(BIN)/qwen-batch submit examples/demo.parquet --output ./renders --model tiny --workers 1
	$(BIN)/qwen-batch status ./renders

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python bench/bench_submit.py

clean:
	rm -rf $(VENV) renders examples/demo.parquet
