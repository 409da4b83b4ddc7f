# regmirror: every target calls `make install` itself when .venv is missing.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
export PYTHONPATH := tests
CONTROLPLANE_DIR = $(shell tests/controlplane/build.sh 2>/dev/null | tail -n1)
PYTEST_ARGS ?=
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE ?= ghcr.io/regmirror/regmirror:$(VERSION)
DOCKER ?= docker
DOCKER_BUILD_ARGS ?=
KUBECTL ?= kubectl
UNDEPLOY_TIMEOUT ?= 10m

.DEFAULT_GOAL := help

help: ## Show this help
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk -F':.*?## ' '{printf "  %-14s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test,lint]'
	touch $@

install: $(VENV)/.installed ## Create .venv with the package and its test and lint extras

controlplane: ## Build etcd, kube-apiserver, controller-manager, scheduler, kubectl and kwok (cached by version)
	tests/controlplane/build.sh

crd: install ## Regenerate crds/ (and its copy in manifests/crd/) from the pydantic models
	$(VENV)/bin/regmirror crd > crds/registrymirrors.regmirror.dev.yaml
	cp crds/registrymirrors.regmirror.dev.yaml manifests/crd/registrymirrors.regmirror.dev.yaml

docs: install ## Regenerate the README's API reference from the models
	$(PY) -c 'import pathlib, regmirror.offline as o; p = pathlib.Path("README.md"); p.write_text(o.with_api_reference(p.read_text()))'

lint: install ## ruff, mypy (strict) and the import-linter layer contracts
	$(VENV)/bin/ruff check operator tests bench
	$(VENV)/bin/ruff format --check operator tests bench
	$(VENV)/bin/mypy
	cd operator && ../$(VENV)/bin/lint-imports ../pyproject.toml

unit: install ## Pure unit tests (milliseconds)
	$(PY) -m pytest tests/unit -q $(PYTEST_ARGS)

integration: install controlplane ## Tests on the real control plane (etcd, apiserver, kwok nodes)
	$(PY) -m pytest tests/integration -q $(PYTEST_ARGS)

e2e: install ## Data path: real registry, containerd, skopeo, dockerd (needs root); kind tests skip without Docker
	$(PY) -m pytest tests/e2e -q -rs $(PYTEST_ARGS)

test: lint ## Lint and every test suite
	$(MAKE) controlplane
	$(PY) -m pytest tests -q -rs $(PYTEST_ARGS)

dev: install controlplane ## Run the operator on a local control plane (Ctrl-C stops everything)
	$(PY) -m harness.dev

bench: install controlplane ## Benchmarks (SCALE=large for 500 mirrors on 1000 nodes)
	$(VENV)/bin/pip install -q -e '.[bench]'
	$(PY) -m bench $(if $(SCALE),--scale $(SCALE),)

image: ## Build the operator and agent image (one image; IMAGE=name:tag to override)
	$(DOCKER) build $(DOCKER_BUILD_ARGS) -t $(IMAGE) .

deploy: ## Install CRD, namespaces, RBAC and the operator into the current kubectl context
	$(KUBECTL) apply --server-side -k manifests/

undeploy: ## Delete every RegistryMirror (waits until the nodes' files are gone), then all that deploy installed
	@if $(KUBECTL) get crd registrymirrors.regmirror.dev >/dev/null 2>&1; then \
	  echo "deleting every RegistryMirror; the operator removes their node files first (timeout $(UNDEPLOY_TIMEOUT))"; \
	  $(KUBECTL) delete registrymirrors.regmirror.dev --all --wait=true --timeout=$(UNDEPLOY_TIMEOUT); \
	fi
	$(KUBECTL) delete -k manifests/ --ignore-not-found --wait=true

.PHONY: help install controlplane crd docs lint unit integration e2e test dev bench image deploy undeploy
