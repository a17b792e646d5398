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
.PHONY: help install demo test extract info clean

help:  ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 14

install: $(STAMP)  ## Make .venv and install the project (editable) with its test extras

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

demo: $(STAMP)  ## Generate a small dataset and run the whole job on it (offline, ~1 minute on 2 cores)
	$(PY) -m pipeline make-demo-data demo_data
	$(PY) -m pipeline extract demo_data --weights none --image-size 64 --out features/demo.h5
	$(PY) -m pipeline info features/demo.h5

test: $(STAMP)  ## Run the test suite
	$(PY) -m pytest -q

extract: $(STAMP)  ## Extract features: make extract DATA=path [WEIGHTS=imagenet|none|file.pth] [OUT=file.h5] [ARGS=...]
	@test -n "$(DATA)" || { echo "usage: make extract DATA=path [WEIGHTS=...] [OUT=...] [ARGS=...]" >&2; exit 2; }
	$(PY) -m pipeline extract "$(DATA)" --weights "$(WEIGHTS)" $(if $(OUT),--out "$(OUT)") $(ARGS)

info: $(STAMP)  ## Summarise a feature cache: make info FEATURES=file.h5
	$(PY) -m pipeline info "$(FEATURES)"

clean:  ## Remove the demo data, caches and trained heads (keeps .venv)
	rm -rf demo_data features/*.h5 features/*.partial models/*/
