#!/usr/bin/env bash
# On a GPU machine without network access that has JAX but no Keras and no CIFAR-10, with the
# .gpu/ folder that dev/prepare-offline.sh filled: install the carried wheels into .gpu/site
# (where Keras is missing), write CIFAR-10 from the JPEG copy's npz into .gpu/data (in the
# background: gpu.sh waits for it after its benchmark), then run gpu.sh with both.
#
#   TRAIN_GIT_COMMIT=$(git rev-parse HEAD) bash dev/gpu-offline.sh SECONDS [TASK ...]
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
if ! python3 -c 'import keras' 2>/dev/null; then
    [[ -d .gpu/site/keras ]] ||
        python3 -m pip install -q --no-index --no-deps --no-compile --target .gpu/site \
            .gpu/wheels/*.whl || exit 1
    export PYTHONPATH=$PWD/.gpu/site${PYTHONPATH:+:$PYTHONPATH}
fi
if [[ ! -d .gpu/data/cifar-10-batches-py ]]; then
    mkdir -p .gpu/console
    (python3 .gpu/cifar10_jpeg.py .gpu/data.tmp >.gpu/console/data.txt 2>&1 &&
        mv .gpu/data.tmp .gpu/data) &
fi
DATA_DIR=.gpu/data exec bash gpu.sh "$@"
