#!/usr/bin/env bash
# The paper-scale sweep on a borrowed GPU machine that has JAX but no TensorFlow or Keras
# (the `device` tool of this workplace; any such machine will do).
#
#   bash gpu.sh prepare [../shared/data]   # here: fill .gpu/ (wheels, the JPEG copy's npz)
#   TRAIN_GIT_COMMIT=$(git rev-parse HEAD) bash gpu.sh SECONDS [TASK ...]   # there, one call
#                 # default tasks: the default grid's entries without a run record in models/
#   PROFILE=norms ... bash gpu.sh SECONDS   # another profile's grid (models/norms/, ...)
#   SEEDS="4 5" ... bash gpu.sh SECONDS     # the grid with other seeds (train.py --seeds)
#
# 1. installs the wheels carried in .gpu/wheels/ (keras, optree, namex) into .gpu/site/
#    where Keras is missing;
# 2. writes CIFAR-10 (the JPEG copy's .gpu/cifar10-jpeg.npz, in the official folder layout)
#    into .gpu/data/, in the background;
# 3. first call only (no .gpu/bench.txt yet): bench.py loop, at most BENCH_SECONDS: the scan
#    loop and fit at N = 2 (which is faster decides the sweep's --loop), then BN and GN at
#    N = 32 and 2, W = 8, float32 and mixed precision;
# 4. trains the tasks, JOBS at a time, largest batches first (they finish soonest), each
#    `python train.py --task I` with its own share of GPU memory; SECONDS after the start
#    (less a margin to pack) every run still going gets SIGUSR1, checkpoints and exits;
# 5. packs models/ (records, models, checkpoints) and logs/ into $OUT/runs.tgz.part-*
#    (15 MB each), with the console log $OUT/gpu.log.
# Calling it again on the same machine resumes the unfinished runs from their checkpoints.
# TRAIN_ARGS="--epochs 1 --train-images 500" adds arguments to every train.py (a rehearsal).
#
# TRAIN_GIT_COMMIT names the commit in the run records (the copy there may lack .git).
# A later call that carries .gpu again skips the benchmark if .gpu/bench.txt is there.
set -uo pipefail
cd "$(dirname "$0")" || exit 2

if [[ ${1:-} == prepare ]]; then
    # Here, before the GPU's clock starts: what the call carries, in a git-ignored .gpu/.
    shared=${2:-../shared/data}
    grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >>.git/info/exclude
    mkdir -p .gpu/wheels
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 -d .gpu/wheels keras==3.15.1 optree==0.20.0 namex || exit 1
    cp "$shared/cifar10-jpeg.npz" "$shared/cifar10_jpeg.py" .gpu/ || exit 1
    du -sh .gpu
    echo "gpu.sh prepare: done; carry .gpu and run: TRAIN_GIT_COMMIT=\$(git rev-parse HEAD) bash gpu.sh SECONDS"
    exit 0
fi

budget=${1:?usage: bash gpu.sh SECONDS [TASK ...]  |  bash gpu.sh prepare [SHARED_DATA_DIR]}
shift
JOBS=${JOBS:-4}
BENCH_SECONDS=${BENCH_SECONDS:-120}
PACK_SECONDS=${PACK_SECONDS:-45}
START_SECONDS=${START_SECONDS:-60}   # no run starts with less than this left before the deadline
out=${OUT:-.gpu/out}
mkdir -p "$out" .gpu/console
exec > >(tee -a "$out/gpu.log") 2>&1

elapsed() { echo $((SECONDS)); }
echo "gpu.sh: $(date '+%F %T'), budget ${budget}s, $JOBS runs at a time"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

export KERAS_BACKEND=jax PYTHONUNBUFFERED=1
if ! python3 -c 'import keras' 2>/dev/null; then
    [[ -d .gpu/site/keras ]] ||
        python3 -m pip install -q --no-index --no-deps --no-compile --target .gpu/site .gpu/wheels/*.whl ||
        exit 1
    export PYTHONPATH=$PWD/.gpu/site
fi
python3 -c 'import jax, keras; print("jax", jax.__version__, jax.devices(), "keras", keras.__version__)' || exit 1

# Default: the grid entries with no run record in the profile's models folder (the committed
# paper-scale runs), seed by seed, largest batch first, the norms alternating; not those that
# another profile provides (marked by --grid: that profile trains them, once).
PROFILE=${PROFILE:-default}
grid=(--profile "$PROFILE" ${SEEDS:+--seeds "$SEEDS"})   # the same for --grid and every --task
models=$(python3 -c "import sys, train
p = sys.argv[1]
sys.exit(f'gpu.sh: no profile {p!r}: one of {list(train.PROFILES)}') if p not in train.PROFILES else None
print(train.profile_paths(p)['models_dir'])" "$PROFILE") || exit 2
listing=$(python3 train.py --grid "${grid[@]}") || exit 2
if (($#)); then
    tasks=$*
else
    tasks=$(awk '!/^#/ && !/# provided by/' <<<"$listing" | sort -k10,10n -k6,6nr -k4,4 |
        while read -r i name _; do [[ -f $models/$name.json ]] || echo "$i"; done | xargs)
fi
echo "gpu.sh: profile $PROFILE, tasks: ${tasks:-none left}"

data_pid=""
if [[ ! -d .gpu/data/cifar-10-batches-py ]]; then
    python3 .gpu/cifar10_jpeg.py .gpu/data.tmp >.gpu/console/data.txt 2>&1 &&
        mv .gpu/data.tmp .gpu/data &
    data_pid=$!
fi

loop=scan
if [[ ! -f .gpu/bench.txt ]]; then
    # The whole GPU for the benchmark (one process at a time), cut off after BENCH_SECONDS.
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 timeout "$BENCH_SECONDS" \
        python3 bench.py loop --norms gn --batch-sizes 2 --loops fit scan 2>&1 | tee .gpu/bench.txt
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 timeout $((BENCH_SECONDS - SECONDS > 5 ? BENCH_SECONDS - SECONDS : 5)) \
        python3 bench.py loop --norms bn gn --batch-sizes 32 2 --precisions float32 mixed 2>&1 |
        tee -a .gpu/bench.txt
fi
# The faster loop at N = 2 (where dispatch matters most) trains the sweep.
fit=$(awk '$1 == "fit" && $2 == "gn" && $3 == 2 && $5 == "float32" {print $6}' .gpu/bench.txt | head -n 1)
scan=$(awk '$1 == "scan" && $2 == "gn" && $3 == 2 && $5 == "float32" {print $6}' .gpu/bench.txt | head -n 1)
if [[ -n $fit && -n $scan ]] && ((fit > scan)); then loop=fit; fi
echo "gpu.sh: sweep loop $loop (gn N=2 img/s: fit ${fit:-?}, scan ${scan:-?}); $(elapsed)s elapsed"

[[ -n $data_pid ]] && wait "$data_pid"
[[ -d .gpu/data/cifar-10-batches-py ]] || { echo "gpu.sh: no data (.gpu/console/data.txt)"; exit 1; }

deadline=$((budget - PACK_SECONDS))
declare -A pids=()
queue=($tasks)
fraction=$(python3 -c "print(round(0.9 / $JOBS, 3))")
while ((${#queue[@]} || ${#pids[@]})); do
    for t in "${!pids[@]}"; do
        if ! kill -0 "${pids[$t]}" 2>/dev/null; then
            wait "${pids[$t]}"
            echo "gpu.sh: task $t exited with status $? at $(elapsed)s"
            unset "pids[$t]"
        fi
    done
    while ((${#queue[@]} && ${#pids[@]} < JOBS && SECONDS < deadline - START_SECONDS)); do
        t=${queue[0]}
        queue=("${queue[@]:1}")
        # shellcheck disable=SC2086  # TRAIN_ARGS: extra train.py arguments, word-split
        XLA_PYTHON_CLIENT_MEM_FRACTION=$fraction python3 train.py --task "$t" "${grid[@]}" \
            --loop "$loop" --data-dir .gpu/data ${TRAIN_ARGS:-} >>".gpu/console/task$t.txt" 2>&1 &
        pids[$t]=$!
        echo "gpu.sh: task $t started (pid $!) at $(elapsed)s"
    done
    if ((${#queue[@]} && !${#pids[@]})) && ((SECONDS >= deadline - START_SECONDS)); then
        echo "gpu.sh: too little time left to start tasks ${queue[*]}"
        break
    fi
    if ((SECONDS >= deadline)); then
        echo "gpu.sh: deadline: SIGUSR1 to tasks ${!pids[*]}"
        for t in "${!pids[@]}"; do kill -USR1 "${pids[$t]}" 2>/dev/null; done
        for t in "${!pids[@]}"; do wait "${pids[$t]}"; echo "gpu.sh: task $t exited with status $?"; done
        break
    fi
    ((${#queue[@]} || ${#pids[@]})) && sleep 2
done

for f in .gpu/console/task*.txt; do echo "== $f"; grep -v "Warning\|warn(" "$f" | tail -n 4; done
cp .gpu/bench.txt "$out/" 2>/dev/null
tar czf .gpu/runs.tgz models logs .gpu/console && split -b 15M -d .gpu/runs.tgz "$out/runs.tgz.part-"
ls -la "$out"
echo "gpu.sh: done at $(elapsed)s"
