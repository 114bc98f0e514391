# Two commands on a fresh machine: `make demo` and `make test` (each sets up .venv first).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE := 1

.PHONY: demo test bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/timm-bcos demo

test: $(STAMP)
	$(PY) -m pytest -q --durations=15

# Runs each benchmark and records its output next to it (benchmarks/<name>.txt): NAME or NAME:ARGS.
BENCHES = layer conv_input_grad model model-compile:--compile,--models,resnet50,--profile model-channels-last:--channels-last,--models,resnet50 memory explain:--profile,--compile cpu_memory:--pairs,3 cpu_memory-compile:--compile,--pairs,3,--reps,7 bcosify serve
bench: $(STAMP)
	for entry in $(BENCHES); do \
	  name=$${entry%%:*}; script=$${name%%-*}; args=$$(echo "$${entry#$$name}" | tr ':,' '  '); \
	  { echo "# python benchmarks/$$script.py$$args at $$(git rev-parse --short HEAD), $$(date -u +%F), $$(nproc) cores: $$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"; \
	    $(PY) benchmarks/$$script.py $$args; } > benchmarks/$$name.txt.tmp && mv benchmarks/$$name.txt.tmp benchmarks/$$name.txt && cat benchmarks/$$name.txt; \
	done

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
