# fedtl: `make demo` and `make test` are the two commands of the quick start.
# Both create .venv when it is missing (torch/torchvision install from this machine's disk).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Keep Flower and Ray on loopback and off the internet. Flower's files stay in the checkout;
# Ray's go to a short path, since its Unix sockets live there and such paths max out at 107 bytes.
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export RAY_USAGE_STATS_ENABLED := 0
export FLWR_HOME := $(CURDIR)/.tmp/flwr-home
export RAY_TMPDIR := /tmp/fedtl-ray
export PYTHONUNBUFFERED := 1
# The install skips byte-compiling (below); Python caches each module's bytecode on its first
# import instead, which a PYTHONDONTWRITEBYTECODE inherited from the shell would forbid, making
# every process (each Ray worker too) compile torch again.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: demo test test-fast lint bench bench-privacy bench-perf clean venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# --no-compile: byte-compiling all of torch's CUDA build costs ~50 s of a 2-minute install;
	# Python compiles the modules it imports on first use instead.
	$(BIN)/python -m pip install --quiet --no-compile -e ".[test,minilm,efficientnet,photos]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fedtl simulate --config experiments/digits.toml --compare-scratch --out runs/demo --overwrite

# The study report is tested in a real browser: Debian's Chromium (apt, as root; CI is root).
CHROMIUM := /usr/bin/chromium
$(CHROMIUM):
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else echo "note: the report test needs Debian's chromium (apt-get install chromium, as root); it will be skipped"; fi

# Lint and import order (ruff), the layers and the server/clients independence (import-linter,
# configured in pyproject.toml), then the whole suite.
lint: $(STAMP)
	$(BIN)/ruff check fedtl tests benchmarks
	$(BIN)/lint-imports --no-cache

test: $(STAMP) $(CHROMIUM) lint
	$(BIN)/python -m pytest tests --durations=25

test-fast: $(STAMP)
	$(BIN)/python -m pytest tests -m "not e2e"

bench: $(STAMP)
	$(BIN)/python benchmarks/transfer_gain.py $(ARGS)

bench-privacy: $(STAMP)
	$(BIN)/python benchmarks/privacy.py $(ARGS)

# fedtl's costs side by side in one run (about 20 minutes on 2 cores): benchmarks/results/perf.{json,md,png}.
bench-perf: $(STAMP)
	$(BIN)/python benchmarks/perf.py $(ARGS)

clean:
	rm -rf .tmp runs .fedtl-cache
