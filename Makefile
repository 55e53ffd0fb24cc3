# Two entry points for a fresh machine (Python 3.11, package registries reachable):
#   make demo   set up .venv, compile the bundled sample model, print the report
#   make test   set up .venv with test tools, run the test suite
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# Independent tests run in parallel (pytest-xdist), one worker per core.
PYTEST_ARGS ?= -m "not gpu" -n auto

.PHONY: demo test setup setup-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

setup: $(BIN)/python
	$(BIN)/pip install -q -e .

# torch (CPU build, from this machine's disk) is a test-tool dependency only:
# it exports the MiniLM sentence model the real-model tests run on.
setup-test: $(BIN)/python
	$(BIN)/pip install -q -e ".[dev,tvm]"
	$(BIN)/pip install -q torch==2.13.0 || echo "torch not installable: tests that need it will skip"

demo: setup
	rm -rf out/sample
	$(BIN)/optc compile tests/models/sample/mnist_cnn.onnx -o out/sample \
		--pass canonicalize --pass prune-channels:ratio=0.3 --pass quantize \
		--calib tests/models/sample/calib.npz --eval tests/models/sample/test.npz \
		--verify-each --time-passes

test: setup-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) out build *.egg-info
