# `make demo`: install into .venv and run the main job; `make test`: install and run the tests.
# `make notebook`: JupyterLab (on 127.0.0.1) with the project's kernel; `make notebooks`: run
# every notebook and save it with its outputs (what is committed).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
NB_STAMP := $(VENV)/.notebook

.PHONY: install demo test bench notebook notebooks clean

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

# JupyterLab and ipywidgets (progress bars) on top of the project; the venv's own python3
# kernel is the project's
$(NB_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[test,notebook]'
	touch $(NB_STAMP)

notebook: $(NB_STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/jupyter lab --ip 127.0.0.1 --notebook-dir notebooks

notebooks: $(NB_STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/jupyter nbconvert --to notebook --execute --inplace \
		--ExecutePreprocessor.timeout=600 --ExecutePreprocessor.store_widget_state=True notebooks/*.ipynb

bench: install
	HF_HUB_OFFLINE=1 $(PY) bench/embeddings.py
	HF_HUB_OFFLINE=1 $(PY) bench/generate.py
	HF_HUB_OFFLINE=1 $(PY) bench/concurrency.py
	HF_HUB_OFFLINE=1 $(PY) bench/prefix.py
	HF_HUB_OFFLINE=1 $(PY) bench/spread.py
	HF_HUB_OFFLINE=1 $(PY) bench/serve.py

clean:
	rm -rf $(VENV) .pytest_cache
