"""A run's files: where they go, how they are written, what they record of their origin.

    from runfiles import Paths, atomic_write, write_json
    paths = Paths("models", "logs", "gn_b32_w8_s1")   # .model, .record, .checkpoint, .logs
    atomic_write("results.csv", lambda tmp: df.to_csv(tmp, index=False))

Every file is written to a temporary name in its own folder, then renamed onto the
real one, so an interrupted write never leaves half a model, record, checkpoint, CSV or
figure in place of a good one (train.py, reproduce.py and plot.py all write through here).
Needs NumPy only (and Keras for provenance()).
"""
import json
import os
import platform
import subprocess
from pathlib import Path

import numpy as np


class Paths:
    """The files of run NAME: models/NAME.keras (the final model), models/NAME.json (its
    run record), models/checkpoints/NAME.npz (while it runs), logs/NAME/ (TensorBoard)."""

    def __init__(self, models_dir, logs_dir, name):
        self.models, self.name = Path(models_dir), name
        self.model = self.models / f"{name}.keras"
        self.record = self.models / f"{name}.json"
        self.checkpoint = self.models / "checkpoints" / f"{name}.npz"
        self.logs = Path(logs_dir) / name


def atomic_write(path, write):
    """Call write(tmp_path), then rename tmp_path onto path (same folder, so atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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


def load_checkpoint(paths, model, config, defaults=None):
    """Restore weights and optimizer state; return the saved state, or None without one.
    config: the run's configuration as a dict; a checkpoint of another one is refused
    (defaults: values for keys that a checkpoint written before they existed lacks)."""
    if not paths.checkpoint.exists():
        return None
    with np.load(paths.checkpoint) as z:
        state = json.loads(str(z["state"]))
        if {**(defaults or {}), **state["config"]} != config:
            raise SystemExit(f"error: {paths.checkpoint} belongs to another configuration "
                             f"({state['config']}); rerun with --force to start afresh")
        model.set_weights([z[f"w{i}"] for i in range(len(model.weights))])
        for i, v in enumerate(model.optimizer.variables):
            v.assign(z[f"o{i}"])
    return state


def finished_record(paths, config, defaults=None):
    """The run record if this run already finished with this configuration (a dict), else
    None; a finished run of another configuration under the same name is refused
    (defaults: as for load_checkpoint)."""
    if not (paths.model.exists() and paths.record.exists()):
        return None
    record = json.loads(paths.record.read_text())
    if {**(defaults or {}), **record.get("config", {}).get("run", {})} != config:
        raise SystemExit(f"error: {paths.record} was trained with another configuration "
                         f"({record.get('config', {}).get('run')}); use --force to retrain it, "
                         f"or another --models-dir")
    return record


def git_commit():
    """HEAD (with -dirty for local changes), or $TRAIN_GIT_COMMIT where the caller says it: on
    a machine that got a copy of the tree (gpu.sh), whose own .git, if any, may name another
    commit with the copied files as local changes."""
    if os.environ.get("TRAIN_GIT_COMMIT"):
        return os.environ["TRAIN_GIT_COMMIT"]
    repo = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def provenance():
    """What a run record says of where it ran: commit, library versions, host, devices."""
    import backends   # (Keras: imported here, so that plot.py and tests need no Keras)
    return {"git_commit": git_commit(), "versions": backends.versions(), "host": platform.node(),
            "cpus": os.cpu_count(), "gpus": backends.gpus(),
            "intra_op_threads": backends.intra_op_threads()}
