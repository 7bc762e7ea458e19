#!/usr/bin/env bash
# The paper-scale sweep on a borrowed GPU machine that has JAX but no TensorFlow or Keras
# (the `device` tool of this workplace; any such machine will do).
#
#   bash gpu.sh prepare [../shared/data]   # here: fill .gpu/ (wheels, the JPEG copy's npz)
#   TRAIN_GIT_COMMIT=$(git rev-parse HEAD) bash gpu.sh SECONDS [TASK ...]   # there, one call
#                 # default tasks: the default grid's entries without a run record in models/
#   PROFILE=norms ... bash gpu.sh SECONDS   # another profile's grid (models/norms/, ...)
#   SEEDS="4 5" ... bash gpu.sh SECONDS     # the grid with other seeds (train.py --seeds)
#   PACK=0 ... bash gpu.sh SECONDS          # every run in a process of its own (no packs)
#   bash gpu.sh unpack FOLDER               # here, after the call: its runs.tgz.part-* into
#                                           #   models/ and logs/, then commit them (README)
#
# 1. installs the wheels carried in .gpu/wheels/ (keras, optree, namex) into .gpu/site/
#    where Keras is missing;
# 2. writes CIFAR-10 (the JPEG copy's .gpu/cifar10-jpeg.npz, in the official folder layout)
#    into .gpu/data/, in the background;
# 3. first call only (no .gpu/bench.txt yet): bench.py pack, at most BENCH_SECONDS: a pack
#    of 3 against one run at N = 2, W = 8, the scan unrolled 4 steps or not, without and
#    with command buffers (CB_FLAGS); the cheapest pack step sets --unroll and XLA_FLAGS
#    (UNROLL=k, CB=0/1 override it; a bench.txt with `bench.py loop` rows of fit faster
#    than scan at N = 2 makes the sweep train on fit);
# 4. trains the tasks as packs (the seeds of a configuration in one process, train.py
#    --pack: one compiled program; sweep.queue), JOBS processes at a time (under CUDA MPS
#    where the machine has it), the longest first (N = 2 takes 16 times the steps of
#    N = 32), each with its own share of GPU memory; SECONDS after the start (less a margin
#    to pack) every run still going gets SIGUSR1, checkpoints and exits;
# 5. packs models/ (records, models, checkpoints) and logs/ into $OUT/runs.tgz.part-*
#    (15 MB each), with the console log $OUT/gpu.log.
# Calling it again on the same machine resumes the unfinished runs from their checkpoints; so
# does a call on a fresh machine with the checkpoints committed (models/checkpoints/, see
# `unpack`): no run a loan started is lost. SIGUSR1 or SIGTERM to gpu.sh: the deadline is now.
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

if [[ ${1:-} == unpack ]]; then
    # Here, after a call: what it packed, into models/ and logs/. A finished run's checkpoint
    # (committed by an earlier loan) goes; an unfinished one's is the newer, to be committed.
    from=${2:?usage: bash gpu.sh unpack FOLDER  (the folder with runs.tgz.part-*)}
    compgen -G "$from/runs.tgz.part-*" >/dev/null || { echo "gpu.sh unpack: no $from/runs.tgz.part-*"; exit 2; }
    cat "$from"/runs.tgz.part-* | tar xzf - models logs || exit 1
    for ckpt in models/checkpoints/*.npz models/*/checkpoints/*.npz; do
        [[ -f $ckpt ]] || continue
        name=$(basename "$ckpt" .npz)
        dir=$(dirname "$(dirname "$ckpt")")
        if [[ -f $dir/$name.json && -f $dir/$name.keras ]]; then
            rm "$ckpt"
            echo "gpu.sh unpack: $name finished; removed $ckpt"
        fi
    done
    echo "gpu.sh unpack: done; commit models/ and logs/ (git status --short models logs)"
    exit 0
fi

budget=${1:?usage: bash gpu.sh SECONDS [TASK ...]  |  bash gpu.sh prepare [SHARED_DATA_DIR]  |  bash gpu.sh unpack FOLDER}
shift
JOBS=${JOBS:-4}
BENCH_SECONDS=${BENCH_SECONDS:-120}
PACK_SECONDS=${PACK_SECONDS:-45}
START_SECONDS=${START_SECONDS:-60}   # no run starts with less than this left before the deadline
out=${OUT:-.gpu/out}
mkdir -p "$out" .gpu/console
exec > >(tee -a "$out/gpu.log") 2>&1

elapsed() { echo $((SECONDS)); }
echo "gpu.sh: $(date '+%F %T'), budget ${budget}s, $JOBS processes at a time"
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
# paper-scale runs), less those another profile provides (its queue has them); as packs
# (PACK=1, the default) or alone, the longest first.
PROFILE=${PROFILE:-default}
grid=(--profile "$PROFILE" ${SEEDS:+--seeds "$SEEDS"})   # the same for --grid and every --task
# One line per process, the longest first: TASK SEEDS NAME... (sweep.print_queue: the
# given tasks, else the grid's entries without a run record in the profile's models folder).
lines=$(python3 -c "import sys; from gnrepro import sweep; sweep.print_queue(*sys.argv[1:])" "$PROFILE" \
    "${SEEDS:-}" "$*" "${PACK:-1}" pending) || exit 2
echo "gpu.sh: profile $PROFILE, $(awk 'NF' <<<"$lines" | wc -l) processes queued"
mapfile -t queue < <(awk 'NF' <<<"$lines")
for line in "${queue[@]}"; do echo "gpu.sh: queued ${line#* * }"; done

data_pid=""
if [[ ! -d .gpu/data/cifar-10-batches-py ]]; then
    python3 .gpu/cifar10_jpeg.py .gpu/data.tmp >.gpu/console/data.txt 2>&1 &&
        mv .gpu/data.tmp .gpu/data &
    data_pid=$!
fi

loop=scan
CB_FLAGS=${CB_FLAGS:---xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE}
if [[ ! -f .gpu/bench.txt ]]; then
    # The whole GPU for the benchmark (one process at a time), cut off after BENCH_SECONDS:
    # a pack of 3 against one run at N = 2 (the longest runs), the scan's body unrolled or
    # not, without and with command buffers (CUDA graphs) for the loop (CB_FLAGS: a crash
    # there, as openxla#35760 reported, only loses those rows). (The scan loop was 1.68x
    # fit at N = 2 here, README: packs need it; the fit-vs-scan benchmark is `bench.py loop`.)
    half=$((BENCH_SECONDS / 2))
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 timeout "$half" python3 bench.py pack --norms gn \
        --batch-sizes 2 --pack 3 --variants float32 unroll4 2>&1 | tee .gpu/bench.txt
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 timeout "$half" python3 bench.py pack --norms gn \
        --batch-sizes 2 --pack 3 --variants float32 unroll4 --xla-flags "$CB_FLAGS" 2>&1 |
        sed 's/^gn /gn+cb /' | tee -a .gpu/bench.txt
fi
# The step that the benchmark found cheapest for a pack at N = 2 (rows: norm N W variant
# solo-img/s solo-ms pack-img/s pack-ms ratio compile-s), unless UNROLL / CB say otherwise.
best=$(awk 'NF == 10 && ($1 == "gn" || $1 == "gn+cb") && $2 == 2 {print $8, $1, $4}' \
    .gpu/bench.txt | sort -n | head -n 1)
read -r best_ms best_cb best_variant <<<"$best"
unroll=${UNROLL:-$([[ $best_variant == unroll4 ]] && echo 4 || echo 1)}
if [[ ${CB:-$([[ $best_cb == gn+cb ]] && echo 1 || echo 0)} == 1 ]]; then
    export XLA_FLAGS="${XLA_FLAGS:-} $CB_FLAGS"
fi
echo "gpu.sh: step: --unroll $unroll, XLA_FLAGS='${XLA_FLAGS:-}' (the pack of 3 at N=2: ${best_ms:-?} ms a step)"
# The faster loop at N = 2 (where dispatch matters most) trains the sweep.
fit=$(awk '$1 == "fit" && $2 == "gn" && $3 == 2 && $5 == "float32" {print $6}' .gpu/bench.txt | head -n 1)
scan=$(awk '$1 == "scan" && $2 == "gn" && $3 == 2 && $5 == "float32" {print $6}' .gpu/bench.txt | head -n 1)
if [[ -n $fit && -n $scan ]] && ((fit > scan)); then loop=fit; fi
echo "gpu.sh: sweep loop $loop (gn N=2 img/s: fit ${fit:-?}, scan ${scan:-?}); $(elapsed)s elapsed"

[[ -n $data_pid ]] && wait "$data_pid"
[[ -d .gpu/data/cifar-10-batches-py ]] || { echo "gpu.sh: no data (.gpu/console/data.txt)"; exit 1; }

# Several processes at once: under CUDA MPS their kernels run side by side (without it they
# take turns on the GPU); checked with a tiny JAX program before the runs rely on it.
mps=""
if ((JOBS > 1)) && [[ ${MPS:-1} != 0 ]] && command -v nvidia-cuda-mps-control >/dev/null; then
    export CUDA_MPS_PIPE_DIRECTORY=$PWD/.gpu/mps/pipe CUDA_MPS_LOG_DIRECTORY=$PWD/.gpu/mps/log
    mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
    if nvidia-cuda-mps-control -d && XLA_PYTHON_CLIENT_MEM_FRACTION=0.05 timeout 60 \
        python3 -c 'import jax.numpy as j; j.ones(8).sum().block_until_ready()' >/dev/null 2>&1; then
        mps=1
        echo "gpu.sh: CUDA MPS on: $JOBS processes share the GPU at once"
    else
        echo quit | nvidia-cuda-mps-control 2>/dev/null
        unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
        echo "gpu.sh: CUDA MPS did not start (.gpu/mps/log): the processes take turns on the GPU"
    fi
elif ((JOBS > 1)); then
    echo "gpu.sh: no CUDA MPS here (nvidia-cuda-mps-control${MPS:+, MPS=$MPS}): the processes take turns on the GPU"
fi

deadline=$((budget - PACK_SECONDS))
# SIGUSR1 (or SIGTERM) to this script: the deadline is now (the runs checkpoint, all is packed).
trap 'echo "gpu.sh: SIGUSR1: the deadline is now"; deadline=$SECONDS' USR1
trap 'echo "gpu.sh: SIGTERM: the deadline is now"; deadline=$SECONDS' TERM
declare -A pids=()
fraction=$(python3 -c "print(round(0.9 / $JOBS, 3))")
while ((${#queue[@]} || ${#pids[@]})); do
    for t in "${!pids[@]}"; do
        if ! kill -0 "${pids[$t]}" 2>/dev/null; then
            wait "${pids[$t]}"
            echo "gpu.sh: $t exited with status $? at $(elapsed)s"
            unset "pids[$t]"
        fi
    done
    while ((${#queue[@]} && ${#pids[@]} < JOBS && SECONDS < deadline - START_SECONDS)); do
        read -r task seeds names <<<"${queue[0]}"
        queue=("${queue[@]:1}")
        t=${names// /+}   # the process's label: its runs' names
        args=(--task "$task" "${grid[@]}")
        [[ $seeds == - ]] || args+=(--seeds "${seeds//,/ }" --pack)   # after grid's --seeds
        # shellcheck disable=SC2086  # TRAIN_ARGS: extra train.py arguments, word-split
        XLA_PYTHON_CLIENT_MEM_FRACTION=$fraction python3 train.py "${args[@]}" \
            --loop "$loop" --unroll "$unroll" --data-dir .gpu/data ${TRAIN_ARGS:-} \
            >>".gpu/console/$t.txt" 2>&1 &
        pids[$t]=$!
        echo "gpu.sh: $t started (pid $!) at $(elapsed)s"
    done
    if ((${#queue[@]} && !${#pids[@]})) && ((SECONDS >= deadline - START_SECONDS)); then
        echo "gpu.sh: too little time left to start ${queue[*]}"
        break
    fi
    if ((SECONDS >= deadline)); then
        echo "gpu.sh: deadline: SIGUSR1 to ${!pids[*]}"
        for t in "${!pids[@]}"; do kill -USR1 "${pids[$t]}" 2>/dev/null; done
        for t in "${!pids[@]}"; do wait "${pids[$t]}"; echo "gpu.sh: $t exited with status $?"; done
        break
    fi
    ((${#queue[@]} || ${#pids[@]})) && sleep 2
done

[[ -n $mps ]] && echo quit | nvidia-cuda-mps-control
for f in .gpu/console/*.txt; do echo "== $f"; grep -v "Warning\|warn(" "$f" | tail -n 4; done
cp .gpu/bench.txt "$out/" 2>/dev/null
tar czf .gpu/runs.tgz models logs .gpu/console && split -b 15M -d .gpu/runs.tgz "$out/runs.tgz.part-"
ls -la "$out"
echo "gpu.sh: done at $(elapsed)s"
