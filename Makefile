# The README's two commands: `make demo` and `make test`. Each does its own setup in .venv.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.lathe-installed
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.h csrc/*/*.inc csrc/*/*.cu)

.PHONY: demo test setup clean

setup: $(STAMP)

$(STAMP): $(SOURCES)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	# torch first, pinned: the CPU wheel on disk, not several GB of CUDA wheels.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q pybind11 numpy
	$(BIN)/pip install -q --no-build-isolation -e ".[all,triton]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/lathe demo -o lathe-demo-out

# pytest exits 5 when it collects no test: that is a failure of the suite, say so.
test: $(STAMP)
	$(BIN)/python -P -m pytest -q tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "no tests were collected"; exit 1; fi; exit $$rc

clean:
	rm -rf build *.egg-info lathe/*.so lathe-demo-out
