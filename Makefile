# dmclip — the two commands a newcomer needs are `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export OMP_NUM_THREADS ?= 2

.PHONY: install test test-fast demo bench lint ci clean

install: $(STAMP)

# Re-runs only when pyproject.toml changes: a second `make install` takes a moment.
$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	-$(BIN)/pip uninstall -q -y triton
	@# Fashion-MNIST, a real-image zero-shot set, from Debian (best effort: its tests skip without it)
	-test -d /usr/share/datasets/fashion-mnist || (command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
		(apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
		 (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1)))
	$(BIN)/python -m dmclip.models.scan_build || echo "fused CPU scan not built: falling back to the pure-PyTorch scan"
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

test-fast: install
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not slow"

demo: install
	$(BIN)/python -m dmclip.demo

bench: install
	$(BIN)/python -m benchmarks.run_all

lint: install
	$(BIN)/ruff check dmclip tests benchmarks

ci: lint test

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
