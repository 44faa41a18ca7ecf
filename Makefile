# prunelab — every target sets up .venv first if it is missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=

.DEFAULT_GOAL := help

help: ## Show this help
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install --no-deps -e .
	touch $(STAMP)

install: $(STAMP) ## Create .venv and install prunelab with every dependency

data: ## Install the Debian Fashion-MNIST package when running as root (optional)
	@if [ -d /usr/share/datasets/fashion-mnist ]; then echo "fashion-mnist: present"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	else echo "fashion-mnist: run 'sudo apt-get install dataset-fashion-mnist' or set dataset.download=true"; fi

train: $(STAMP) ## Train on the embedded default (MNIST-1D); overrides via ARGS="pruning=dynamic sparsity=0.9"
	WANDB_MODE=$${WANDB_MODE:-offline} $(PY) train.py $(ARGS)

test: $(STAMP) ## Run the fast test suite (under 10 minutes)
	WANDB_MODE=offline $(PY) -m pytest -q

test-full: $(STAMP) ## Run every test, the slow ones included
	WANDB_MODE=offline $(PY) -m pytest -q -m ""

lint: $(STAMP) ## Check code style with ruff
	$(PY) -m ruff check src tests scripts train.py eval.py
	$(PY) -m ruff format --check src tests scripts train.py eval.py

format: $(STAMP) ## Format code with ruff
	$(PY) -m ruff check --fix src tests scripts train.py eval.py
	$(PY) -m ruff format src tests scripts train.py eval.py

# Oldest first (the folder name starts with the run's start time), so each artifact version is
# credited to the run that made it and later runs find it as their input.
wandb-sync: $(STAMP) ## Upload every offline W&B run under outputs/ (needs an account and network)
	find outputs -type d -name 'offline-run-*' -printf '%f\t%p\n' | sort | cut -f2 \
	  | xargs -r -d '\n' $(VENV)/bin/wandb sync

clean: ## Remove caches (keeps .venv and outputs/)
	rm -rf .pytest_cache .ruff_cache .hypothesis
	find . -name __pycache__ -not -path './.venv/*' -prune -exec rm -rf {} +

.PHONY: help install data train test test-full lint format wandb-sync clean
