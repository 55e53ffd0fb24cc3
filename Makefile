# Two entry points for a fresh machine (Python 3.11, package registries reachable):
#   make demo   set up .venv, compress and compile the bundled sample model for this CPU, print the report
#   make test   set up .venv with test tools, run the test suite
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# Independent tests run in parallel (pytest-xdist), one worker per core. The real-model
# zoo (tests/test_zoo.py, ~20 models from PyPI wheels) runs with `make test-zoo`.
PYTEST_ARGS ?= -m "not gpu" -n auto --ignore=tests/test_zoo.py

# Debian packages some tests need: the aarch64 cross compiler and qemu (ARM artifacts
# are cross-compiled and run under emulation) and Chromium (report.html is checked in a
# real headless browser). Installed where this runs as root with apt-get; elsewhere
# those tests skip and say what is missing. What the default `--target x86` path links,
# oneDNN, comes from PyPI with the tvm extra (onednn-cpu-gomp): no root needed.
SYSTEM_PACKAGES := g++-aarch64-linux-gnu qemu-user-static chromium

.PHONY: demo test test-zoo setup setup-test setup-system clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# The tvm extra: `make demo` compiles the sample for this CPU, as `optc compile --target x86` does.
setup: $(BIN)/python
	$(BIN)/pip install -q -e ".[tvm]"

# torch (CPU build, from this machine's disk) is a test-tool dependency only:
# it exports the MiniLM sentence model the real-model tests run on.
setup-test: $(BIN)/python setup-system
	$(BIN)/pip install -q -e ".[dev,tvm]"
	$(BIN)/pip install -q torch==2.13.0 || echo "torch not installable: tests that need it will skip"
	$(BIN)/python tools/make_arm_root.py || echo "ARM runner root not built: the qemu tests will skip"

setup-system:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		missing=$$(for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
		if [ -n "$$missing" ]; then \
			echo "installing Debian packages for the tests: $$missing"; \
			(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null) \
				|| echo "apt-get could not install $$missing: the tests that need them will skip"; \
		fi; \
	else \
		echo "not root or no apt-get: skipping $(SYSTEM_PACKAGES) (the tests that need them will skip)"; \
	fi

demo: setup
	rm -rf out/sample
	$(BIN)/optc compile tests/models/sample/mnist_cnn.onnx -o out/sample \
		--pass canonicalize --pass prune-channels:ratio=0.3 --pass quantize \
		--calib tests/models/sample/calib.npz --eval tests/models/sample/test.npz \
		--verify-each --time-passes --target x86
	$(BIN)/optc bench out/sample

test: setup-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Fetches the zoo's wheels into ~/.cache/optc/zoo (PyPI only), builds the models and data, runs their tests.
test-zoo: setup-test
	$(BIN)/python tools/zoo fetch && $(BIN)/python tools/zoo build
	$(BIN)/python -m pytest -m "not gpu" -n auto tests/test_zoo.py

clean:
	rm -rf $(VENV) out build *.egg-info
