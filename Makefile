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
# folder keyed by version, flags and the CPU it was built for, and installed from there:
# only the first install compiles (about 8 minutes on 2 cores). On a PC with an NVIDIA GPU:
#   make install LLAMA_CMAKE_ARGS="-DGGML_RPC=ON -DGGML_CUDA=ON"
#
# The CPU part of the build (LLAMA_CPU_ARGS) is not ggml's default -march=native: on a CPU
# with AMX that compiles ggml's AMX kernels, and the first decode of a Q4_K model then
# segfaults in ggml_backend_amx_mul_mat (ggml-org/llama.cpp#20824, closed unfixed). We turn
# GGML_NATIVE off and name each extension this CPU has (AVX2, AVX-512, VNNI, BF16 ...),
# never AMX: cluster/cpubuild.py reads /proc/cpuinfo. (ggml's run-time variants,
# GGML_BACKEND_DL + GGML_CPU_ALL_VARIANTS, would compile ggml-cpu 14 times, about 25 more
# minutes here, include the AMX variant, and need ggml_backend_load_all, which the binding
# does not call.) The key names the features, so a cache copied to another PC builds anew
# rather than hand back a wheel for a CPU it is not. With NATIVE off, a CUDA build compiles
# for ggml's list of GPU architectures (any card of the lab); add
# -DCMAKE_CUDA_ARCHITECTURES=native for this PC's card only. To try another CPU build:
#   make install LLAMA_CPU_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
LLAMA_VERSION ?= 0.3.36
WHEEL_CACHE ?= $(HOME)/.cache/aicluster/wheels
LLAMA_CMAKE_ARGS ?= -DGGML_RPC=ON
LLAMA_CPU_ARGS ?= $(shell python3 cluster/cpubuild.py cmake)
LLAMA_BUILT_FOR := $(shell python3 cluster/cpubuild.py key '$(LLAMA_CPU_ARGS)')
LLAMA_KEY := $(shell printf '%s|%s|%s|%s' '$(LLAMA_VERSION)' '$(LLAMA_CMAKE_ARGS)' '$(LLAMA_CPU_ARGS)' '$(LLAMA_BUILT_FOR)' | sha1sum | cut -c1-12)
LLAMA_WHEELS := $(WHEEL_CACHE)/llama-cpp-python-$(LLAMA_VERSION)-$(LLAMA_KEY)

# The binding, from the wheel cache (built there first when missing); a stamp per build key,
# so `make install LLAMA_CMAKE_ARGS=...` on an existing venv installs the other build. The
# wheel folder's BUILD file says what it was built for; the venv keeps a copy
# (.venv/aicluster-llama-build.txt) that the tests and `aicluster doctor` check the
# binding against.
LLAMA_STAMP := $(VENV)/.llama-$(LLAMA_KEY)
$(LLAMA_STAMP): | $(PY)
	test -n "$$(ls $(LLAMA_WHEELS)/*.whl 2>/dev/null)" || { \
		echo "building llama-cpp-python $(LLAMA_VERSION) for $(LLAMA_BUILT_FOR) (once, ~8 min)"; \
		rm -rf $(LLAMA_WHEELS).tmp; \
		CMAKE_ARGS="$(LLAMA_CMAKE_ARGS) $(LLAMA_CPU_ARGS)" $(PY) -m pip wheel -q --no-deps --no-cache-dir \
			--no-binary llama-cpp-python "llama-cpp-python==$(LLAMA_VERSION)" -w $(LLAMA_WHEELS).tmp \
		&& printf 'version %s\ncmake %s\ncpu %s\nbuilt-for %s\n' '$(LLAMA_VERSION)' '$(LLAMA_CMAKE_ARGS)' \
			'$(LLAMA_CPU_ARGS)' '$(LLAMA_BUILT_FOR)' > $(LLAMA_WHEELS).tmp/BUILD \
		&& mv $(LLAMA_WHEELS).tmp $(LLAMA_WHEELS); }
	$(PY) -m pip install -q --no-deps --force-reinstall $(LLAMA_WHEELS)/*.whl
	$(PY) -m pip install -q $(LLAMA_WHEELS)/*.whl  # its dependencies (numpy, jinja2, ...)
	$(PY) -c "import llama_cpp, sys; sys.exit(0 if llama_cpp.llama_supports_rpc() else \
		'the wheel in $(LLAMA_WHEELS) has no ggml RPC: delete that folder and run make again')"
	cp $(LLAMA_WHEELS)/BUILD $(VENV)/aicluster-llama-build.txt
	rm -f $(VENV)/.llama-* $(VENV)/.smoke-*
	touch $(LLAMA_STAMP)

# torch first, from the CPU build on this disk (a plain `torch` requirement could pull a
# multi-GB CUDA build); the llama.cpp binding (above); then the project with its test extras.
$(STAMP): pyproject.toml Makefile $(LLAMA_STAMP) | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# The smoke check: every shipped model loads and runs in a child process on this PC's build
# (cluster/smoke.py). A crash stops here with one line naming the model, the signal and the
# native frame, so `make demo` never starts a cluster on a build that crashes on this CPU.
SMOKE_STAMP := $(VENV)/.smoke-$(LLAMA_KEY)
$(SMOKE_STAMP): $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m cluster.smoke
	touch $(SMOKE_STAMP)

install: $(STAMP) $(SMOKE_STAMP)

demo: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/aicluster demo || { echo "if anything failed, run: $(VENV)/bin/aicluster doctor"; exit 1; }

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

# llama.cpp's own server, for bench/peers.py (the cluster against what a user would run
# instead): built from the sources vendored in the same llama-cpp-python sdist as the
# binding, with the same CPU flags, cached beside the wheels; only `make bench` builds it
# (about 9 minutes on 2 cores, once).
LLAMA_SERVER := $(WHEEL_CACHE)/llama-server-$(LLAMA_VERSION)-$(LLAMA_KEY)/llama-server
$(LLAMA_SERVER): | $(PY)
	rm -rf $(@D).tmp && mkdir -p $(@D).tmp
	$(PY) -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$(LLAMA_VERSION)" -d $(@D).tmp
	tar -xzf $(@D).tmp/llama_cpp_python-$(LLAMA_VERSION).tar.gz -C $(@D).tmp
	cmake -S $(@D).tmp/llama_cpp_python-$(LLAMA_VERSION)/vendor/llama.cpp -B $(@D).tmp/build -DCMAKE_BUILD_TYPE=Release \
		$(LLAMA_CMAKE_ARGS) $(LLAMA_CPU_ARGS) -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DBUILD_SHARED_LIBS=OFF \
		-DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF > $(@D).tmp/cmake.log 2>&1 \
		|| { tail -30 $(@D).tmp/cmake.log; exit 1; }
	@echo "building llama-server with the binding's CPU flags (once, ~9 min; log in $(@D).tmp/build.log)"
	cmake --build $(@D).tmp/build --target llama-server -j2 > $(@D).tmp/build.log 2>&1 \
		|| { tail -30 $(@D).tmp/build.log; exit 1; }
	mkdir -p $(@D) && cp $(@D).tmp/build/bin/llama-server $@ && rm -rf $(@D).tmp

# every bench script, then one table of their RESULT lines (also bench/out/latest.json)
bench: install $(LLAMA_SERVER)
	HF_HUB_OFFLINE=1 AICLUSTER_LLAMA_SERVER=$(LLAMA_SERVER) $(PY) bench/run_all.py

# 10 minutes of mixed traffic (facade, streams, HTTP, batch commands) while a worker is
# killed every 60 s, and the gateway and the scheduler once each; every failure counted
soak: install
	HF_HUB_OFFLINE=1 $(PY) bench/soak.py

clean:
	rm -rf $(VENV) .pytest_cache
