# Set-up and entry points. `make quick` runs the whole pipeline at laptop scale,
# `make test` runs every test (what CI runs). Both create the virtualenv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
BVENV := .venv-backends

.PHONY: quick quick-jpeg studies-quick he-quick norms-quick groups-quick workers-quick test test-tf \
	test-backends slurm-deps clean-venv

# The runtime (what the main job needs), then the test dependencies on top of it.
$(VENV)/.stamp-run: requirements.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	touch $@

$(VENV)/.stamp: $(VENV)/.stamp-run requirements-test.txt
	$(BIN)/pip install -q -r requirements-test.txt
	touch $@

$(BVENV)/.stamp: requirements-backends.txt requirements-jax.txt
	$(PY) -m venv $(BVENV)
	$(BVENV)/bin/pip install -q --upgrade pip
	$(BVENV)/bin/pip install -q -r requirements-backends.txt
	touch $@

# The main job: every norm and batch size of the grid at the quick profile's scale,
# then reproduce.py and plot.py: models/quick/, logs/quick/, results-quick.csv,
# plot-quick.png, curves-quick.png (apart from the paper-scale runs in models/).
# CIFAR10_DIR=... points at a copy of CIFAR-10; LABEL="..." names it in the figure.
# The studies beyond Figure 1 at the same scale, each into its own files the same way
# (models/norms-quick/, results-norms-quick.csv, plot-norms-quick.png, ...).
# SEEDS="1 2 3" runs the grid with those seeds (a spread) instead of the profile's one.
quick he-quick norms-quick groups-quick workers-quick: $(VENV)/.stamp-run
	$(BIN)/python train.py --profile $@ $(if $(LABEL),--label "$(LABEL)") $(if $(SEEDS),--seeds "$(SEEDS)")

studies-quick: he-quick norms-quick workers-quick groups-quick

# The main job on a machine without network that holds the JPEG copy of CIFAR-10 beside
# the checkout (../shared/data): convert it (with pillow) into JPEG_DIR, then `quick` on it
# (or another profile: make quick-jpeg PROFILE=norms-quick).
JPEG_DIR ?= /tmp/cifar10-jpeg
PROFILE ?= quick
quick-jpeg: $(VENV)/.stamp-run
	$(BIN)/pip install -q "pillow>=10"
	test -d $(JPEG_DIR)/cifar-10-batches-py || $(BIN)/python ../shared/data/cifar10_jpeg.py $(JPEG_DIR)
	$(MAKE) $(PROFILE) CIFAR10_DIR=$(JPEG_DIR) LABEL="CIFAR-10, JPEG re-encoded copy (not the official files)"

# Both suites at once, each one's output printed whole as it ends: one suite alone keeps about
# one core busy (the SLURM tests wait on the scheduler, start-ups wait on imports), and CI's
# machine has two.
test:
	$(MAKE) --no-print-directory -j2 --output-sync=target test-tf test-backends

# .venv-backends first: some tests here run JAX without TensorFlow through it (gpu.sh,
# a JAX-trained model evaluated under TensorFlow).
test-tf: $(VENV)/.stamp $(BVENV)/.stamp slurm-deps
	$(BIN)/python -m pytest -q tests

# The SLURM tests start a one-node cluster from Debian's slurm-wlm and munge; they are
# installed when missing if we are root (as in CI), else those tests are skipped.
slurm-deps:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then bash .ci/install-slurm.sh; \
	else echo "slurm-deps: not root, not installing slurm-wlm/munge/shellcheck (SLURM tests skip)"; fi

# The layer and the whole pipeline under the other Keras backends (no TensorFlow in that venv).
test-backends: $(BVENV)/.stamp
	KERAS_BACKEND=jax $(BVENV)/bin/python -m pytest -q tests/test_layer.py tests/test_workers.py tests/test_backends.py tests/test_packs.py
	KERAS_BACKEND=torch $(BVENV)/bin/python -m pytest -q tests/test_layer.py tests/test_workers.py tests/test_backends.py

clean-venv:
	rm -rf $(VENV) $(BVENV)
