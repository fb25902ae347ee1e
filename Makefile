# Two entry points a newcomer needs: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH := torch>=2.6,<=2.14.1

$(BIN)/activate: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.13.0" || $(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -c constraints.txt -e ".[test]"
	touch $(BIN)/activate

venv: $(BIN)/activate

demo: venv  ## the main job on the embedded default: local Ray, local files, narrow model
	$(BIN)/python -m jobs.demo --output demo_out

browser:  ## Debian's chromium, for the run report's browser test (installed with apt-get when missing; needs root)
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

test: venv browser  ## the whole suite, slow end-to-end tests included
	$(BIN)/python -m pytest -q

test-fast: venv browser
	$(BIN)/python -m pytest -q -m "not slow"

lock:  ## refresh constraints.txt: today's releases within pyproject.toml's ranges, in a throwaway venv
	rm -rf .lock-venv && $(PY) -m venv .lock-venv && .lock-venv/bin/pip install -q --upgrade pip
	.lock-venv/bin/pip install -q "$(TORCH)" && .lock-venv/bin/pip install -q -e ".[test]"
	{ sed -n '1,3p' constraints.txt; .lock-venv/bin/pip freeze --exclude-editable | grep -viE '^(torch|nvidia-|triton|instancefcn)'; } > constraints.new
	mv constraints.new constraints.txt && rm -rf .lock-venv

.PHONY: venv browser demo test test-fast lock
