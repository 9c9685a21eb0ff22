# `make demo`: install into .venv and run the main job; `make test`: install and run the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean

$(PY):
	python3 -m venv $(VENV)

# torch first, from the CPU build on this disk (a plain `torch` requirement could pull a
# multi-GB CUDA build); then the project with its test extras. pip caches the
# llama-cpp-python wheel, so only the first install compiles it (about 5 minutes).
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/aicluster demo

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS)

bench: install
	HF_HUB_OFFLINE=1 $(PY) bench/embeddings.py
	HF_HUB_OFFLINE=1 $(PY) bench/generate.py

clean:
	rm -rf $(VENV) .pytest_cache
