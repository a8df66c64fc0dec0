PY ?= python3
METHODS = dml one okddip pcl ffsd
GRID ?= short

.PHONY: help install test smoke diff bench reproduce report plot
help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

install: ## install the run-time dependencies (torch, torchvision, numpy)
	$(PY) -m pip install -r requirements.txt

test: ## run the CPU test suite (tiny synthetic data, a few minutes on 2 cores)
	$(PY) tests/run.py

smoke: ## one tiny CPU epoch of every script on the synthetic set
	@for m in baseline $(METHODS); do [ -f $$m.py ] || continue; rm -rf runs/smoke-$$m; \
	  $(PY) $$m.py --arch resnet8 --dataset fake --epochs 1 --subset 256 --test-subset 200 --batch-size 32 --device cpu \
	    --out runs/smoke-$$m 2>&1 | tail -n 1 || exit 1; rm -rf runs/smoke-$$m; done

diff: ## changed lines of each method file against baseline.py
	@for m in $(METHODS); do [ -f $$m.py ] && printf "  %-10s %4d lines differ from baseline.py\n" $$m.py $$(diff baseline.py $$m.py | grep -c '^[<>]'); done; true

bench: ## training speed of this repo's path vs a DataLoader+PIL+fp32 reference path, in one run (table + runs/bench.json)
	$(PY) tools/bench.py

reproduce: ## run the results grid GRID (tiny, short, table1, table1-jpeg; DATA_DIR=...); run again to continue
	$(PY) tools/reproduce.py run $(GRID) $(if $(DATA_DIR),--data-dir $(DATA_DIR))

report: ## render results/ into RESULTS.md and README.md's results section
	$(PY) tools/reproduce.py report

plot: ## draw each grid's learning curves into docs/img/ (needs requirements-plot.txt)
	$(PY) tools/plot.py
