#!/usr/bin/env bash
# The sweep's next runs on one GPU machine that you hold for a limited time (a cloud spot
# instance, a time-limited notebook, an interactive allocation): train until SECONDS from now,
# stop every run cleanly with a checkpoint, and pack what they wrote, to bring back and resume
# from next time. Runs on Keras' JAX backend (no TensorFlow needed).
#
#   TRAIN_GIT_COMMIT=$(git rev-parse HEAD) bash gpu.sh SECONDS [TASK ...]   # on the GPU machine
#                 # default tasks: the default grid's entries without a finished model in models/
#   PROFILE=norms ... bash gpu.sh SECONDS   # another profile's grid (models/norms/, ...)
#   SEEDS="4 5" ... bash gpu.sh SECONDS     # the grid with other seeds (train.py --seeds)
#   PACK=0 ... bash gpu.sh SECONDS          # every run in a process of its own (no packs)
#   PACK_MAX_N=8 ... bash gpu.sh SECONDS    # packs up to N = 8 (default 2; above, runs alone)
#   DATA_DIR=/scratch/cifar ... bash gpu.sh SECONDS   # CIFAR-10's folder (default: $CIFAR10_DIR,
#                                           #   else the Keras cache, as train.py looks)
#   bash gpu.sh unpack FOLDER               # back home, after the call: its runs.tgz.part-* into
#                                           #   models/ and logs/, then commit them (docs/gpu.md)
#
# Needs python3 with keras and jax (with its CUDA plugin: requirements-jax.txt, jax[cuda12]).
# 1. first call only (no .gpu/bench.txt yet): bench.py pack, at most BENCH_SECONDS: a pack
#    of 3 against one run at N = 2, W = 8, the scan unrolled 4 steps or not, without and
#    with command buffers (CB_FLAGS); the cheapest pack step sets --unroll and XLA_FLAGS
#    (UNROLL=k, CB=0/1 override it; a bench.txt with `bench.py loop` rows of fit faster
#    than scan at N = 2 makes the sweep train on fit);
# 2. trains the tasks as packs (the seeds of a configuration in one process, train.py
#    --pack: one compiled program; sweep.queue), JOBS processes at a time (under CUDA MPS
#    where the machine has it), the longest first (N = 2 takes 16 times the steps of
#    N = 32), each with its own share of GPU memory; SECONDS after the start (less a margin
#    to pack) every run still going gets SIGUSR1, checkpoints and exits;
# 3. packs models/ (records, models, checkpoints) and logs/ into $OUT/runs.tgz.part-*
#    (15 MB each, default OUT .gpu/out), with the console log $OUT/gpu.log.
# Calling it again on the same machine resumes the unfinished runs from their checkpoints; so
# does a call on a fresh machine with the checkpoints committed (models/checkpoints/, see
# `unpack`): no run a call started is lost. SIGUSR1 or SIGTERM to gpu.sh: the deadline is now.
# TRAIN_ARGS="--epochs 1 --train-images 500" adds arguments to every train.py (a rehearsal).
# DATA_DIR that does not exist yet is waited for (data still being copied in).
#
# TRAIN_GIT_COMMIT names the commit in the run records (the copy there may lack .git).
# A later call that carries .gpu again skips the benchmark if .gpu/bench.txt is there.
set -uo pipefail
cd "$(dirname "$0")" || exit 2

if [[ ${1:-} == unpack ]]; then
    # Here, after a call: what it packed, into models/ and logs/. A finished run's checkpoint
    # (committed after an earlier call) goes; an unfinished one's is the newer, to be committed.
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

budget=${1:?usage: bash gpu.sh SECONDS [TASK ...]  |  bash gpu.sh unpack FOLDER}
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
python3 -c 'import jax, keras; print("jax", jax.__version__, jax.devices(), "keras", keras.__version__)' ||
    { echo "gpu.sh: python3 needs keras and jax (pip install -r requirements-jax.txt, with jax[cuda12])"; exit 1; }
DATA_DIR=${DATA_DIR:-${CIFAR10_DIR:-}}

# Default: the grid entries with no finished model in the profile's models folder (the committed
# paper-scale runs), less those another profile provides (its queue has them); as packs
# (PACK=1, the default) or alone, the longest first.
PROFILE=${PROFILE:-default}
grid=(--profile "$PROFILE" ${SEEDS:+--seeds "$SEEDS"})   # the same for --grid and every --task
# One line per process, the longest first: TASK SEEDS NAME... (sweep.print_queue: the
# given tasks, else the grid's entries without a finished model in the profile's models folder).
# Packs only at N <= PACK_MAX_N: on an H200 a pack of 3 was 1.32x one run at N = 2 but 0.32x
# at N = 32 (docs/gpu.md), where runs side by side under MPS do far better.
lines=$(python3 -c "import sys; from gnrepro import sweep; sweep.print_queue(*sys.argv[1:])" "$PROFILE" \
    "${SEEDS:-}" "$*" "${PACK:-1}" pending "${PACK_MAX_N:-2}") || exit 2
echo "gpu.sh: profile $PROFILE, $(awk 'NF' <<<"$lines" | wc -l) processes queued"
mapfile -t queue < <(awk 'NF' <<<"$lines")
for line in "${queue[@]}"; do echo "gpu.sh: queued ${line#* * }"; done

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

data=()
if [[ -n $DATA_DIR ]]; then
    until [[ -d $DATA_DIR/cifar-10-batches-py || -f $DATA_DIR/cifar-10-python.tar.gz ]] ||
        ((SECONDS >= budget - PACK_SECONDS)); do sleep 1; done
    data=(--data-dir "$DATA_DIR")
fi

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
# Each process's share of GPU memory, with room for each one's CUDA context and modules
# (0.9 / 6 left too little: a process failed to load a kernel, CUDA_ERROR_OUT_OF_MEMORY).
fraction=$(python3 -c "print(round(0.75 / $JOBS, 3))")
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
            --loop "$loop" --unroll "$unroll" "${data[@]}" ${TRAIN_ARGS:-} \
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
