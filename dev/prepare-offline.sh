#!/usr/bin/env bash
# Here, on a machine with network access, before a GPU machine without it: fill .gpu/ (which
# git ignores) with what that machine lacks, for dev/gpu-offline.sh to use there:
# the keras, optree and namex wheels for its Python (3.12, x86_64 Linux) and the JPEG copy of
# CIFAR-10 (its npz and the script that writes it in the official folder layout).
#
#   bash dev/prepare-offline.sh [JPEG_FOLDER]   # default ../shared/data, beside the checkout
set -euo pipefail
cd "$(dirname "$0")/.."
shared=${1:-../shared/data}
mkdir -p .gpu/wheels
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 -d .gpu/wheels keras==3.15.1 optree==0.20.0 namex
cp "$shared/cifar10-jpeg.npz" "$shared/cifar10_jpeg.py" .gpu/
du -sh .gpu
echo "dev/prepare-offline.sh: done; carry .gpu and run there:" \
     "TRAIN_GIT_COMMIT=\$(git rev-parse HEAD) bash dev/gpu-offline.sh SECONDS"
