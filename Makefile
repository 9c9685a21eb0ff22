# `make demo`: install into .venv and run the main job; `make test`: install and run the tests.
# `make notebook`: JupyterLab (on 127.0.0.1) with the project's kernel; `make notebooks`: run
# every notebook and save it with its outputs (what is committed).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
NB_STAMP := $(VENV)/.notebook

.PHONY: install demo test bench soak notebook notebooks clean

$(PY):
	python3 -m venv $(VENV)

# llama-cpp-python is built from source with ggml RPC (models split across workers, see
# README "Models bigger than one GPU"). pip's own wheel cache ignores CMAKE_ARGS (it would
# hand back a wheel built without RPC), so the wheel is built once with `pip wheel` into a
# folder keyed by version, flags and machine, and installed from there: only the first
# install compiles (about 8 minutes on 2 cores). On a PC with an NVIDIA GPU:
#   make install LLAMA_CMAKE_ARGS="-DGGML_RPC=ON -DGGML_CUDA=ON"
LLAMA_VERSION ?= 0.3.36
LLAMA_CMAKE_ARGS ?= -DGGML_RPC=ON
WHEEL_CACHE ?= $(HOME)/.cache/aicluster/wheels
LLAMA_KEY := $(shell printf '%s %s %s' '$(LLAMA_VERSION)' '$(LLAMA_CMAKE_ARGS)' "$$(uname -m)" | sha1sum | cut -c1-12)
LLAMA_WHEELS := $(WHEEL_CACHE)/llama-cpp-python-$(LLAMA_VERSION)-$(LLAMA_KEY)

# The binding, from the wheel cache (built there first when missing); a stamp per build key,
# so `make install LLAMA_CMAKE_ARGS=...` on an existing venv installs the other build.
LLAMA_STAMP := $(VENV)/.llama-$(LLAMA_KEY)
$(LLAMA_STAMP): | $(PY)
	test -n "$$(ls $(LLAMA_WHEELS)/*.whl 2>/dev/null)" || { \
		echo "building llama-cpp-python $(LLAMA_VERSION) with $(LLAMA_CMAKE_ARGS) (once, ~8 min)"; \
		rm -rf $(LLAMA_WHEELS).tmp; \
		CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip wheel -q --no-deps --no-cache-dir \
			--no-binary llama-cpp-python "llama-cpp-python==$(LLAMA_VERSION)" -w $(LLAMA_WHEELS).tmp \
		&& mv $(LLAMA_WHEELS).tmp $(LLAMA_WHEELS); }
	$(PY) -m pip install -q --no-deps --force-reinstall $(LLAMA_WHEELS)/*.whl
	$(PY) -m pip install -q $(LLAMA_WHEELS)/*.whl  # its dependencies (numpy, jinja2, ...)
	$(PY) -c "import llama_cpp, sys; sys.exit(0 if llama_cpp.llama_supports_rpc() else \
		'the wheel in $(LLAMA_WHEELS) has no ggml RPC: delete that folder and run make again')"
	rm -f $(VENV)/.llama-*
	touch $(LLAMA_STAMP)

# torch first, from the CPU build on this disk (a plain `torch` requirement could pull a
# multi-GB CUDA build); the llama.cpp binding (above); then the project with its test extras.
$(STAMP): pyproject.toml Makefile $(LLAMA_STAMP) | $(PY)
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
	HF_HUB_OFFLINE=1 $(PY) bench/sharded.py
	HF_HUB_OFFLINE=1 $(PY) bench/overhead.py

# 10 minutes of mixed traffic from 3 clients while a worker is killed every 60 s
soak: install
	HF_HUB_OFFLINE=1 $(PY) bench/soak.py

clean:
	rm -rf $(VENV) .pytest_cache
