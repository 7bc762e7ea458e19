# Set-up and entry points. `make quick` runs the whole pipeline at laptop scale, `make test`
# runs every test (what CI runs), `make test-fast` the inner loop of a change. Each creates
# the virtualenvs it needs first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
BVENV := .venv-backends
STUDIES := he-quick norms-quick groups-quick workers-quick bnstats-quick

.PHONY: quick studies-quick $(STUDIES) test test-fast test-tf test-backends slurm-deps clean-venv

# The runtime (what the main job needs), then the test dependencies on top of it.
$(VENV)/.stamp-run: requirements.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	touch $@

$(VENV)/.stamp: $(VENV)/.stamp-run tests/requirements.txt
	$(BIN)/pip install -q -r tests/requirements.txt
	touch $@

# Keras on JAX and PyTorch, no TensorFlow: the tests under the other backends.
$(BVENV)/.stamp: requirements-jax.txt tests/requirements.txt
	$(PY) -m venv $(BVENV)
	$(BVENV)/bin/pip install -q --upgrade pip
	$(BVENV)/bin/pip install -q -r requirements-jax.txt -r tests/requirements.txt
	touch $@

# The main job: every norm and batch size of the grid at the quick profile's scale, then
# reproduce.py and plot.py: models/quick/, logs/quick/, results/quick/ (results.csv, plot.png,
# curves.png). The studies beyond Figure 1 at the same scale, each the same way into its own
# folders (make norms-quick: models/norms-quick/, results/norms-quick/, ...; all of them:
# make studies-quick). CIFAR10_DIR=... points at a copy of CIFAR-10; LABEL="..." names it in
# the figures; SEEDS="1 2 3" runs the grid with those seeds (a spread) instead of the profile's.
quick $(STUDIES): $(VENV)/.stamp-run
	$(BIN)/python train.py --profile $@ $(if $(LABEL),--label "$(LABEL)") $(if $(SEEDS),--seeds "$(SEEDS)")

studies-quick: $(STUDIES)

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
	KERAS_BACKEND=jax $(BVENV)/bin/python -m pytest -q tests/test_layer.py tests/test_convert.py tests/test_workers.py tests/test_backends.py tests/test_packs.py
	KERAS_BACKEND=torch $(BVENV)/bin/python -m pytest -q tests/test_layer.py tests/test_workers.py tests/test_backends.py

# The inner loop (about 3 minutes on 2 cores): the layer, the builder, the recipe, the data and
# the pipeline on tiny fixtures, under TensorFlow; no SLURM, no second virtualenv, none of the
# tests marked slow (whole sweeps, resumes after a kill, real data). Before a submission:
# make test.
FAST := test_layer test_convert test_imports test_readme test_cifar10 test_train test_studies \
	test_sweep test_reproduce test_plot test_faults test_workers test_paper_scale
test-fast: $(VENV)/.stamp
	$(BIN)/python -m pytest -q -m "not slow" $(FAST:%=tests/%.py)

clean-venv:
	rm -rf $(VENV) $(BVENV)
