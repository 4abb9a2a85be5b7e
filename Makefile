# `make demo` and `make test` set up whatever is missing (virtual environment, pinned dependencies, the default
# base model), then run. Every target is safe to re-run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export TUNERY_HOME ?= $(CURDIR)/.tunery
export PREFECT_SERVER_ANALYTICS_ENABLED := false
# The stamp changes whenever the pins or the package metadata change, so setup re-runs exactly then.
STAMP := $(VENV)/.installed
BASE_MODEL := $(TUNERY_HOME)/base_models/SmolLM2-135M-Instruct/model.safetensors
# Renders Ollama TEMPLATEs with Go's text/template (Ollama's own engine) to check exported chat templates.
GOTEMPLATE := $(BIN)/tunery-gotemplate
# llama.cpp's own HF -> GGUF converter (convert_hf_to_gguf.py, its conversion/ package and gguf-py), unpacked from
# the source archive of the pinned llama-cpp-python: the converter of the llama.cpp that tunery runs.
LLAMA_CPP_PYTHON := $(shell sed -n 's/^llama[-_]cpp[-_]python==//Ip' requirements/lock.txt)
CONVERTER := $(VENV)/llama.cpp/convert_hf_to_gguf.py
# Debian's Chromium and its driver, for the dashboard's browser tests.
CHROMEDRIVER := /usr/bin/chromedriver
# Debian's PostgreSQL server, which the tests start in a temp folder to run the registry on PostgreSQL.
INITDB := /usr/lib/postgresql/15/bin/initdb
# llama-cpp-python has no wheel on the index, so pip compiles llama.cpp. Its multimodal library (mtmd), which
# tunery never loads, is a large part of that build: leave it out.
export CMAKE_ARGS ?= -DLLAVA_BUILD=OFF

.PHONY: setup demo test test-fast bench ui lock clean-venv

# Two chains in parallel: the Python environment then the base model, and the system packages (apt, one at a
# time: dpkg takes a lock) then the Go template checker.
setup:
	$(MAKE) -j2 $(STAMP) $(CONVERTER) $(BASE_MODEL) $(GOTEMPLATE) $(CHROMEDRIVER) $(INITDB)

$(STAMP): requirements/torch.txt requirements/lock.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
	$(BIN)/pip install -q -r requirements/torch.txt
	$(BIN)/pip install -q -r requirements/lock.txt
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

$(CONVERTER): requirements/lock.txt | $(STAMP)
	rm -rf $(VENV)/llama.cpp $(VENV)/llama.cpp-sdist && mkdir -p $(VENV)/llama.cpp
	$(BIN)/pip download -q --no-deps --no-binary :all: llama-cpp-python==$(LLAMA_CPP_PYTHON) -d $(VENV)/llama.cpp-sdist
	tar -xzf $(VENV)/llama.cpp-sdist/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz --strip-components=3 \
		-C $(VENV)/llama.cpp --wildcards '*/vendor/llama.cpp/convert_hf_to_gguf.py' \
		'*/vendor/llama.cpp/conversion/*' '*/vendor/llama.cpp/gguf-py/*'
	rm -rf $(VENV)/llama.cpp-sdist
	test -f $(CONVERTER)

$(GOTEMPLATE): tools/gotemplate/main.go tools/gotemplate/go.mod | $(INITDB)
	mkdir -p $(BIN)
	command -v go >/dev/null || (apt-get update -qq && apt-get install -y -qq --no-install-recommends golang-go) \
		|| { echo "Go is needed to check Ollama templates: install golang-go"; exit 1; }
	cd tools/gotemplate && GOFLAGS=-mod=mod go build -o $(CURDIR)/$(GOTEMPLATE) .

$(CHROMEDRIVER):
	(apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium chromium-driver) \
		|| { echo "the dashboard's browser tests need Debian's chromium and chromium-driver"; exit 1; }

$(INITDB): | $(CHROMEDRIVER)
	(apt-get update -qq && apt-get install -y -qq --no-install-recommends postgresql-15) \
		|| { echo "the registry's PostgreSQL tests need Debian's postgresql-15"; exit 1; }

$(BASE_MODEL): | $(STAMP)
	$(BIN)/tunery setup

demo: setup
	$(BIN)/tunery run configs/demo.yaml

# The reference under docs/ is built first (into .site/, ignored), in strict mode: a broken link or anchor, or a page
# missing from mkdocs.yml's nav, fails the target. Its log is shown only then (--quiet would hide the warnings that
# strict mode counts, and let the build pass).
DOCS := out=$$($(BIN)/mkdocs build --strict 2>&1) || { echo "$$out"; echo "mkdocs build --strict failed"; exit 1; }

test: setup
	@$(DOCS)
	$(BIN)/python -m pytest

test-fast: setup
	@$(DOCS)
	$(BIN)/python -m pytest -m "not e2e"

# A local Prefect server and its UI on http://127.0.0.1:4200, keeping its state under TUNERY_HOME. Point runs at it
# with PREFECT_API_URL=http://127.0.0.1:4200/api (tunery run, tunery serve).
ui: setup
	PREFECT_HOME=$(TUNERY_HOME)/prefect $(BIN)/prefect server start --host 127.0.0.1 --port 4200

# Speed benchmarks against a baseline measured in the same run, reported as ratios.
bench: setup
	$(BIN)/python bench/train_speed.py
	$(BIN)/python bench/perplexity_speed.py
	$(BIN)/python bench/stage_speed.py
	$(BIN)/python bench/export_speed.py
	$(BIN)/python bench/dashboard_render.py --browser
	$(BIN)/python bench/prefect_overhead.py

# Re-resolve the pins from requirements/base.in in a throwaway environment.
lock:
	rm -rf /tmp/tunery-lock && $(PYTHON) -m venv /tmp/tunery-lock
	/tmp/tunery-lock/bin/pip install -q -r requirements/torch.txt -r requirements/base.in
	(echo "# Generated by \`make lock\` from requirements/base.in (pip freeze of a fresh venv); torch comes from torch.txt."; \
	 /tmp/tunery-lock/bin/pip freeze | grep -v -i '^torch==') > requirements/lock.txt

clean-venv:
	rm -rf $(VENV)
