# dmclip — the two commands a newcomer needs are `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export OMP_NUM_THREADS ?= 2

.PHONY: install test test-fast demo bench lint ci clean reproduce-edge reproduce-blip reproduce-dmclip

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
	@# caption metrics run pycocoevalcap's Java jars: install a JRE where this machine lets us (best effort)
	@command -v java >/dev/null 2>&1 || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
		(DEBIAN_FRONTEND=noninteractive apt-get install -y -q default-jre-headless >/dev/null 2>&1 || \
		 (apt-get update -q >/dev/null 2>&1 && \
		  DEBIAN_FRONTEND=noninteractive apt-get install -y -q default-jre-headless >/dev/null 2>&1)); \
		command -v java >/dev/null 2>&1; } || \
		echo "Java not found: caption metrics (eval caption, compress eval/sweep) need it; install a JRE, e.g. apt-get install default-jre-headless (their tests skip until then)"
	@# the fused C++ scan (any 64-bit CPU with a C++ compiler): without a compiler, or when its build fails, the
	@# install goes on with the pure-PyTorch scan and says so in one line with the fix; DMCLIP_REQUIRE_FUSED_SCAN=1
	@# (make ci) makes a failed build an error where a compiler exists; DMCLIP_NO_FUSED_SCAN=1 skips it
	@if [ -n "$(DMCLIP_NO_FUSED_SCAN)" ]; then \
		echo "fused CPU scan not built (DMCLIP_NO_FUSED_SCAN is set): the slower PyTorch scan is used, its tests skip"; \
	else \
		$(BIN)/python -m dmclip.models.scan_build; \
	fi
	touch $(STAMP)

# -rs: a test skipped for a missing prerequisite (kernel, Java, data) says so in the summary. `make test` leaves
# out the tests marked `build` (each compiles the kernel again, minutes); `make ci` runs them too.
PYTEST := $(BIN)/python -m pytest -q -rs -n 2 --dist loadfile
test: install
	$(PYTEST) -m "not build"

test-fast: install
	$(PYTEST) -m "not slow and not build"

demo: install
	$(BIN)/python -m dmclip.demo

bench: install
	$(BIN)/python -m benchmarks.run_all

# A paper's results end to end, on the embedded world (hours on 2 CPU cores; the run directories go under
# runs/reproduce-*, the tables into their summary.md / report.md)
reproduce-edge: install
	bash scripts/reproduce-edge.sh

reproduce-blip: install
	bash scripts/reproduce-blip.sh

reproduce-dmclip: install
	bash scripts/reproduce-dmclip.sh

lint: install
	$(BIN)/ruff check dmclip tests benchmarks scripts
	$(BIN)/lint-imports
	$(BIN)/python scripts/import-circles.py

# CI must not go green on a broken kernel: where a compiler exists the fused scan must build (checked even when
# the install stamp is current) and its tests fail instead of skipping without it
ci: export DMCLIP_REQUIRE_FUSED_SCAN := 1
ci: install
	$(BIN)/python -m dmclip.models.scan_build
	$(MAKE) lint
	$(PYTEST)

# Mutation testing (tests/MUTANTS.md): minutes per module, so not part of `make ci`. Each mutant runs only the
# tests that call the function it changed. One module: make mutate MUTATE=dmclip.coerce
MUTATE ?= dmclip.coerce dmclip.config dmclip.compress.codec dmclip.compress.kmeans dmclip.compress.selectors \
	dmclip.metrics.retrieval dmclip.metrics.zeroshot dmclip.metrics.caption dmclip.metrics.stats \
	dmclip.metrics.filtering dmclip.losses.clip dmclip.losses.blip dmclip.losses.gather \
	dmclip.train.schedule dmclip.data.base dmclip.train.loop dmclip.train.state dmclip.data.stream
MUTATE_JOBS ?= 1
.PHONY: mutate
mutate: install
	@for module in $(MUTATE); do \
		echo "== $$module"; \
		$(BIN)/mutmut run --max-children $(MUTATE_JOBS) "$$module.*" || exit 1; \
	done
	$(BIN)/mutmut results --all true | $(BIN)/python scripts/mutation_score.py $(MUTATE)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
