"""Run a profile's grid on this machine, then reproduce.py and plot.py: the local runner.

    python sweep.py --profile quick                 # every entry, then results and figures
    python sweep.py --profile quick --tasks "0 3"   # some entries (indices of train.py --grid)
    python sweep.py --jobs 2 [train.py options]     # options reach every entry's train.py
    python sweep.py --profile quick --seeds "1 2 3" # the grid with other seeds
    python sweep.py --profile quick --seeds "1 2 3" --loop scan   # JAX: the seeds of an entry
                                                    # in one process, a pack (--no-pack: not)
    python train.py --profile quick                 # the same (train.py hands over to this file)
    bash train.sh [args]                            # the same, where there is no SLURM
    python train.py --time-limit 2h30m              # the paper's grid until then, all resumable

Each grid entry runs as its own `python train.py --task I --profile P [options]`, JOBS
at a time (default: one per core on a CPU, one with a GPU), in queue_order: the runs with a
checkpoint first (the nearest to their end first), then seed by seed, the smallest batches
first (they take longest), BN beside GN; their output is relayed line by line. CIFAR-10 is looked for (and, in
the Keras cache, fetched) once before any entry starts: without it the sweep says where it
looked and what to do, once, and exits with status 1. A failed entry does not stop the
others; the failures are listed at the end and the exit status is 1. Where a run would
train on JAX's scan loop (KERAS_BACKEND=jax, with --loop scan, or a GPU), the entries that
differ only in seed train as one process, a pack (train.py --pack; its members write
their solo runs' files); --no-pack runs every entry alone. SIGINT (Ctrl-C),
SIGTERM or SIGUSR1 asks every running entry to checkpoint (SIGUSR1, at the end of its
current compiled call) and the sweep exits with status 75 (signals.PREEMPTED); the same
command resumes. --time-limit does the same when its time has passed (a workstation
overnight, an allocation's wall clock; leave a few minutes for the checkpoints), but exits
with status 0 and one line: what each run trained in this call. When every entry has finished: reproduce.py writes the profile's
results file and plot.py its figures (recipe.profile_paths: results.csv, plot.png and
curves.png for the paper's profile; results/P/results.csv, plot.png, curves.png otherwise,
and the figure of the profile's study where it has one).

On a SLURM cluster the grid runs as an array job instead (sbatch train.sh), one entry per
array task; gpu.sh runs its next runs on one GPU held for a limited time.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np

from gnrepro import cifar10
from gnrepro import recipe, signals

HERE = Path(__file__).resolve().parent.parent   # the repository: train.py, reproduce.py, plot.py


def forwarded(args):
    """The arguments that a grid entry's own process needs to run as this one would."""
    out = ["--profile", args.profile]
    if args.seeds:
        out += ["--seeds", " ".join(map(str, args.seeds))]
    for name in ("epochs", "workers", "train_images", "test_images", "data_dir",
                 "models_dir", "logs_dir", "threads", "devices", "loop", "unroll",
                 "moving_statistics"):
        if getattr(args, name, None) is not None:
            out += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    return out + [f"--{f.replace('_', '-')}" for f in ("force", "mixed_precision", "bfloat16")
                  if getattr(args, f, False)]


def packing(args):
    """Whether entries that differ only in seed train as packs: on JAX's scan loop, unless
    --no-pack (packs anywhere else would train their seeds one after another, in one
    process: fewer runs at once for nothing)."""
    if getattr(args, "no_pack", False) or keras_backend() != "jax":
        return False
    return args.loop == "scan" or (args.loop == "auto" and has_gpu())


def keras_backend():
    """The Keras backend the entries will run on, read as Keras reads it ($KERAS_BACKEND, else
    the keras.json of $KERAS_HOME or ~/.keras, else TensorFlow) without starting Keras here."""
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"]
    home = Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras")
    try:
        return json.loads((home / "keras.json").read_text()).get("backend", "tensorflow")
    except (OSError, ValueError):
        return "tensorflow"


def queue(profile, seeds=None, tasks=None, pack=True, pack_max_n=None):
    """(train.py arguments, run names) per process, the longest first (the fewest images a
    step: N = 2 takes 16 times the steps of N = 32; then the bigger pack): gpu.sh's queue.
    pack_max_n: only entries of at most that many images per worker N train as packs (a
    pack of 3 at N = 32 was 0.32 times as fast as one run alone on an H200, at N = 2 1.32
    times: docs/gpu.md)."""
    entries = recipe.grid(profile, seeds)
    tasks = list(range(len(entries))) if tasks is None else list(tasks)
    groups = []   # (tasks, whether they train as a pack)
    for g in recipe.packs(entries, tasks) if pack else [[t] for t in tasks]:
        if pack and (pack_max_n is None or entries[g[0]].batch_size <= pack_max_n):
            groups.append((g, True))
        else:
            groups += [([t], False) for t in g]
    groups.sort(key=lambda g: (entries[g[0][0]].batch_size * entries[g[0][0]].workers,
                               -len(g[0])))
    return [(recipe.pack_arguments(profile, entries, g) if as_pack else ["--task", str(g[0])],
             [entries[t].name for t in g]) for g, as_pack in groups]


def print_queue(profile, seeds="", tasks="", pack="1", pending="", pack_max_n=""):
    """gpu.sh's queue, one process a line: TASK SEEDS NAME... (SEEDS '-': a solo run, TASK in
    the grid of the profile's or SEEDS' seeds; else comma-separated, a pack, TASK in the grid
    of those). No tasks and `pending`: the entries without a finished model in the profile's
    models folder (the committed paper-scale runs; a record without its model is retrained),
    less those another profile provides
    (recipe.provider: that profile's queue trains them, once). pack_max_n: packs only of
    entries with at most that many images per worker (the others alone)."""
    if profile not in recipe.PROFILES:
        sys.exit(f"gpu.sh: no profile {profile!r}: one of {list(recipe.PROFILES)}")
    seeds = recipe._ints(seeds) or None
    tasks = recipe._ints(tasks) if tasks.strip() else None
    if tasks is None and pending:
        models = Path(recipe.profile_paths(profile)["models_dir"])
        tasks = [i for i, c in enumerate(recipe.grid(profile, seeds))
                 if not (models / f"{c.name}.keras").exists() and recipe.provider(c) == profile]
    pack_max_n = int(pack_max_n) if str(pack_max_n).strip() else None
    for args, names in queue(profile, seeds, tasks, pack not in ("0", ""), pack_max_n):
        pack_seeds = args[3].replace(" ", ",") if "--pack" in args else "-"
        print(args[1], pack_seeds, *names)


def has_gpu():
    """Whether an NVIDIA GPU is visible, asked without starting TensorFlow or JAX here (they
    would take the GPU's memory for this process, away from the runs it starts)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1") or not shutil.which("nvidia-smi"):
        return False
    found = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    return found.returncode == 0 and "GPU" in found.stdout


def default_jobs(threads):
    # One single-threaded run per core on a CPU; one at a time where a GPU is to be shared.
    if not threads or has_gpu():
        return 1
    return max(1, (os.cpu_count() or 1) // threads)


def _relay(proc):
    for line in proc.stdout:
        print(line, end="", flush=True)


def run_entries(commands, jobs, stop, label="sweep"):
    """Run {task: argv} as subprocesses, `jobs` at a time, in the dict's order; an exit status:
    0, 1 if any failed (the others still run), signals.PREEMPTED once `stop` is requested
    (each running one gets SIGUSR1, checkpoints and exits; no new one starts)."""
    order, running, failed, signalled = list(commands), [], [], set()
    while order or running:
        while order and len(running) < jobs and not stop.requested:
            task = order.pop(0)
            # Its own process group: a Ctrl-C on the terminal reaches this runner alone,
            # which then asks each run for a checkpoint instead of interrupting it. SIGUSR1
            # blocked (exec keeps the mask) until the run's handler is in (StopOnSignal): a
            # run started just before the time limit checkpoints instead of dying of it.
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
            try:
                proc = subprocess.Popen(commands[task], stdout=subprocess.PIPE, text=True,
                                        stderr=subprocess.STDOUT, process_group=0)
            finally:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})
            relay = threading.Thread(target=_relay, args=(proc,), daemon=True)
            relay.start()
            running.append((task, proc, relay))
        if stop.requested:
            order = []
            for task, proc, _ in running:
                if task not in signalled and proc.poll() is None:
                    proc.send_signal(signal.SIGUSR1)   # it checkpoints, exits with PREEMPTED
                    signalled.add(task)
        time.sleep(0.2)
        for entry in [r for r in running if r[1].poll() is not None]:
            running.remove(entry)
            entry[2].join()
            if entry[1].returncode not in (0, signals.PREEMPTED if stop.requested else 0):
                failed.append((entry[0], entry[1].returncode))
    for task, code in failed:
        print(f"{label}: grid entry {task} failed (exit status {code}; see its output above)",
              file=sys.stderr, flush=True)
    if stop.requested:
        print(f"{label}: stopped by {stop.requested}; run the same command again to resume",
              flush=True)
        return signals.PREEMPTED
    return 1 if failed else 0


def figures(profile, paths):
    """plot.py's arguments for the figures of a profile's report (sweep.py runs them)."""
    study, scale = recipe.PROFILES[profile]
    # The paper's statistic is the median of the final 5 of 100 epochs; in a run of a few
    # epochs those 5 include its first ones, so a reduced scale plots the final error. (The
    # paper's scale leaves epochs None, the schedule's length: its profile's Config says it.)
    long_enough = recipe.base_config(profile).epochs >= recipe.STATISTIC_EPOCHS
    metric = [] if long_enough else ["--metric", "test_error"]
    results = ["--results", paths["results"]]
    if study == "figure1":
        return [[*results, "--out", paths["plot"], *metric],
                ["--curves", "--models-dir", paths["models_dir"], "--out", paths["curves"]]]
    if study == "he":      # the control: its runs' curves (its error is a table in the README)
        return [["--curves", "--models-dir", paths["models_dir"], "--out", paths["plot"]]]
    if study == "norms":   # Figure 4: error curves (the run records of the results' rows), Table 1
        return [["--study", "norms", *results, "--out", paths["plot"], *metric]]
    return [["--study", study, *results, "--out", paths["plot"], *metric]]


def report(args, paths):
    """reproduce.py, then plot.py's figures for this profile: (exit status, files written)."""
    data = ["--data-dir", args.data_dir] if args.data_dir else []
    label = ["--label", args.label] if args.label else []
    plots = figures(args.profile, paths)
    # The profile's own folder and the runs it shares with others, unless its files are the
    # caller's own (--models-dir: that folder alone).
    models = (["--models-dir", args.models_dir] if args.models_dir else ["--profile", args.profile])
    commands = [["reproduce.py", *models, "--out", paths["results"], *data]]
    commands += [["plot.py", *figure, *label] for figure in plots]
    for cmd in commands:
        code = subprocess.run([sys.executable, str(HERE / cmd[0]), *map(str, cmd[1:])]).returncode
        if code:
            return code, []
    return 0, [paths["results"], *(f[f.index("--out") + 1] for f in plots)]


def run_files(args, entry):
    """entry's run files (runfiles.Paths): where the profile that provides it keeps them,
    as train.py --task finds them, unless --models-dir / --logs-dir say otherwise."""
    from gnrepro import runfiles
    profile = args.profile if args.models_dir or args.logs_dir else recipe.provider(entry)
    paths = recipe.profile_paths(profile, args)
    return runfiles.Paths(paths["models_dir"], paths["logs_dir"], entry.name)


def run_state(args, entry):
    """('finished', None), ('checkpointed', (epochs done, epochs, steps into the next)) or
    ('new', None): where entry's run stands, read from its files."""
    files = run_files(args, entry)
    if files.model.exists() and files.record.exists():
        return "finished", None
    try:
        with np.load(files.checkpoint) as z:
            state = json.loads(str(z["state"]))
        return "checkpointed", (state["epoch"], state["config"]["epochs"], state["step"])
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile):
        return "new", None   # (a bad checkpoint: train.py sets it aside and starts over)


def queue_order(args, entries, tasks):
    """The order a local sweep runs tasks in: the runs with a checkpoint first, the nearest
    to their end first (what was begun is finished before more is begun); then seed by seed,
    so that each seed's grid is whole as early as it can be; in a seed the smallest batches
    first (their steps are the slowest), BN beside GN (the grid's order)."""
    def key(i):
        state, where = run_state(args, entries[i])
        left = where[1] - where[0] if state == "checkpointed" else 0
        return (state != "checkpointed", left, entries[i].seed, entries[i].batch_size)
    return sorted(tasks, key=key)


def time_limit_summary(args, entries, tasks, before):
    """One line: what the runs of tasks did in this call, when its time limit ended it."""
    done, stopped, untouched = [], [], 0
    for i in tasks:
        state, where = run_state(args, entries[i])
        name = entries[i].name
        if state == "finished" and before[i][0] != "finished":
            done.append(name)
        elif state == "checkpointed" and where != before[i][1]:
            begun = before[i][1][0] if before[i][1] else 0
            stopped.append(f"{name} {begun}->{where[0]}/{where[1]} epochs"
                           + (f" (+{where[2]} steps)" if where[2] else ""))
        elif state != "finished":
            untouched += 1
    parts = [f"finished {', '.join(done)}" if done else "none finished",
             f"checkpointed {', '.join(stopped)}" if stopped else "none checkpointed",
             f"{untouched} of {len(tasks)} not trained in this call"]
    return (f"profile {args.profile}: time limit {recipe.format_duration(args.time_limit)} "
            f"reached: {'; '.join(parts)}; the same command resumes")


def sweep(args, stop):
    """Every entry of args.tasks (default: the whole grid) of args.profile, then the report
    (with args.time_limit: until then, every run then checkpointed, a summary, status 0)."""
    start = time.perf_counter()
    entries = recipe.grid(args.profile, args.seeds)
    tasks = args.tasks if args.tasks is not None else list(range(len(entries)))
    tasks = queue_order(args, entries, tasks)
    before = {i: run_state(args, entries[i]) for i in tasks}
    jobs = args.jobs or default_jobs(args.threads)
    cifar10.require(args.data_dir)   # once, here: not once per entry, with a traceback each
    script = [sys.executable, "-u", str(HERE / "train.py")]
    if packing(args):
        groups = recipe.packs(entries, tasks)
        print(f"profile {args.profile}: {len(tasks)} runs in {len(groups)} packs (one process "
              f"each; --no-pack: one per run), {jobs} at a time", flush=True)
        # (pack_arguments' --seeds comes after forwarded's, so it is the one train.py reads)
        commands = {"+".join(map(str, g)): [*script, *forwarded(args),
                                            *recipe.pack_arguments(args.profile, entries, g)]
                    for g in groups}
    else:
        print(f"profile {args.profile}: {len(tasks)} runs, {jobs} at a time", flush=True)
        commands = {t: [*script, "--task", str(t), *forwarded(args)] for t in tasks}
    limit = args.time_limit and threading.Timer(args.time_limit, stop_at_limit, (stop, args))
    if limit:
        limit.daemon = True
        limit.start()
    code = run_entries(commands, jobs, stop, label=f"profile {args.profile}")
    if limit:
        limit.cancel()
    if code == signals.PREEMPTED and stop.requested == LIMIT:
        print(time_limit_summary(args, entries, tasks, before), flush=True)
        return 0
    if code:
        return code
    paths = recipe.profile_paths(args.profile, args)
    code, outputs = report(args, paths)
    if code == 0:
        print(f"profile {args.profile}: done in {(time.perf_counter() - start) / 60:.1f} min: "
              f"{', '.join(map(str, outputs))}", flush=True)
    return code


LIMIT = "the time limit"   # stop.requested once the sweep's --time-limit has passed


def stop_at_limit(stop, args):
    if not stop.requested:   # (a signal that came first decides the exit status)
        print(f"profile {args.profile}: time limit {recipe.format_duration(args.time_limit)} "
              f"reached: every running run checkpoints", flush=True)
        stop.requested = LIMIT


SCALE_OPTIONS = ("epochs", "workers", "train_images", "test_images", "moving_statistics")
OWN_FILES = ("models_dir", "results", "plot")


def main(argv=None, stop=None):
    """train.py's command line (one source of its options: recipe.py), for a whole grid."""
    p, args = recipe.parse_args(argv)
    args.profile = args.profile or "default"
    singles = [f"--{k.replace('_', '-')}" for k in ("task", "norm", "batch_size", "seed", "groups",
                                                    "channels_per_group")
               if getattr(args, k) is not None]
    if singles:
        p.error(f"{' '.join(singles)}: a sweep runs every entry of the grid as it is defined; "
                f"for one run use python train.py (e.g. --task I)")
    if args.pack:
        p.error("--pack packs one run's seeds (python train.py --norm ... --pack); a sweep packs "
                "its grid's entries itself where they train on JAX's scan loop (--no-pack: not)")
    n = len(recipe.grid(args.profile, args.seeds))
    outside = [t for t in args.tasks or [] if not 0 <= t < n]
    if outside:
        p.error(f"--tasks {' '.join(map(str, outside))}: outside the {args.profile} grid "
                f"(0-{n - 1}); see python train.py --grid --profile {args.profile}")
    scale = [f"--{k.replace('_', '-')}" for k in SCALE_OPTIONS if getattr(args, k) is not None]
    default = [f"--{k.replace('_', '-')}" for k in OWN_FILES if getattr(args, k) is None]
    if scale and default:
        paths = recipe.profile_paths(args.profile)
        p.error(f"{' '.join(scale)} changes the {args.profile} profile's scale: give "
                f"{' '.join(default)} of your own too, so that its files "
                f"({', '.join(paths[k] for k in OWN_FILES)}) are not replaced")
    if stop is None:
        with signals.StopOnSignal(signals.SWEEP_SIGNALS) as stop:
            # train.py hands a whole profile over with these blocked (train.hand_over): one
            # that came meanwhile is delivered now, to the handler just installed.
            signal.pthread_sigmask(signal.SIG_UNBLOCK, signals.SWEEP_SIGNALS)
            return sweep(args, stop)
    return sweep(args, stop)


if __name__ == "__main__":
    signals.exit_with(main, signals.SWEEP_SIGNALS)
