"""A run's files: where they go, how they are written, what they record of their origin.

    from gnrepro.runfiles import Paths, atomic_write, write_json
    paths = Paths("models", "logs", "gn_b32_w8_s1")   # .model, .record, .checkpoint, .logs
    atomic_write("results.csv", lambda tmp: df.to_csv(tmp, index=False))

Every file is written to a temporary name in its own folder, flushed to the disk, then
renamed onto the real one, so an interrupted write (a kill, a full disk, a crash) never
leaves half a model, record, checkpoint, CSV or figure in place of a good one (train.py,
reproduce.py and plot.py all write through here).

Faults, and what a run does about them:
- a checkpoint that cannot be read (truncated, corrupted: the zip's CRCs catch flipped
  bytes), or whose arrays do not fit the model: the run says so, naming the file, moves it
  aside to NAME.npz.bad (kept for a post-mortem) and starts over from epoch 1. It never
  trains from it. Each run's checkpoint is read on its own: in a pack of runs, one bad
  checkpoint restarts that run only. A checkpoint of another configuration is refused.
- a write that fails (a full disk): the error is raised, the previous file is intact and
  no temporary is left.
- two processes given the same run at once: the run's lock (RunLock, flock on
  models/checkpoints/NAME.lock, released by the kernel when its holder dies) goes to one;
  the other says which process holds it and exits with status BUSY (73).
Needs NumPy only (and Keras for provenance()).
"""
import errno
import fcntl
import json
import os
import platform
import subprocess
import sys
import time
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import numpy as np

BUSY = 73   # exit status of a run whose lock another process holds (EX_CANTCREAT)


class Paths:
    """The files of run NAME: models/NAME.keras (the final model), models/NAME.json (its
    run record), models/checkpoints/NAME.npz (while it runs), logs/NAME/ (TensorBoard)."""

    def __init__(self, models_dir, logs_dir, name):
        self.models, self.name = Path(models_dir), name
        self.model = self.models / f"{name}.keras"
        self.record = self.models / f"{name}.json"
        self.checkpoint = self.models / "checkpoints" / f"{name}.npz"
        self.lock = self.models / "checkpoints" / f"{name}.lock"
        self.logs = Path(logs_dir) / name

    def temporaries(self):
        """Temporaries of this run's files that a killed writer left (atomic_write's names)."""
        return [p for folder in (self.models, self.checkpoint.parent)
                for p in folder.glob(f".{self.name}.*.tmp.*")]


def atomic_write(path, write):
    """Call write(tmp_path), flush it to the disk, then rename it onto path (same folder, so
    atomic): path is the old file or the whole new one, even after a crash."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)   # the rename itself
    finally:
        tmp.unlink(missing_ok=True)


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:   # some file systems cannot sync a folder: the data is synced anyway
        if e.errno not in (errno.EINVAL, errno.EBADF, errno.EISDIR):
            raise
    finally:
        os.close(fd)


def write_json(path, obj):
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=1) + "\n"))


def save_checkpoint(paths, model, state):
    """Weights, optimizer variables and the run's state (a JSON-able dict) in one .npz."""
    arrays = {f"w{i}": w for i, w in enumerate(model.get_weights())}
    arrays |= {f"o{i}": np.asarray(v) for i, v in enumerate(model.optimizer.variables)}
    arrays["state"] = np.array(json.dumps(state))

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    atomic_write(paths.checkpoint, write)


class BadCheckpoint(Exception):
    """A checkpoint that cannot be read, or does not fit the model it is to restore."""


class Saved(NamedTuple):
    """A checkpoint as read: the run's state (a dict: its config, epoch, step, history...),
    the model's weights and the optimizer's variables."""
    state: dict
    weights: list
    variables: list


def read_checkpoint(paths, config, identity=None):
    """The run's checkpoint (Saved), or None without one. One that cannot be read is set aside
    (set_aside) and None returned: the run starts over. config: the run's configuration as a
    dict; a checkpoint of another one is refused. identity(config dict): what must agree (by
    default all of it; train.py's: recipe.run_identity, which knows older versions' keys)."""
    if not paths.checkpoint.exists():
        return None
    try:
        with np.load(paths.checkpoint) as z:   # reads every array: a bad CRC fails here
            state = json.loads(str(z["state"]))
            weights = [z[f"w{i}"] for i in range(sum(k.startswith("w") for k in z.files))]
            variables = [z[f"o{i}"] for i in range(sum(k.startswith("o") for k in z.files))]
        state_config = state["config"]
    except (OSError, EOFError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as e:
        set_aside(paths, f"cannot be read ({type(e).__name__}: {e})")
        return None
    same = identity or (lambda run: run)
    if same(state_config) != same(config):
        raise SystemExit(f"error: {paths.checkpoint} belongs to another configuration "
                         f"({state_config}); rerun with --force to start afresh")
    return Saved(state, weights, variables)


def set_aside(paths, why):
    """Move a bad checkpoint to NAME.npz.bad (replacing an older one), saying so."""
    bad = paths.checkpoint.with_name(paths.checkpoint.name + ".bad")
    os.replace(paths.checkpoint, bad)
    print(f"{paths.name}: checkpoint {paths.checkpoint} {why}; moved to {bad}, the run starts "
          f"over", file=sys.stderr, flush=True)


def restore(paths, model, saved):
    """Assign a Saved checkpoint's weights and optimizer variables to model; its state. One
    whose arrays do not fit the model is set aside before anything is assigned (the model is
    then as built) and None returned: the run starts over."""
    try:
        _check_shapes("weights", saved.weights, model.weights)
        _check_shapes("optimizer variables", saved.variables, model.optimizer.variables)
    except BadCheckpoint as e:
        set_aside(paths, f"does not fit the model ({e})")
        return None
    model.set_weights(saved.weights)
    for v, value in zip(model.optimizer.variables, saved.variables):
        v.assign(value)
    return saved.state


def load_checkpoint(paths, model, config, identity=None):
    """read_checkpoint, then restore: the saved state, or None without a usable checkpoint."""
    saved = read_checkpoint(paths, config, identity)
    return None if saved is None else restore(paths, model, saved)


def _check_shapes(what, arrays, variables):
    if len(arrays) != len(variables):
        raise BadCheckpoint(f"{len(arrays)} {what}, the model has {len(variables)}")
    for i, (a, v) in enumerate(zip(arrays, variables)):
        if tuple(a.shape) != tuple(v.shape):
            raise BadCheckpoint(f"{what} {i} has shape {a.shape}, the model's {tuple(v.shape)}")


class RunLock:
    """The run's lock (flock on paths.lock): one process trains a run at a time. As a context
    manager: `held` is True once taken, False where another process holds it (`holder`
    names it). The kernel drops the lock when its holder dies, even by SIGKILL. Taking it
    removes the temporaries that a killed writer of this run left (Paths.temporaries); the
    lock file is removed on release, so a finished run leaves no file in checkpoints/."""

    def __init__(self, paths):
        self.paths, self.held, self.holder, self.file = paths, False, None, None

    def __enter__(self):
        self.paths.lock.parent.mkdir(parents=True, exist_ok=True)
        while True:
            f = open(self.paths.lock, "a+")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                self.holder = f.read().strip() or "another process"
                f.close()
                return self
            try:   # still the file at that path, not one its last holder removed meanwhile?
                if os.stat(self.paths.lock).st_ino == os.fstat(f.fileno()).st_ino:
                    break
            except FileNotFoundError:
                pass
            f.close()
        self.file, self.held = f, True
        f.truncate(0)
        f.write(f"pid {os.getpid()} on {platform.node()}\n")
        f.flush()
        for tmp in self.paths.temporaries():
            tmp.unlink(missing_ok=True)
        return self

    def __exit__(self, *exc):
        if self.held:
            self.paths.lock.unlink(missing_ok=True)   # before the release: see __enter__
            self.file.close()
            self.held = False


def finished_record(paths, config, identity=None):
    """The run record if this run already finished with this configuration (a dict), else
    None; a finished run of another configuration under the same name is refused (identity:
    as for read_checkpoint)."""
    if not (paths.model.exists() and paths.record.exists()):
        return None
    record = json.loads(paths.record.read_text())
    same = identity or (lambda run: run)
    if same(record.get("config", {}).get("run", {})) != same(config):
        raise SystemExit(f"error: {paths.record} was trained with another configuration "
                         f"({record.get('config', {}).get('run')}); use --force to retrain it, "
                         f"or another --models-dir")
    return record


def claim(cfgs, models_dir, logs_dir, force, stack, identity=None):
    """The runs of cfgs (Configs) still to train here, each with its lock taken (entered on
    stack, an ExitStack): ([(cfg, Paths)], exit status). A finished run is said and skipped
    (force: trained again); one whose lock another process holds is named on stderr. The
    status is BUSY where nothing is left to train here because of such runs, else 0."""
    pending, busy = [], []
    for cfg in cfgs:
        paths = Paths(models_dir, logs_dir, cfg.name)
        if _finished(cfg, paths, force, identity):
            continue
        lock = stack.enter_context(RunLock(paths))   # each run its own
        if not lock.held:
            busy.append(f"{cfg.name}: {lock.holder} is training this run (it holds {paths.lock})")
        elif not _finished(cfg, paths, force, identity):   # (by the process that held the lock)
            pending.append((cfg, paths))
    then = "not here" if pending else f"exiting with status {BUSY}"
    for message in busy:
        print(f"{message}; {then}", file=sys.stderr, flush=True)
    return pending, (BUSY if busy and not pending else 0)


def _finished(cfg, paths, force, identity):
    """Whether cfg's run has finished (said once), unless force retrains it."""
    if force or not finished_record(paths, asdict(cfg), identity):
        return False
    print(f"{cfg.name}: already finished ({paths.model}); --force retrains it", flush=True)
    return True


# What runs write (their checkpoints are committed): not local changes to the code.
OUTPUTS = ("models", "logs", "results", "results.csv", "plot.png", "curves.png")


def git_commit():
    """HEAD (with -dirty for local changes to anything but OUTPUTS), or $TRAIN_GIT_COMMIT where
    the caller says it: on a machine that got a copy of the tree (gpu.sh), whose own .git, if
    any, may name another commit with the copied files as local changes."""
    if os.environ.get("TRAIN_GIT_COMMIT"):
        return os.environ["TRAIN_GIT_COMMIT"]
    repo = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no",
                                "--", ".", *(f":(exclude){p}" for p in OUTPUTS)],
                               capture_output=True, text=True).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def provenance():
    """What a run record says of where it ran: commit, library versions, host, machine (the
    GPU cards' names, else the CPU's model), devices."""
    from gnrepro import backends   # (Keras: imported here, so that plot.py and tests need no Keras)
    return {"git_commit": git_commit(), "versions": backends.versions(), "host": platform.node(),
            "machine": ", ".join(backends.gpu_cards()) or cpu_model(), "cpus": os.cpu_count(),
            "gpus": backends.gpus(), "intra_op_threads": backends.intra_op_threads()}


def cpu_model():
    """The CPU's model name as Linux gives it (e.g. 'AMD EPYC 9B14'), else platform's."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# A run's segments: the stretches of training between its starts and its stops, each with
# where it ran. A run may start on one machine and be resumed on others (a GPU machine, then
# a CPU one); its record lists them all. Positions are [epochs done, steps into the next].

def open_segment(state, loop):
    """Append this session's segment to state["segments"]: where it starts and what it runs
    on. A checkpoint from before segments were kept gets one for what it had trained, marked
    `recorded: false` (its machine is not known here)."""
    segments = state.setdefault("segments", [])
    here = [state["epoch"], state["step"]]
    if not segments and here != [0, 0]:
        segments.append({"start": [0, 0], "end": here, "recorded": False})
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    segments.append({"start": here, "end": here, "started_at": now, "ended_at": now,
                     "loop": loop, **provenance()})


def session_provenance(state):
    """provenance() of the session that finishes the run, as its segment took it when the
    session started: the code it loaded then, even if the checkout has moved on since."""
    segments = state.get("segments") or []
    if not segments or segments[-1].get("recorded") is False:
        return provenance()
    keys = ("git_commit", "versions", "host", "machine", "cpus", "gpus", "intra_op_threads")
    return {k: segments[-1][k] for k in keys}


def close_segment(state):
    """Bring the current segment's end up to where the run stands now."""
    state["segments"][-1].update(end=[state["epoch"], state["step"]],
                                 ended_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
