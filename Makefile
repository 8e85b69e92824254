# The README's two commands: `make demo` (the multipath demo) and `make test` (the test suite).
# Both install what they need on a fresh Debian/Ubuntu machine: apt packages (as root) and .venv.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Debian packages the tests (and the demo) use; only missing ones are installed. prometheus scrapes
# --metrics, chromium loads the LuCI views (tests/test_metrics_prometheus.py, tests/test_luci.py).
APT_PACKAGES := iproute2 procps curl nftables iperf3 kmod faketime shellcheck systemd util-linux dnsmasq-base bind9-dnsutils \
	prometheus chromium
# What `make bench` adds: the incumbent it is compared with, and mptcpize to run it over MPTCP.
BENCH_APT_PACKAGES := shadowsocks-libev mptcpize
PYTEST_ARGS ?= --durations=25
# Cores `make test-stress` and `make test-timing` keep busy while the tests run (tests/stress.sh).
STRESS_BUSY ?= 1

.PHONY: demo test test-stress test-timing deps venv lint format bench dist clean

deps:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	$(PYTHON) -c 'import ensurepip' 2>/dev/null || missing="$$missing python3-venv"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" -ne 0 ]; then echo "missing packages:$$missing (run as root to install)"; \
	  else echo "installing:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; fi; \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -m venv $(VENV) || { echo "$(PYTHON) -m venv failed: Debian and Ubuntu ship venv as" \
	  "the python3-venv package (apt-get install python3-venv; make deps does it as root)"; exit 1; }
	$(PY) -m pip install -q -e '.[test]'
	touch $@

test: deps venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

# The whole suite while STRESS_BUSY cores are kept busy by a bounded load (killed afterwards).
test-stress: deps venv
	tests/stress.sh --busy $(STRESS_BUSY) -- $(PYTEST_ARGS)

# The tests marked `timing` three times in a row, STRESS_BUSY cores kept busy.
test-timing: deps venv
	tests/stress.sh --busy $(STRESS_BUSY) --runs 3 -- -m timing $(PYTEST_ARGS)

demo: deps venv
	$(VENV)/bin/mptun demo

bench: deps venv
	@$(MAKE) --no-print-directory deps APT_PACKAGES="$(BENCH_APT_PACKAGES)"
	$(VENV)/bin/pip install -q -e '.[chart]'
	$(VENV)/bin/mptun bench

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: venv
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# The sdist and the wheel built from it (not from the tree, so nothing stale in build/ ships),
# into dist/. Installers take these files (vps/install.sh --from dist/mptun-*.whl).
dist: venv
	rm -rf dist
	$(PY) -m build --outdir dist .

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
