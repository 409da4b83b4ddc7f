# regmirror: every target sets up what it needs itself (the venv, Go-built
# tools, Debian packages), or stops at once naming the one command that does.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
export PYTHONPATH := tests
PYTEST_ARGS ?=
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE ?= ghcr.io/regmirror/regmirror:$(VERSION)
DOCKER ?= docker
DOCKER_BUILD_ARGS ?=
KUBECTL ?= kubectl
UNDEPLOY_TIMEOUT ?= 10m

.DEFAULT_GOAL := help

help: ## Show this help
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk -F':.*?## ' '{printf "  %-16s %s\n", $$1, $$2}'

# The venv holds exactly the locked versions (hash-checked), then the package itself.
$(VENV)/.installed: pyproject.toml requirements-dev.lock
	@python3 tests/tools/lock.py check
	python3 -m venv --clear $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q --require-hashes -r requirements-dev.lock
	$(VENV)/bin/pip install -q --no-deps --no-build-isolation -e .
	touch $@

install: $(VENV)/.installed ## Create .venv from requirements-dev.lock (hash-checked) plus the package, editable

lock: ## Recompile requirements.lock (the image) and requirements-dev.lock from pyproject.toml (UPGRADE=1 moves every pin)
	@test -x $(VENV)/bin/uv || { python3 -m venv $(VENV) && $(VENV)/bin/pip install -q "$$(grep -oE '^uv==[^ ]+' requirements-dev.lock || echo uv)"; }
	UV=$(VENV)/bin/uv python3 tests/tools/lock.py compile $(if $(UPGRADE),--upgrade,)

system-packages: ## Debian packages the tests run (registry, containerd, skopeo, dockerd, htpasswd, promtool, varnish); root
	tests/tools/system-packages.sh

controlplane: ## Build etcd, kube-apiserver, controller-manager, scheduler, kubectl and kwok (cached by version)
	tests/controlplane/build.sh >/dev/null

containerd: ## Build containerd 1.7 and 2.4 and crictl for the agent's e2e checks (cached by version)
	tests/e2e/build-containerd.sh >/dev/null

helm: ## Build helm from the Go module proxy (cached by version, tests/tools/versions.env)
	tests/tools/build.sh helm >/dev/null

kind: ## Build kind from the Go module proxy (cached by version, tests/tools/versions.env)
	tests/tools/build.sh kind >/dev/null

distribution: ## Build distribution's registry v3 (what mirrors run) for the metrics e2e (cached by version)
	tests/tools/build.sh registry >/dev/null

versitygw: ## Build versitygw, the S3-compatible server of the HA e2e tests (cached by version)
	tests/tools/build.sh versitygw >/dev/null

crio: ## Build CRI-O (crio and pinns; runc and conmon come from Debian) for the CRI-O e2e tests (cached by version)
	tests/e2e/build-crio.sh >/dev/null

tools: controlplane containerd helm kind distribution versitygw crio ## Every Go-built binary the tests use (under ~/.cache/regmirror)

setup: install system-packages tools ## Everything `make test` needs: venv, Debian packages, Go-built tools

crd: install ## Regenerate crds/ (and its copies in manifests/crd/ and the Helm chart) from the pydantic models
	$(VENV)/bin/regmirror crd > crds/registrymirrors.regmirror.dev.yaml
	cp crds/registrymirrors.regmirror.dev.yaml manifests/crd/registrymirrors.regmirror.dev.yaml
	cp crds/registrymirrors.regmirror.dev.yaml manifests/helm/regmirror/crds/registrymirrors.regmirror.dev.yaml

chart-files: ## Copy the dashboard and alert rules from manifests/monitoring/ into the Helm chart
	cp manifests/monitoring/regmirror-dashboard.json manifests/monitoring/prometheusrule.yaml manifests/helm/regmirror/files/

docs: install ## Regenerate the README's API reference from the models
	$(PY) -c 'import pathlib, regmirror.offline as o; p = pathlib.Path("README.md"); p.write_text(o.with_api_reference(p.read_text()))'

lint: install ## ruff, mypy (strict) and the import-linter layer contracts
	$(VENV)/bin/ruff check operator tests bench
	$(VENV)/bin/ruff format --check operator tests bench
	$(VENV)/bin/mypy
	cd operator && ../$(VENV)/bin/lint-imports ../pyproject.toml
	@# pytest imports test modules by basename (rootdir mode): two test_x.py in different suites stop the whole run at collection.
	@dups=$$(find tests -name 'test_*.py' -printf '%f\n' | sort | uniq -d); \
	  if [ -n "$$dups" ]; then echo "test module names used twice (rename one): $$dups"; exit 1; fi

unit: install ## Pure unit tests (milliseconds)
	$(PY) -m pytest tests/unit -q $(PYTEST_ARGS)

integration: install controlplane helm ## Real control plane (etcd, apiserver, kwok nodes), helm, promtool, the locked install
	tests/tools/system-packages.sh prometheus
	$(PY) -m pytest tests/integration -q $(PYTEST_ARGS)

e2e: install system-packages containerd distribution ## Data path: real registry, containerd, skopeo, dockerd (root); kind tests skip without privileged Docker
	$(PY) -m pytest tests/e2e -q -rs $(PYTEST_ARGS)

kind-e2e: install controlplane kind ## Only the kind e2e: the built image, `make deploy`, a pod pulling through the mirror (needs privileged Docker)
	$(PY) -m pytest tests/e2e/test_kind.py -m kind -q -rs $(PYTEST_ARGS)

test: lint setup ## Lint and every test suite (sets up what they need first)
	$(PY) -m pytest tests -q -rs --durations=30 $(PYTEST_ARGS)

dev: install controlplane ## Run the operator on a local control plane (Ctrl-C stops everything)
	$(PY) -m harness.dev

bench: install controlplane ## Benchmarks (SCALE=large for 500 mirrors on 1000 nodes)
	$(VENV)/bin/pip install -q -e '.[bench]'
	$(PY) -m bench $(if $(SCALE),--scale $(SCALE),)

image: ## Build the operator and agent image (one image; IMAGE=name:tag to override)
	$(DOCKER) build $(DOCKER_BUILD_ARGS) -t $(IMAGE) .

deploy: ## Install CRD, namespaces, RBAC and the operator into the current kubectl context (kustomize)
	$(KUBECTL) apply --server-side -k manifests/

undeploy: ## Delete every RegistryMirror (waits until the nodes' files are gone), then all that deploy installed
	@if $(KUBECTL) get crd registrymirrors.regmirror.dev >/dev/null 2>&1; then \
	  echo "deleting every RegistryMirror; the operator removes their node files first (timeout $(UNDEPLOY_TIMEOUT))"; \
	  $(KUBECTL) delete registrymirrors.regmirror.dev --all --wait=true --timeout=$(UNDEPLOY_TIMEOUT); \
	fi
	$(KUBECTL) delete -k manifests/ --ignore-not-found --wait=true

.PHONY: help install lock system-packages controlplane containerd helm kind tools setup crd chart-files docs lint unit integration e2e kind-e2e distribution versitygw crio test dev bench image deploy undeploy
