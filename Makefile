# The two entry points (see README): `make run` and `make test`. Both set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= examples/sst2-minilm-lora.yaml

.PHONY: setup run lint test cluster-tools helm api-server bench compile chart-pipeline k8s-e2e images clean

setup:
	bash scripts/setup.sh

run: setup
	$(VENV)/bin/kftune run $(CONFIG)

# ruff (settings in pyproject.toml): formatting, then lint rules, over all Python sources.
LINTED := src components pipelines tests bench
lint: setup
	$(VENV)/bin/ruff format --check $(LINTED)
	$(VENV)/bin/ruff check $(LINTED)

# Outside CI a machine without helm or the API server skips their tests; with CI=true a failed setup fails the run,
# and so does any test that would skip for lack of them (tests/conftest.py: needs_cluster_tool), so CI cannot pass without them.
CLUSTER_TOOL_MISSING := $(if $(filter true,$(CI)),exit 1,true)

# Two test processes, one file each at a time: much of a test's time is spent starting Ray, subprocesses and
# servers, which two can do at once (every test starts its own Ray cluster and picks free ports). The API server
# builds alongside setup, lint and the suite; the tests that need it wait for it (scripts/test.sh).
test:
	bash scripts/test.sh

cluster-tools: helm api-server

helm:
	bash scripts/install-helm.sh || { echo "helm not installed: the chart tests will skip"; $(CLUSTER_TOOL_MISSING); }

api-server:
	bash scripts/kube-apiserver.sh build || { echo "no kube-apiserver: tests/test_kube_apiserver.py will skip"; $(CLUSTER_TOOL_MISSING); }

bench: setup
	$(PY) bench/overhead.py

# A compiled pipeline needs data and model where the pods can read them (a volume path, s3://, a packaged
# alias): the chart's run config is such a config; the local examples are refused (docs/kubernetes.md).
CLUSTER_CONFIG ?= charts/kftune/files/run-config.yaml
compile: setup
	$(VENV)/bin/kftune compile $(CLUSTER_CONFIG) -o pipeline.yaml

# The compiled pipeline the Helm chart ships (tests/test_chart.py fails when it is stale).
chart-pipeline: setup
	$(VENV)/bin/kftune compile charts/kftune/files/run-config.yaml -o charts/kftune/files/pipeline.yaml

# The chart installed on a real API server (kube-apiserver 1.20 + etcd, built from Debian's sources and cached in
# .cache/k8s on the first run, ~6 min), its RBAC checked, RayJobs created and followed through it (docs/kubernetes.md).
k8s-e2e: setup
	bash scripts/install-helm.sh
	bash scripts/kube-apiserver.sh build
	$(PY) -m pytest -v -rs tests/test_kube_apiserver.py

# The step image built by podman from local stand-ins for its registry bases (debootstrap, uv's PyPI wheel) and
# a local package index: no image registry needed (docs/kubernetes.md). Needs root, podman, debootstrap.
images:
	bash scripts/build-images.sh

clean:
	rm -rf runs pipeline.yaml
