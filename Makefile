# kvmha — the two commands an operator or CI needs: `make demo` and `make test`. Everything else is a step of them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV    ?= .venv
PY      := $(VENV)/bin/python
PYTHON  ?= $(shell command -v python3.11 || command -v python3)
APT_PACKAGES := libvirt-daemon-system libvirt-daemon-driver-qemu qemu-system-x86 qemu-utils libvirt-dev pkg-config \
                libvirt-clients openipmi ipmitool iproute2 iputils-ping gcc \
                pacemaker pacemaker-cli-utils corosync fence-agents resource-agents \
                chromium chromium-driver
# The peer stack (kvmha-lab up --stack pacemaker) runs these daemons only inside lab hosts. Installing them must
# start nothing on the machine itself: a policy-rc.d that denies every start during the install (removed after, if
# we made it), and their systemd units disabled so that a machine booted with systemd does not start them either.
CLUSTER_UNITS := corosync.service pacemaker.service
# The databases every machine of this project runs; `make test` runs the database tests against them.
export KVMHA_TEST_POSTGRES_URL ?= postgresql://postgres@127.0.0.1:5432/test
export KVMHA_TEST_MARIADB_URL  ?= mariadb://root@127.0.0.1:3306/test
# With the URLs above set, an unreachable server fails the tests instead of skipping them.
export KVMHA_REQUIRE_DATABASES ?= 1
PYTEST_ARGS ?=

.PHONY: help setup apt venv proto lint typecheck test test-fast demo update-golden bench clean

help:
	@echo "make demo   - a lab of 3 KVM hosts, the manager, 5 VMs; power off a host and watch the recovery"
	@echo "make test   - set up (apt packages, venv) if needed, lint, type-check, run the whole suite"
	@echo "make setup  - only the set-up; make proto - regenerate gRPC stubs; make bench - benchmarks"

setup: apt venv

# Installs only what is missing, so a second run takes a second.
apt:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q "ok installed" || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "apt: installing $$missing"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  policy=/usr/sbin/policy-rc.d; made=; \
	  if [ ! -e $$policy ]; then printf '#!/bin/sh\n# make setup (kvmha): no service starts while packages install\nexit 101\n' > $$policy; \
	    chmod 755 $$policy; made=1; fi; \
	  apt-get update -q && apt-get install -y -q --no-install-recommends $$missing; rc=$$?; \
	  [ -z "$$made" ] || rm -f $$policy; \
	  ! command -v systemctl >/dev/null || systemctl disable $(CLUSTER_UNITS) >/dev/null 2>&1 || true; \
	  exit $$rc; \
	fi

# The venv is rebuilt when pyproject.toml changes (the stamp records its hash).
venv:
	@stamp="$(VENV)/.kvmha-stamp"; want=$$(sha256sum pyproject.toml | cut -c1-64); \
	if [ ! -x "$(PY)" ] || [ "$$(cat $$stamp 2>/dev/null)" != "$$want" ]; then \
	  echo "venv: installing kvmha (editable) with its test extras"; \
	  [ -x "$(PY)" ] || $(PYTHON) -m venv $(VENV); \
	  $(PY) -m pip install -q --upgrade pip && \
	  $(PY) -m pip install -q -e '.[test]' && echo "$$want" > $$stamp; \
	fi

proto: venv
	$(PY) proto/generate.py

# mypy cannot follow setuptools' editable import hook for mapped folders, so it reads the packages through a
# symlink tree that mirrors the import names (kvmha.agent -> agent/, ...). tests/ (a package) and bench/ (scripts,
# checked as a namespace package) are found from the repository root, where make runs mypy.
.typecheck/kvmha:
	@mkdir -p .typecheck/kvmha && touch .typecheck/kvmha/__init__.py
	@ln -sfn ../../proto .typecheck/kvmha/proto; ln -sfn ../../agent .typecheck/kvmha/agent
	@ln -sfn ../../manager .typecheck/kvmha/manager; ln -sfn ../../deploy/lab .typecheck/kvmha/lab

lint: venv
	$(VENV)/bin/ruff check proto agent manager deploy tests bench

typecheck: venv .typecheck/kvmha
	MYPYPATH=.typecheck $(VENV)/bin/mypy -p kvmha.proto -p kvmha.agent -p kvmha.manager -p kvmha.lab -p tests -p bench

test: setup lint typecheck
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# The quick loop while coding: no lab, no real libvirtd.
test-fast: venv
	$(VENV)/bin/pytest -m "not lab and not libvirt" $(PYTEST_ARGS)

demo: setup
	$(PY) -m kvmha.lab.demo

update-golden: venv
	KVMHA_UPDATE_GOLDEN=1 $(VENV)/bin/pytest -q tests/scenarios

bench: setup
	@for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf .typecheck .mypy_cache .ruff_cache .pytest_cache build *.egg-info
