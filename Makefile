# llmop developer entry points. Every target installs what it needs on a fresh machine.
SHELL := /bin/bash
.DEFAULT_GOAL := help
PY := .venv/bin/python
UV := $(shell command -v uv 2>/dev/null || echo $(HOME)/.local/bin/uv)
# Four distributions: the contract both images install, the trainer, the operator (the root) and the
# development tools (local cluster, runtime, demo) that no image carries. The venv holds all four.
PYPROJECTS := operator/contract/pyproject.toml trainer_image/pyproject.toml pyproject.toml operator/dev/pyproject.toml
STAMP := .venv/.installed-$(shell cat $(PYPROJECTS) | sha256sum | cut -c1-12)
PYTEST_ARGS ?=

.PHONY: help
help: ## List targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

$(UV):
	python3 -m pip install --quiet --user uv==0.13.8

$(STAMP): $(PYPROJECTS) | $(UV)
	@test -x $(PY) || $(UV) venv --python 3.11 .venv
	@# DeepSpeed's sdist imports torch in setup.py, so torch goes in first and DeepSpeed builds
	@# against it without isolation (DS_BUILD_OPS=0: ops are JIT-built on demand, none needed on CPU).
	$(UV) pip install --python $(PY) torch==2.15.0 setuptools wheel
	DS_BUILD_OPS=0 $(UV) pip install --python $(PY) --no-build-isolation-package deepspeed \
	  -e operator/contract -e trainer_image -e '.[dev]' -e operator/dev
	@rm -f .venv/.installed-* && touch $@

.PHONY: venv
venv: $(STAMP) ## Create .venv with the operator, trainer and dev dependencies

.PHONY: bins
bins: ## Build the pinned cluster binaries into ~/.cache/llmop (once per version)
	hack/build-cluster-bins.sh

.PHONY: crds
crds: venv ## Regenerate crds/ from the API models, and the Helm chart's copies of them
	$(PY) -m llmop_contract.api.crdgen crds
	rm -f helm/llmop/crds/*.yaml && cp crds/*.yaml helm/llmop/crds/

.PHONY: cluster-up
cluster-up: venv ## Start (or reuse) the local kwok cluster; prints the kubeconfig path last
	@$(PY) -m llmop_dev.cluster up

.PHONY: cluster-down
cluster-down: venv ## Stop the local cluster
	@$(PY) -m llmop_dev.cluster down

.PHONY: lint
lint: venv ## ruff (lint + format check) and mypy --strict on the four packages
	$(PY) -m ruff check operator trainer_image tests benchmarks
	$(PY) -m ruff format --check operator trainer_image tests benchmarks
	$(PY) -m mypy operator/contract/llmop_contract operator/llmop operator/dev/llmop_dev trainer_image/llmtrain

.PHONY: prometheus
prometheus: ## Unpack Debian's prometheus + promtool into ~/.cache/llmop/bin for the monitoring tests
	hack/install-prometheus.sh

.PHONY: helm-lint
helm-lint: bins ## helm lint --strict the chart (tests/helm also renders it, validates it and installs it)
	$${LLMOP_CACHE_DIR:-$$HOME/.cache/llmop}/bin/helm lint --strict helm/llmop --kube-version $$(. hack/versions.env && echo $$K8S_VERSION)

.PHONY: test
test: venv bins prometheus ## Install everything, then run the whole suite (cluster tests included)
	$(PY) -m pytest -ra --durations=30 $(PYTEST_ARGS)

.PHONY: runtime
runtime: venv ## Run the development runtime (pods on nodes local-0/1 as local processes) in the foreground
	$(PY) -m llmop.cli dev runtime

.PHONY: finetune
finetune: venv bins ## LoRA fine-tune of a Hugging Face model on chat records (examples/finetune.yaml), served
	$(PY) -m llmop_dev.finetune

.PHONY: demo
demo: venv bins ## Cluster + runtime + operator; train examples/quickstart.yaml from kubectl apply to a model
	$(PY) -m llmop_dev.demo
