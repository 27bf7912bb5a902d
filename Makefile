# The README's two commands: `make run` and `make test`. Both build .venv from the pins first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= configs/sst2-minilm.yaml

.PHONY: install run test lint lock gpu-bundle clean

$(BIN)/dsprune: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

install: $(BIN)/dsprune

run: install
	$(BIN)/dsprune run -c $(CONFIG)

test: install
	$(BIN)/python -m pytest -q

# Re-pin everything from a fresh environment (needs the registries).
lock:
	rm -rf /tmp/dsprune-lock && $(PY) -m venv /tmp/dsprune-lock
	/tmp/dsprune-lock/bin/pip install --quiet -e '.[test]'
	/tmp/dsprune-lock/bin/pip freeze --exclude-editable | sed 's/+cpu//' > constraints.txt

# A small folder for a GPU machine: the bundled model as fp16 safetensors and the GLUE data.
gpu-bundle: install
	$(BIN)/python -m benchmarks.gpu_bundle --out .gpu-bundle

clean:
	rm -rf runs .gpu-bundle
