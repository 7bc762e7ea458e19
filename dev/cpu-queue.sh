#!/usr/bin/env bash
# On a maintainers' CPU machine (the JPEG copy of CIFAR-10 beside the checkout): train Figure
# 1's paper-scale queue until a time limit, then leave every run resumable; commit what it
# leaves (see dev/README.md). Two single-threaded runs at a time (one per core).
#
#   bash dev/cpu-queue.sh 2h25m          # until then; the same command resumes next time
#   NEAR=0 SMALL=0 bash dev/cpu-queue.sh 2h25m   # seed 1 only, no other run's checkpoint
#
# The runs: seed 1's ten (BN and GN at N = 32 ... 2); the other seeds' runs at N <= SMALL
# (default 4: a GPU is launch-bound there, and takes the large-N end); and any other run of
# the grid whose committed checkpoint is at most NEAR epochs (default 15) from its end, e.g.
# one a GPU machine left nearly done. The sweep's order (gnrepro/sweep.py queue_order): runs
# with a checkpoint first, the nearest to their end first; then seed by seed, the smallest N
# first, BN beside GN.
set -euo pipefail
cd "$(dirname "$0")/.."
limit=${1:?usage: bash dev/cpu-queue.sh DURATION  (e.g. 2h25m, as train.py --time-limit)}
source_dir=${JPEG_SOURCE:-../shared/data}
out=${JPEG_DIR:-/tmp/cifar10-jpeg}
make -s .venv/.stamp-run
.venv/bin/pip install -q "pillow>=10"
[[ -d $out/cifar-10-batches-py ]] || .venv/bin/python "$source_dir/cifar10_jpeg.py" "$out"
tasks=$(NEAR=${NEAR:-15} SMALL=${SMALL:-4} .venv/bin/python -c '
import os
from gnrepro import recipe, sweep
_, args = recipe.parse_args(["--profile", "default"])
near, small = int(os.environ["NEAR"]), int(os.environ["SMALL"])
entries = recipe.grid("default")
def nearly_done(e):
    state, where = sweep.run_state(args, e)
    return state == "checkpointed" and where[1] - where[0] <= near
queue = [i for i, e in enumerate(entries)
         if e.seed == 1 or e.batch_size <= small or nearly_done(e)]
print(" ".join(map(str, queue)))')
echo "dev/cpu-queue.sh: grid entries $tasks, until $limit"
exec .venv/bin/python train.py --profile default --tasks "$tasks" --time-limit "$limit" \
    --threads 1 --jobs 2 --data-dir "$out" \
    --label "CIFAR-10, JPEG re-encoded copy (quality 75, 4:2:0; not the official files)"
