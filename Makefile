# vggcache: `make demo` runs the whole job on generated data; `make test` runs the tests. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

DATA ?=
WEIGHTS ?= imagenet
OUT ?=
ARGS ?=

.DEFAULT_GOAL := help
RUN ?=
IMAGES ?=
FEATURES ?=
HEAD ?= logreg
GPUS ?=

.PHONY: help install demo test docs extract info train-head evaluate predict export serve runs bench clean

help:  ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 14

install: $(STAMP)  ## Make .venv and install the project (editable) with its test, export, serve, track, docs and hub extras

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,export,serve,track,docs,hub]'
	touch $@

demo: $(STAMP)  ## Generate a small dataset and run the whole job on it (offline, ~1 minute on 2 cores)
	$(PY) -m pipeline make-demo-data demo_data --force
	$(PY) -m pipeline extract demo_data --weights none --image-size 64 --out features/demo.h5
	$(PY) -m pipeline info features/demo.h5
	$(PY) -m pipeline train-head features/demo.h5 --head logreg --out models/demo-logreg-$$(date +%Y%m%d-%H%M%S)
	$(PY) -m pipeline evaluate $$(ls -d models/demo-logreg-* | tail -1) --split test

test: $(STAMP)  ## Run the test suite (two processes of one thread each: ~3 minutes on 2 cores)
	$(PY) -m pytest -q -n 2 --dist loadfile

docs: $(STAMP)  ## Build the documentation site into site/ (open site/index.html)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

extract: $(STAMP)  ## Extract features: make extract DATA=path [WEIGHTS=imagenet|none|file.pth] [OUT=file.h5] [GPUS=n] [ARGS=...]
	@test -n "$(DATA)" || { echo "usage: make extract DATA=path [WEIGHTS=...] [OUT=...] [GPUS=n] [ARGS=...]" >&2; exit 2; }
	$(if $(GPUS),$(PY) -m torch.distributed.run --standalone --nproc-per-node $(GPUS) -m pipeline,$(PY) -m pipeline) \
		extract "$(DATA)" --weights "$(WEIGHTS)" $(if $(OUT),--out "$(OUT)") $(ARGS)

info: $(STAMP)  ## Summarise a feature cache: make info FEATURES=file.h5
	$(PY) -m pipeline info "$(FEATURES)"

train-head: $(STAMP)  ## Train a head: make train-head FEATURES=file.h5 [HEAD=logreg|linear] [ARGS=...]
	@test -n "$(FEATURES)" || { echo "usage: make train-head FEATURES=file.h5 [HEAD=logreg|linear] [ARGS=...]" >&2; exit 2; }
	$(PY) -m pipeline train-head "$(FEATURES)" --head "$(HEAD)" $(ARGS)

evaluate: $(STAMP)  ## Score a run: make evaluate RUN=models/NAME [ARGS="--features f.h5 --split test"]
	@test -n "$(RUN)" || { echo "usage: make evaluate RUN=models/NAME [ARGS=...]" >&2; exit 2; }
	$(PY) -m pipeline evaluate "$(RUN)" $(ARGS)

predict: $(STAMP)  ## Predict images: make predict RUN=models/NAME IMAGES="a.jpg folder/" [ARGS="--out p.csv"]
	@test -n "$(RUN)" -a -n "$(IMAGES)" || { echo "usage: make predict RUN=models/NAME IMAGES=... [ARGS=...]" >&2; exit 2; }
	$(PY) -m pipeline predict "$(RUN)" $(IMAGES) $(ARGS)

export: $(STAMP)  ## Export a run as one model file: make export RUN=models/NAME [ARGS="--format torchscript --out f.pt"]
	@test -n "$(RUN)" || { echo "usage: make export RUN=models/NAME [ARGS=...]" >&2; exit 2; }
	$(PY) -m pipeline export "$(RUN)" $(ARGS)

serve: $(STAMP)  ## Serve a run over HTTP on 127.0.0.1:8000: make serve RUN=models/NAME [ARGS="--port 9000"]
	@test -n "$(RUN)" || { echo "usage: make serve RUN=models/NAME [ARGS=...]" >&2; exit 2; }
	$(PY) -m pipeline serve "$(RUN)" $(ARGS)

runs: $(STAMP)  ## Compare every saved run under models/
	$(PY) -m pipeline runs models $(ARGS)

bench: $(STAMP)  ## Benchmark both stages: make bench [DATA=jpeg folder] [WEIGHTS=...] (prints a table, writes bench/results/)
	$(PY) bench/bench.py $(if $(DATA),--data "$(DATA)") $(if $(filter-out imagenet,$(WEIGHTS)),--weights "$(WEIGHTS)") $(ARGS)

clean:  ## Remove the demo data, caches and trained heads (keeps .venv)
	rm -rf demo_data features/*.h5 features/*.partial models/*/ site/
