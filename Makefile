# `make test` and `make demo` each create the virtual environment they need.
VENV := .venv
PY := $(VENV)/bin/python
# Two stamps: the demo needs delvm alone; tests, lint and benchmarks add every extra (test: pytest,
# ruff, transformers, playwright; serve: gradio; video: av; tensorboard), which the demo need not
# wait for.
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: test demo demo-full reproduce results-page lint bench

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, by exact version: it is the CPU build on local disk, which pyproject's
	# open range (torch>=2.6) then keeps.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e .
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[test,serve,video,tensorboard]'
	touch $(TEST_STAMP)

# One thread per test process: two-thread kernels stall badly when the machine is busy.
test: $(TEST_STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q

# The whole pipeline on the toy world (about 13 minutes on 2 cores); reruns reuse finished stages.
demo: $(STAMP)
	$(VENV)/bin/delvm demo demo
	@echo "report: demo_out/report.html"

# The same pipeline with more data and steps, into demo_full_out/ (each stage's run time is in
# demo_full_out/timings.json).
demo-full: $(STAMP)
	$(VENV)/bin/delvm demo demo_full
	@echo "report: demo_full_out/report.html"

# The paper's four studies on the toy world, three seeds each, into reproduce_out/results.md
# (docs/studies.md). Reruns resume. One torch thread per process: the studies run two at a time.
reproduce: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/delvm experiment reproduce --out reproduce_out
	@echo "results: reproduce_out/results.md"

# docs/results.md, assembled from the results.md of the runs above that have finished.
results-page: $(STAMP)
	$(VENV)/bin/delvm results docs/results.md $(patsubst %/results.md,%,$(wildcard \
		demo_out/results.md demo_full_out/results.md reproduce_out/results.md \
		bench_out/*/results.md))

lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

# The CPU benchmarks whose tables go on the results page (bench_out/*/results.md); on a quiet
# machine: each compares setups side by side in one run.
bench: $(TEST_STAMP)
	$(PY) benchmarks/model_throughput.py --batches 1 --train-repeats 3 --generate-repeats 2 \
		--results bench_out/model
	$(PY) benchmarks/data_throughput.py --parts scale --sa1b 32 --coco 128 --results bench_out/data
	# Decoding precision against task scores needs a trained demo (make demo).
	if [ -f demo_out/scores.json ]; then \
		$(PY) benchmarks/prompting_speed.py precision --run demo_out --results bench_out/precision; \
	else echo "no demo_out/scores.json: run make demo first for bench_out/precision"; fi
