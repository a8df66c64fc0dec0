PY ?= python3
METHODS = dml one okddip pcl ffsd
GRID ?= short
NPZ ?= $(wildcard local/cifar10_jpeg.npz)
BUDGET ?= 300

.PHONY: help install test test-oldest smoke diff bench reproduce report plot handout grade gpu-check
help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-11s %s\n", $$1, $$2}'

install: ## install the run-time dependencies (torch, torchvision, numpy)
	$(PY) -m pip install -r requirements.txt

test: ## run the CPU test suite (tiny synthetic data, a few minutes on 2 cores)
	$(PY) tests/run.py

OLDEST = .venv-oldest
test-oldest: ## the suite on the floor versions (requirements-oldest.txt) in its own venv .venv-oldest/
	@if ! cmp -s requirements-oldest.txt $(OLDEST)/pins.txt; then \
	  echo "make test-oldest: building $(OLDEST)/ from requirements-oldest.txt (a few GB, minutes)"; \
	  rm -rf $(OLDEST) && $(PY) -m venv $(OLDEST) && \
	  $(OLDEST)/bin/python -m pip install -r requirements-oldest.txt > $(OLDEST)/pip.log 2>&1 \
	    || { tail -n 20 $(OLDEST)/pip.log; echo "make test-oldest: pip install failed"; exit 1; }; \
	  cp requirements-oldest.txt $(OLDEST)/pins.txt; fi
	$(OLDEST)/bin/python tests/run.py

smoke: ## one tiny CPU epoch of every script on the synthetic set; stops at the first script that fails
	@mkdir -p runs; for m in baseline $(METHODS); do [ -f $$m.py ] || continue; rm -rf runs/smoke-$$m; \
	  $(PY) $$m.py --arch resnet8 --dataset fake --epochs 1 --subset 256 --test-subset 200 --batch-size 32 \
	    --device cpu --out runs/smoke-$$m > runs/smoke-$$m.log 2>&1 \
	    || { cat runs/smoke-$$m.log; echo "make smoke: $$m.py failed"; exit 1; }; \
	  tail -n 1 runs/smoke-$$m.log; rm -rf runs/smoke-$$m runs/smoke-$$m.log; done

diff: ## changed lines of each method file against baseline.py
	@for m in $(METHODS); do [ -f $$m.py ] && printf "  %-10s %4d lines differ from baseline.py\n" $$m.py $$(diff baseline.py $$m.py | grep -c '^[<>]'); done; true

bench: ## per-step speed of every method: fp32, bf16, a DataLoader+PIL reference, --compile, kernels, syncs (table + runs/bench.json)
	$(PY) tools/bench.py

reproduce: ## run the results grid GRID (tiny, short, table1, table1-jpeg; DATA_DIR=...); run again to continue
	$(PY) tools/reproduce.py run $(GRID) $(if $(DATA_DIR),--data-dir $(DATA_DIR))

report: ## render results/ into RESULTS.md and README.md's results section
	$(PY) tools/reproduce.py report

plot: ## draw each grid's learning curves into docs/img/ (needs requirements-plot.txt)
	$(PY) tools/plot.py

handout: ## a student's folder for METHOD=<method> in OUT (new; default handout/<method>): docs/assignments.md
	$(PY) tools/handout.py $(METHOD) $(or $(OUT),$(if $(METHOD),handout/$(METHOD)))

grade: ## grade a handed-in file with the method's grading tests: make grade METHOD=pcl FILE=...
	$(PY) tools/assignment.py grade $(METHOD) $(FILE)

gpu-check: ## every GPU measurement (bench, streamed loader, grid for BUDGET s) into OUT (default runs/gpu-check); NPZ=archive
	$(PY) tools/gpu_check.py --out $(or $(OUT),runs/gpu-check) --grid-budget $(BUDGET) $(if $(NPZ),--npz $(NPZ))
