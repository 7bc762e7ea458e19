#!/usr/bin/env bash
# On a machine without the official CIFAR-10 but with its JPEG copy beside the checkout:
# write the copy in the official folder layout (with pillow) into JPEG_DIR, then run a
# profile's make target on it, labelled as the JPEG copy in its figures.
#
#   bash dev/quick-jpeg.sh [PROFILE] [MAKE ARGS]   # e.g. bash dev/quick-jpeg.sh norms-quick SEEDS="1 2 3"
#   JPEG_SOURCE=DIR JPEG_DIR=DIR bash dev/quick-jpeg.sh   # defaults ../shared/data, /tmp/cifar10-jpeg
set -euo pipefail
cd "$(dirname "$0")/.."
source_dir=${JPEG_SOURCE:-../shared/data}
out=${JPEG_DIR:-/tmp/cifar10-jpeg}
profile=${1:-quick}
make -s .venv/.stamp-run
.venv/bin/pip install -q "pillow>=10"
[[ -d $out/cifar-10-batches-py ]] || .venv/bin/python "$source_dir/cifar10_jpeg.py" "$out"
make "$profile" CIFAR10_DIR="$out" \
    LABEL="CIFAR-10, JPEG re-encoded copy (quality 75, 4:2:0; not the official files)" "${@:2}"
