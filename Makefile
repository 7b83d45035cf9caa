# TensorWasm — `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
PYTEST_ARGS ?=

##@ Getting started

.PHONY: help
help: ## Show this help
	@awk 'BEGIN {FS = ":.*##"; printf "Usage: make \033[36m<target>\033[0m\n"} \
	  /^[a-zA-Z_-]+:.*?##/ { printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2 } \
	  /^##@/ { printf "\n\033[1m%s\033[0m\n", substr($$0, 5) }' $(MAKEFILE_LIST)

.PHONY: demo
demo: setup ## Local cluster with a real node: build the image, helm install, run the whole flow on real pods
	$(PY) -m tensorwasm.dev.demo

.PHONY: test
test: setup ## Run every test (unit + real control plane; GPU tests skip without a GPU)
	$(PY) -m pytest $(PYTEST_ARGS)

# The first run's slow steps at once: pip, apt and the Go module download wait on the network while
# the compiler keeps both cores busy, and the image (as root: Debian base, apt, wheels) builds beside
# them. Each is cached, so a later run passes through in seconds. docs/dev-cluster.md, "The build".
.PHONY: setup
setup: ## What demo and test need, the steps side by side: venv, node packages, binaries, image (root)
	@$(MAKE) --no-print-directory -j4 install deps controlplane $(if $(filter 0,$(shell id -u)),image)

##@ Development

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[operator,runtime,planner,test]'
	rm -f $(VENV)/.installed-* && touch $@

.PHONY: install
install: $(STAMP) ## Create .venv and install the project with its extras

.PHONY: deps
deps: ## Install the Debian packages the real node needs (runc, CNI plugins, iptables); no-op when present
	@bash hack/node/deps.sh

.PHONY: controlplane
controlplane: ## Build (once, cached by version outside the repo) the cluster's binaries, with progress
	@bash hack/controlplane/build.sh >/dev/null

.PHONY: test-unit
test-unit: install ## Run only the tests that need no control plane
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

CHART := helm/tensorwasm
# The cached control-plane build holds helm too (build.sh prints its bin dir last, and is instant once built).
HELM = "$$(bash hack/controlplane/build.sh 2>/dev/null | tail -1)/helm"

.PHONY: crds
crds: install ## Regenerate crds/ from the spec models (tensorwasm.api) and copy them into the chart
	$(PY) -m tensorwasm.api.crd crds
	$(MAKE) --no-print-directory helm-sync

.PHONY: helm-sync
helm-sync: ## Copy crds/ and the selftest module into the Helm chart (a chart cannot read files outside itself)
	@mkdir -p $(CHART)/files/crds $(CHART)/files/selftest
	rm -f $(CHART)/files/crds/*.yaml
	cp crds/tensorwasm.io_*.yaml $(CHART)/files/crds/
	cp examples/modules/echo.wasm $(CHART)/files/selftest/echo.wasm

.PHONY: chart-readme
chart-readme: install ## Regenerate helm/tensorwasm/README.md (helm show readme) from values.yaml's comments
	$(PY) hack/chart_readme.py

.PHONY: sample-modules
sample-modules: install ## Compile examples/modules/*.wasm from their WAT in tests/fixtures
	$(PY) -c 'import sys, wasmtime; [open(f"examples/modules/{n}.wasm", "wb").write(wasmtime.wat2wasm(open(f"tests/fixtures/{n}.wat").read())) for n in sys.argv[1:]]' echo sum stateful counter streamer

CHART_DIST ?= dist
# Where `make chart-publish` pushes: an OCI repository (helm push appends the chart name).
CHART_REGISTRY ?= oci://ghcr.io/tensorwasm/charts
HELM_PUSH_FLAGS ?=

.PHONY: chart-package
chart-package: controlplane ## helm package the chart into $(CHART_DIST)/
	@mkdir -p $(CHART_DIST)
	$(HELM) package $(CHART) -d $(CHART_DIST)

.PHONY: chart-publish
chart-publish: chart-package ## Push the chart as an OCI artifact: make chart-publish CHART_REGISTRY=oci://host/path
	$(HELM) push $(CHART_DIST)/tensorwasm-$$(sed -n 's/^version: *//p' $(CHART)/Chart.yaml).tgz $(CHART_REGISTRY) $(HELM_PUSH_FLAGS)

.PHONY: registry
registry: ## Build (once, cached) a local OCI registry (distribution) for the chart-publish test
	@bash hack/controlplane/build.sh registry | tail -1

.PHONY: helm-lint
helm-lint: controlplane ## helm lint --strict the chart (defaults, every feature on); fails if CRDs are out of sync
	@diff -r -x '.*' crds $(CHART)/files/crds --exclude=samples >/dev/null || \
	  { echo "$(CHART)/files/crds differs from crds/: run make helm-sync"; exit 1; }
	$(HELM) lint --strict $(CHART)
	$(HELM) lint --strict $(CHART) --set mps.enabled=true,autoscaling.enabled=true,monitoring.force=true

.PHONY: lint
lint: install ## ruff, mypy (strict) and import-linter contracts
	$(VENV)/bin/ruff check api operator runtime dev tests bench
	$(VENV)/bin/ruff format --check api operator runtime dev tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

.PHONY: fmt
fmt: install ## Format the code with ruff
	$(VENV)/bin/ruff format api operator runtime dev tests bench
	$(VENV)/bin/ruff check --fix api operator runtime dev tests bench

.PHONY: bench
bench: install deps controlplane ## Run the benchmarks; results in bench/results, table in docs/performance.md
	$(PY) bench/run.py

.PHONY: gpu-node-plan
gpu-node-plan: install deps controlplane image ## Pack the GPU node (issue 19) into .gpunode/ and print the device calls that run it on the GPU machine
	bash hack/gpunode/pack.sh

##@ Local cluster

.PHONY: cluster-up
cluster-up: install deps controlplane ## Start the local control plane and its real node (prints the KUBECONFIG export)
	$(VENV)/bin/tensorwasm dev cluster up

.PHONY: cluster-down
cluster-down: install ## Stop the control plane and real node; remove their state, netns, routes, mounts
	$(VENV)/bin/tensorwasm dev cluster down

.PHONY: cluster-status
cluster-status: install ## Show the local control plane's processes and readiness
	$(VENV)/bin/tensorwasm dev cluster status

.PHONY: cluster-import-image
cluster-import-image: install ## Import an image archive into the real node: make cluster-import-image ARCHIVE=x.oci.tar
	@test -n "$(ARCHIVE)" || { echo "usage: make cluster-import-image ARCHIVE=path/to/image.oci.tar"; exit 1; }
	$(VENV)/bin/tensorwasm dev cluster import-image $(ARCHIVE)

.PHONY: clean
clean: ## Remove the virtualenv and caches in the repo (the Go build cache stays)
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

##@ Container image

IMAGE_REF ?=
.PHONY: image
image: ## Build the Containerfile without Docker (root; cached) into an OCI archive; prints ref, digest, path
	$(PYTHON) hack/image/build.py $(if $(IMAGE_REF),--ref $(IMAGE_REF))
