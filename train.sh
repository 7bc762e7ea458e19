#!/usr/bin/env bash
# The sweep of train.py as a SLURM array job: array task I runs grid entry I, resumably.
#
#   sbatch train.sh                           # every entry of the grid (python train.py --grid)
#   sbatch train.sh --profile norms           # arguments after the script reach train.py
#   sbatch --array=0-3 train.sh --epochs 1    # some entries only
#   bash train.sh [args]                      # no SLURM: the grid on this machine, then
#                                             #   reproduce.py and plot.py (python sweep.py)
#   TASKS="0 3 5" bash train.sh [args]        # no SLURM: these entries
#   bash train.sh --time-limit 2h30m          # no SLURM: until then, then every run checkpoints
#
# Submit from the repository (the log path below is relative to it). Writes what train.py
# writes (models/NAME.keras, models/NAME.json, logs/NAME/; models/P/ and logs/P/ for a
# profile P other than the default) and logs/slurm-JOB_TASK.out.
#
# Preemption and time limits: SLURM sends SIGUSR1 to this script 5 minutes before the time
# limit (--signal below); it passes the signal to train.py, which checkpoints at the end of
# its current compiled call and exits with status 75; this array task then requeues itself and, when
# it runs again, resumes from the checkpoint. SIGTERM (preemption, scancel) also makes
# train.py checkpoint, but the task is not requeued by this script: SLURM requeues preempted
# jobs itself (--requeue), and a cancelled task resumes when it is submitted again. A task
# whose model is finished exits at once, so resubmitting the whole array is always safe.
#
# Packs (KERAS_BACKEND=jax): the array task of a configuration's first seed trains all its
# seeds in one process (train.py --task I --pack: one compiled program on the scan loop,
# the default with a GPU; one after another on fit), each writing its solo run's files; the
# tasks of its other seeds exit at once. PACK=0 (or --no-pack) trains every task alone.
#
# The array below covers the largest grid of train.py's profiles (a test checks it): a task
# beyond a smaller grid (--profile quick: 10 entries) exits at once, doing nothing. To skip
# those idle tasks, submit the grid's own range: sbatch --array=0-9 train.sh --profile quick.
#SBATCH --job-name=gn-sweep
#SBATCH --array=0-29
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=4
#SBATCH --mem=16G
#SBATCH --time=04:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/slurm-%A_%a.out

set -uo pipefail

# sbatch runs a copy of this script from its spool folder: find the repository.
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [[ ! -f $repo/train.py && -n ${SLURM_JOB_ID:-} ]]; then
    # (The first Command=: the job id of an array's last task shows every task.)
    script=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/^ *Command=\([^ ]*\).*/\1/p' | head -n 1)
    repo=$(dirname "${script:-.}")
    [[ -f $repo/train.py ]] || repo=$SLURM_SUBMIT_DIR
fi
cd "$repo" || exit 2
if [[ ! -f train.py ]]; then
    echo "train.sh: no train.py in $repo; run or submit train.sh from the repository" >&2
    exit 2
fi

# ---- Environment: the one place to adapt to a cluster --------------------------------
# Load what the site needs (names vary, see `module avail`), e.g.
#   module load python/3.11 cuda/12.4 cudnn/9.1
# then the repository's virtualenv, if there is one (`make` creates .venv; on a GPU cluster:
# python -m venv .venv && .venv/bin/pip install -r requirements.txt "tensorflow[and-cuda]").
if [[ -f .venv/bin/activate ]]; then
    # shellcheck source=/dev/null
    source .venv/bin/activate
fi
PYTHON=${PYTHON:-python}
# Another Keras backend, with no TensorFlow needed (requirements-jax.txt), e.g.
#   export KERAS_BACKEND=jax            # and a venv with jax[cuda12]: PYTHON=.venv-jax/bin/python
# One task uses one node's GPUs (train.py --devices K: TensorFlow's MirroredStrategy or JAX's
# DataParallel). Untested here: JAX across several nodes would start each process with
# `srun` and call keras.distribution.initialize() (JAX reads SLURM's variables) before
# building the model; this sweep does not need it (ResNet-20 fits one GPU at any N).
# Compute nodes often have no internet: point train.py at a copy of CIFAR-10, e.g.
#   export CIFAR10_DIR=$HOME/data    # holds cifar-10-batches-py/ or cifar-10-python.tar.gz
export PYTHONUNBUFFERED=1
# ---------------------------------------------------------------------------------------

PREEMPTED=75    # train.py's exit status after a checkpoint on a signal (train.PREEMPTED)

child=""        # pid of the running train.py
caught=""       # the last signal this script received
signals=0       # how many it received

on_signal() {
    caught=$1
    signals=$((signals + 1))
    if [[ -n $child ]]; then
        echo "train.sh: SIG$1: passing it to train.py (pid $child), which checkpoints and exits"
        # Ctrl-C reaches only this script (background jobs ignore SIGINT): ask for a checkpoint.
        kill -s "${1/INT/TERM}" "$child" 2>/dev/null
    else
        echo "train.sh: SIG$1: stopping"
    fi
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM
trap 'on_signal INT' INT

# Run train.py --task I [args] in the background, so that a signal reaches this script at
# once (bash runs traps only between commands); return train.py's exit status.
run_task() {
    local status n=$signals
    [[ -n $caught ]] && return "$PREEMPTED"    # asked to stop before it started
    "$PYTHON" train.py --task "$@" &
    child=$!
    ((signals == n)) || kill -s "${caught/INT/TERM}" "$child" 2>/dev/null   # arrived meanwhile
    while true; do
        n=$signals
        wait "$child"
        status=$?
        # wait returns early when a trapped signal arrives: wait again for the checkpoint.
        ((signals == n)) && break
    done
    child=""
    return "$status"
}

# The grid entries (indices) that train.py defines for these arguments (e.g. --profile).
grid_indices() {
    local grid
    grid=$("$PYTHON" train.py --grid "$@") || return
    awk '!/^#/ {print $1}' <<<"$grid"
}

if [[ -n ${SLURM_ARRAY_TASK_ID:-} ]]; then
    task=$SLURM_ARRAY_TASK_ID
    id=${SLURM_ARRAY_JOB_ID}_${task}
    echo "train.sh: array task $id (job $SLURM_JOB_ID) on $(hostname), restart ${SLURM_RESTART_COUNT:-0}, $(date '+%F %T')"
    # The header covers the default grid; a smaller one (--profile quick) leaves tasks idle.
    if indices=$(grid_indices "$@") && ! grep -qx "$task" <<<"$indices"; then
        echo "train.sh: the grid of these arguments has no entry $task; nothing to do"
        exit 0
    fi
    pack=()
    if [[ ${KERAS_BACKEND:-} == jax && ${PACK:-1} != 0 && " $* " != *" --no-pack "* ]]; then
        # Seed-major grid: entry I's pack is led by entry I mod (entries of the first seed).
        leader=$(awk -v task="$task" '!/^#/ {match($0, /--seed [0-9]+/)
                                             s = substr($0, RSTART + 7, RLENGTH - 7)
                                             if (first == "") first = s
                                             if (s == first) n++}
                                      END {print (n ? task % n : "")}' \
            <<<"$("$PYTHON" train.py --grid "$@")")
        if [[ -n $leader && $leader != "$task" ]]; then
            echo "train.sh: grid entry $task trains in the pack of entry $leader (KERAS_BACKEND=jax; PACK=0: alone); nothing to do"
            exit 0
        fi
        pack=(--pack)
    fi
    run_task "$task" "${pack[@]}" "$@"
    status=$?
    if [[ -n $caught ]] && ((status == 128 + $(kill -l "${caught/INT/TERM}"))); then
        # train.py died of the signal passed on: it came in the instant before train.py had
        # installed its handler (interpreter start-up). Every file it writes is written whole
        # or not at all, so its last checkpoint (or finished model) stands: go on from there.
        echo "train.sh: train.py was ended by SIG${caught/INT/TERM} before its handler was installed; its last checkpoint stands"
        status=$PREEMPTED
    fi
    if ((status == PREEMPTED)) && [[ $caught == USR1 ]]; then
        # SLURM ends this run of the task and queues it again (after ~2 minutes, cred_expire).
        if scontrol requeue "$id"; then
            echo "train.sh: requeued $id; it resumes from its checkpoint when it runs again"
            exit 0
        fi
        echo "train.sh: scontrol requeue $id failed; submit the task again to resume" >&2
    elif ((status == PREEMPTED)); then
        echo "train.sh: checkpointed after SIG${caught:-TERM}; not requeueing (SLURM requeues a preempted task itself; submit a cancelled one again to resume)"
    fi
    exit "$status"
fi

# No SLURM: sweep.py, the one local runner of a grid (several entries at a time, a signal
# checkpoints them all, the same command resumes; then reproduce.py and plot.py).
exec "$PYTHON" -m gnrepro.sweep ${TASKS:+--tasks "$TASKS"} "$@"
