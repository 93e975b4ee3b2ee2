# Two entry points (see README): `make demo` and `make test`. Both create/refresh .venv first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
RUN    := runs/demo-$(shell date +%Y%m%d-%H%M%S)

.PHONY: demo test test-deps bench clean

# Re-install only when the dependency list, the pins or the C kernels (built by pip install) change.
$(STAMP): pyproject.toml constraints.txt trainer/mlstm_trainer/_cellkernels.c trainer/mlstm_trainer/_packedgemm.c
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[platform,transfer,test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m mlstm_trainer --checkpoint-dir $(RUN) --log-jsonl $(RUN)/train.jsonl \
		--metrics-port 9400 --sample-chars 400

# Installs what the integration tests need (Prometheus), then runs the whole suite.
# One BLAS/OpenMP thread per process: tests run trainers, torchrun ranks and servers side by side on
# a 2-core machine, where spinning OpenMP threads of competing processes slow everything down.
test: $(STAMP) test-deps
	OMP_NUM_THREADS=1 $(PY) -m pytest

test-deps:
	@bash tests/install_test_deps.sh

bench: $(STAMP)
	$(PY) bench/throughput.py

clean:
	rm -rf $(VENV) build *.egg-info
