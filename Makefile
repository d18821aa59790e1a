# corpusfactory: set-up, demo, tests and checks.
#
# The virtual environment is built once per requirements.lock and cached outside
# the checkout (CORPUSFACTORY_CACHE, default ~/.cache/corpusfactory); .venv is a
# link to it. The broker's jars and the demo models are cached there too, so
# every target is fast when everything is already in place.

PYTHON ?= python3
CACHE ?= $(or $(CORPUSFACTORY_CACHE),$(HOME)/.cache/corpusfactory)
LOCK_HASH := $(shell sha256sum requirements.lock | cut -c1-16)
VENV_DIR := $(CACHE)/venvs/$(LOCK_HASH)
VENV := .venv
PY := $(VENV)/bin/python
export CORPUSFACTORY_CACHE := $(CACHE)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup venv jars models system demo test check format clean-state

setup: venv jars models system

# Programs from the system's packages: Chromium (the web chat page is tested in it,
# headless) and Prometheus (its server and promtool: the monitoring configs, alert
# rules and dashboard queries are tested against them). Installed with apt-get when
# missing and allowed (root), else explained.
SYSTEM_PACKAGES := chromium prometheus
system:
	@mkdir -p .state; missing=""; for p in $(SYSTEM_PACKAGES); do command -v $$p >/dev/null || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "installing system packages:$$missing"; \
			DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing >.state/apt.log 2>&1 \
				|| { apt-get update -q >>.state/apt.log 2>&1 && \
				     DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing >>.state/apt.log 2>&1; } \
				|| { cat .state/apt.log; exit 1; }; \
		else echo "missing system packages:$$missing (install them, e.g. apt-get install$$missing)"; exit 1; fi; \
	fi

# The cached environment is complete only once its marker exists: an interrupted
# install is started again from scratch. Its path carries the lock's hash, so the
# marker has no prerequisite: a fresh clone's newer lock-file mtime must not
# rebuild (and delete) an environment other checkouts share. Virtual environments
# cannot be moved once built, so it is built in place, under a lock.
$(VENV_DIR)/.complete:
	@mkdir -p "$(CACHE)/venvs"
	@flock "$(CACHE)/venvs/.$(LOCK_HASH).lock" $(MAKE) --no-print-directory _build-venv

.PHONY: _build-venv
_build-venv:
	@if [ ! -e "$(VENV_DIR)/.complete" ]; then \
		rm -rf "$(VENV_DIR)" && \
		$(PYTHON) -m venv "$(VENV_DIR)" && \
		"$(VENV_DIR)/bin/python" -m pip install -q --upgrade pip && \
		"$(VENV_DIR)/bin/python" -m pip install -q -r requirements.lock && \
		touch "$(VENV_DIR)/.complete"; \
	fi

venv: $(VENV_DIR)/.complete
	@if [ -e $(VENV) ] && [ ! -L $(VENV) ]; then echo "$(VENV) exists and is not a link: remove it"; exit 1; fi
	@ln -sfn "$(VENV_DIR)" $(VENV)
	@mkdir -p .state
	@$(PY) -m pip install -q --no-deps --no-build-isolation -e . >.state/editable-install.log 2>&1 \
		|| { cat .state/editable-install.log; exit 1; }

jars: venv
	@$(PY) -c "from corpusfactory.broker import ensure_jars; ensure_jars()"

models: venv
	@$(VENV)/bin/corpusfactory --log-level WARNING models build-demo >/dev/null

demo: setup
	$(VENV)/bin/corpusfactory demo --config configs/demo.yaml

# The tests run under the cached environment's own path, not through the .venv link:
# torch rebuilds DeepSpeed's CPU op (about 50 s) whenever its include paths change,
# and through the link they would change with every checkout's folder.
test: setup
	$(VENV_DIR)/bin/python -m pytest -q -p no:cacheprovider

check: venv
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

format: venv
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean-state:
	rm -rf .state
