# Everything runs from the tree with a cached virtualenv (hack/ensure-env.sh) and cached
# Go-built cluster binaries (hack/build-tools.sh); both are built only when missing.
SHELL := /bin/bash
VENV := $(shell hack/ensure-env.sh --path)
PY := $(VENV)/bin/python
export PYTHONPATH := $(CURDIR)/operator:$(CURDIR)/trainer_image:$(CURDIR)/devtools
export PATH := $(VENV)/bin:$(PATH)
PYTEST_ARGS ?=

.PHONY: deps tools lock images ipex-llm prereqs lint generate test unit demo dev-up dev-down clean bench-startup bench-operator bench-trainer bench-data bench-gpu bench-recovery bench-goodput

deps:
	@hack/ensure-env.sh >/dev/null

tools:
	@hack/build-tools.sh

# The operator and trainer images (and the dev cluster's pause image), built daemonless
# from their Dockerfiles and pushed to the registry storage the dev cluster serves; only
# what changed is rebuilt.
images:
	@hack/images.sh >/dev/null

# Recompile the locks after a change to pyproject.toml's dependencies (pins kept unless a
# range excludes them; UPGRADE="--upgrade-package torch" or "--upgrade" to move them).
# dev.lock is the resolution; the images' locks are its subsets, constrained to its pins.
UV_COMPILE = UV_CUSTOM_COMPILE_COMMAND="make lock" $(VENV)/bin/uv pip compile -q --generate-hashes --python-version 3.11 $(UPGRADE)
lock: deps
	$(UV_COMPILE) pyproject.toml --extra dev -o requirements/dev.lock
	$(UV_COMPILE) pyproject.toml --extra operator -c requirements/dev.lock -o requirements/operator.lock
	$(UV_COMPILE) pyproject.toml --extra trainer -c requirements/dev.lock -o requirements/trainer.lock
	$(UV_COMPILE) --no-deps --no-annotate requirements/test-model.in -o requirements/test-model.lock
	$(UV_COMPILE) requirements/ipex-llm.in -o requirements/ipex-llm.lock

lint: deps
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m kubetune_dev generate --check

# Regenerate the CRD (crds/ and the chart copy) from operator/kubetune/api.py.
generate: deps
	$(PY) -m kubetune_dev generate

# The README's test command: lint, then unit, integration and e2e tests against a real
# dev cluster that the test session starts and stops itself.
# pytest exits 5 when it collected nothing: a broken suite, reported as such.
# The binaries (Go builds: CPU) and the images (mostly downloads on a cold machine) at once.
prereqs: deps
	@hack/build-tools.sh & tools=$$!; hack/images.sh >/dev/null & images=$$!; \
	  wait $$tools; t=$$?; wait $$images; i=$$?; exit $$((t || i))

# The opt-in ipex-llm stack's venv and trainer image (~7 GB each), which only its own tests
# and examples need: `make test` builds them, `make demo` does not.
ipex-llm: deps
	@hack/ensure-env.sh --stack ipex-llm >/dev/null && hack/images.sh --ipex-llm >/dev/null

test: prereqs ipex-llm lint
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests: the suite is missing or broken" >&2; fi; \
	  exit $$rc

# The pure tests alone: no marker of what a test needs (tools, cluster, slow, gpu), so the
# virtualenv is all they need (no binaries, images or cluster); tests/conftest.py makes
# the Go-built binaries refuse any test not marked tools or cluster.
unit: deps
	@$(PY) -m pytest -m "not (tools or cluster or slow or gpu)" $(PYTEST_ARGS)

# The README's main-job command.
demo: prereqs
	$(PY) -m kubetune_dev demo

dev-up: prereqs
	$(PY) -m kubetune_dev dev up

dev-down: deps
	$(PY) -m kubetune_dev dev down

clean:
	-$(PY) -m kubetune_dev dev down
	rm -rf .dev .pytest_cache .ruff_cache

bench-startup: deps tools images
	$(PY) benchmarks/dev_cluster_startup.py

# The operator beside a minimal controller: 500-job bursts, API requests per job (kube-apiserver's
# counts), progress reports, 5,000 jobs created, completed and deleted (RSS, CPU); tens of
# minutes: the operator posts the 5,000 jobs' Events at 10/s, and the phase waits for them.
bench-operator: deps tools images
	$(PY) benchmarks/operator_scale.py

bench-trainer: deps
	$(PY) benchmarks/trainer_throughput.py

bench-data: deps tools
	$(PY) benchmarks/data_stream.py

bench-gpu: deps
	$(PY) benchmarks/gpu_qlora.py

bench-recovery: deps tools images
	$(PY) benchmarks/recovery.py

# Goodput under a seeded spot market: kubetune vs periodic checkpoints vs restart from scratch.
bench-goodput: deps tools
	$(PY) benchmarks/goodput.py
