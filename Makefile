# Set-up and entry points. `make quick` runs the whole pipeline at laptop scale,
# `make test` runs every test (what CI runs). Both create the virtualenv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
BVENV := .venv-backends

.PHONY: quick test test-tf test-backends slurm-deps clean-venv

$(VENV)/.stamp: requirements.txt requirements-test.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements-test.txt
	touch $@

$(BVENV)/.stamp: requirements-backends.txt requirements-jax.txt
	$(PY) -m venv $(BVENV)
	$(BVENV)/bin/pip install -q --upgrade pip
	$(BVENV)/bin/pip install -q -r requirements-backends.txt
	touch $@

# The main job: every norm and batch size of the grid at the quick profile's
# scale, then reproduce.py and plot.py (results.csv, plot.png).
# CIFAR10_DIR=... points at a copy of CIFAR-10; LABEL="..." names it in the figure.
quick: $(VENV)/.stamp
	$(BIN)/python train.py --profile quick $(if $(LABEL),--label "$(LABEL)")

test: test-tf test-backends

test-tf: $(VENV)/.stamp slurm-deps
	$(BIN)/python -m pytest -q tests

# The SLURM tests start a one-node cluster from Debian's slurm-wlm and munge; they are
# installed when missing if we are root (as in CI), else those tests are skipped.
slurm-deps:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then bash .ci/install-slurm.sh; \
	else echo "slurm-deps: not root, not installing slurm-wlm/munge/shellcheck (SLURM tests skip)"; fi

# The layer under the other Keras backends (no TensorFlow in that venv).
test-backends: $(BVENV)/.stamp
	KERAS_BACKEND=jax $(BVENV)/bin/python -m pytest -q tests/test_layer.py
	KERAS_BACKEND=torch $(BVENV)/bin/python -m pytest -q tests/test_layer.py

clean-venv:
	rm -rf $(VENV) $(BVENV)
