"""One epoch of training, as train.py's run calls it: through `model.fit` (every backend), or
through JAX's scan loop (backends.ScanLoop: many steps, and several runs of a pack, in one
compiled call). Both train on the same batches (cifar10's draws from the seed and the epoch),
go on from a mid-epoch checkpoint, and stop at the end of the current compiled call once a
stop is requested.

    loop = loops.resolve_loop("auto")                 # "fit", or "scan" on JAX with a GPU
    done = loops.train_epoch(members, data, stop, progress, loop)   # True: the epoch is complete

A Member is one run as the epoch loop holds it (its Config, files, model, state, TensorBoard
writer); a pack is a list of them, trained together on the scan loop (loops.packs).
"""
import time
from dataclasses import replace

import keras
import numpy as np

from gnrepro import backends, cifar10
from gnrepro.recipe import IMAGES_PER_SCAN, STEP_OPTIONS


class Member:
    """One run as the epoch loop holds it: its Config, files (runfiles.Paths), Keras model,
    state (what its checkpoint saves), TensorBoard writer and how its step runs (options)."""

    def __init__(self, cfg, paths, model, state, writer=None, options=None):
        self.cfg, self.paths, self.model, self.state, self.writer = cfg, paths, model, state, writer
        self.options = options or {}   # how the step runs, not what it computes (STEP_OPTIONS)


def resolve_loop(loop, devices=1):
    """The training loop a run uses: "fit" or "scan" (JAX only); "auto": scan on JAX with a
    GPU, fit elsewhere. The scan loop is single-device: on several devices, fit (said once)."""
    if loop == "auto":
        # XLA on a CPU runs a scan's loop body far slower than the same step jitted alone
        # (0.35 s against 0.02 s a step of 8 images here): scan only where there is a GPU.
        loop = "scan" if backends.name() == "jax" and backends.gpus() else "fit"
    if loop == "scan" and backends.name() != "jax":
        raise SystemExit(f"error: --loop scan needs KERAS_BACKEND=jax (this is "
                         f"{backends.name()}); use --loop fit")
    if loop not in ("fit", "scan"):
        raise SystemExit(f"error: --loop should be auto, fit or scan, got {loop!r}")
    if loop == "scan" and devices > 1:
        print(f"note: --loop scan is single-device; on {devices} devices the run uses fit",
              flush=True)
        loop = "fit"
    return loop


def packs(runs, loop):
    """runs ((cfg, paths, runfiles.Saved or None) of one configuration's seeds) in the groups
    that train together, the least advanced first: on the scan loop the runs that stand at
    the same point (epoch, step) of the same configuration, in one compiled program; under
    fit each run alone, one after another."""
    if loop != "scan":
        return [[run] for run in runs]
    groups = {}
    for run in runs:
        state = run[2].state if run[2] else {}
        point = (state.get("epoch", 0), state.get("step", 0))
        groups.setdefault((point, replace(run[0], seed=0)), []).append(run)
    return [groups[key] for key in sorted(groups, key=lambda k: k[0])]


class StepCallback(keras.callbacks.Callback):
    """Counts steps within the epoch, shows a progress bar on a terminal, honours the stop flag.
    metrics: the metrics' state saved at a mid-epoch stop (metric_state), restored as the
    epoch begins, so that the epoch's metrics go on from it as if never stopped."""

    def __init__(self, stop, skip, total, progress, metrics=None):
        super().__init__()
        self.stop, self.skip, self.steps, self.total, self.logs = stop, skip, skip, total, {}
        self.metrics, self.restored = metrics, False
        self.bar = keras.utils.Progbar(total, stateful_metrics=["ce", "acc"]) if progress else None
        if self.bar and skip:
            self.bar.update(skip)

    def on_epoch_begin(self, epoch, logs=None):
        # After fit's reset_metrics (every backend's trainer resets, then calls this).
        if not self.metrics:
            return
        if len(self.model.metrics_variables) < len(self.metrics):
            # TensorFlow on one device builds the compiled metrics in the first step: now.
            self.model.compute_metrics(None, np.zeros(1, "int32"), np.zeros((1, 10), "float32"))
        if len(self.model.metrics_variables) == len(self.metrics):   # else: merged (merge_partial)
            for v, value in zip(self.model.metrics_variables, self.metrics):
                v.assign(np.asarray(value, v.dtype))
            self.restored = True

    def on_train_batch_end(self, batch, logs=None):
        # With steps_per_execution > 1, batch is the last step of the call just made.
        self.steps = min(self.total, self.skip + batch + 1)
        self.logs = {k: float(v) for k, v in (logs or {}).items()}
        if self.bar:
            self.bar.update(self.steps, [(k, self.logs[k]) for k in ("ce", "acc") if k in self.logs])
        if self.stop.requested:
            self.model.stop_training = True


def metric_state(model):
    """The metrics' variables (running totals and counts) as lists, for a checkpoint's state."""
    return [np.asarray(keras.ops.convert_to_numpy(v)).tolist() for v in model.metrics_variables]


def merge_partial(partial, steps, logs):
    """Epoch-so-far training metrics. Where fit restored the metrics' own state saved at a
    mid-epoch stop (logs["restored"]; logs["metrics"]: the state now, for the next stop),
    logs cover the whole epoch, bit for bit as without the stop; otherwise (the scan loop, a
    checkpoint without that state) the part before the stop is merged in, to float rounding."""
    ce, acc = logs.get("ce", float("nan")), logs.get("acc", float("nan"))
    if partial and not logs.get("restored"):
        before = partial["steps"]
        ce = (partial["ce"] * before + ce * (steps - before)) / steps
        acc = (partial["acc"] * before + acc * (steps - before)) / steps
    merged = {"steps": steps, "ce": ce, "acc": acc}
    return merged | ({"metrics": logs["metrics"]} if "metrics" in logs else {})


class Batches(keras.utils.PyDataset):
    """cifar10.TrainBatches as Keras' backend-neutral input (one batch at a time, in order)."""

    def __init__(self, batches):
        super().__init__()
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        return self.batches[i]


def fit_epoch(members, data, stop, progress, total):
    """The rest of the epoch through model.fit (one member); (steps done, [last logs])."""
    (m,) = members
    cfg, state = m.cfg, m.state
    batches = cifar10.TrainBatches(data.padded, data.y_train, cfg.batch_size * cfg.workers,
                                   cfg.seed, state["epoch"], skip_batches=state["step"])
    saved = (state["partial"] or {}).get("metrics")
    callback = StepCallback(stop, state["step"], total, progress, metrics=saved)
    m.model.fit(backends.fit_input(Batches(batches)), epochs=1, verbose=0, shuffle=False,
                callbacks=[callback])
    return callback.steps, [{**callback.logs, "metrics": metric_state(m.model),
                             "restored": callback.restored}]


def scan_loop(models, padded, labels, batch, unroll=1):
    """backends.ScanLoop over models (one, or a pack) with at most IMAGES_PER_SCAN images of
    steps per call, the calls of an epoch as equal as they can be: an epoch's steps then
    take two call lengths at most (two compilations), resumed ones perhaps a third."""
    total = cifar10.steps_per_epoch(len(labels), batch)
    most = max(1, min(total, IMAGES_PER_SCAN // batch))
    calls = -(-total // most)
    return backends.ScanLoop(models, padded, labels, batch, -(-total // calls), unroll=unroll)


def scan_epoch(members, data, stop, progress, total):
    """The rest of the epoch through backends.ScanLoop (JAX), every member at once in one
    compiled program: (steps done, each member's metrics)."""
    first = members[0]
    loop = getattr(first.model, "_scan_loop", None)   # compiled once per pack
    if loop is None:
        loop = first.model._scan_loop = scan_loop(
            [m.model for m in members], data.padded, data.y_train,
            first.cfg.batch_size * first.cfg.workers, first.options.get("unroll", 1))
    bar = keras.utils.Progbar(total, stateful_metrics=["ce", "acc"]) if progress else None
    for m in members:
        m.model.reset_metrics()
    draws = [cifar10.epoch_draws(len(data.y_train), m.cfg.seed, m.state["epoch"]) for m in members]
    steps, logs = loop.run(draws, first.state["step"], total, lambda: bool(stop.requested))
    if bar:
        bar.update(steps, [(k, logs[0][k]) for k in ("ce", "acc") if k in logs[0]])
    return steps, logs


def train_epoch(members, data, stop, progress, loop="fit"):
    """Train (the rest of) epoch state['epoch'] of every member (all at the same step; one
    member under fit); return True if it completed."""
    cfg = members[0].cfg
    batch = cfg.batch_size * cfg.workers
    total = cifar10.steps_per_epoch(len(data.y_train), batch)
    skip = members[0].state["step"]
    start = time.perf_counter()
    steps, logs = (scan_epoch if loop == "scan" else fit_epoch)(members, data, stop, progress,
                                                                  total)
    seconds = time.perf_counter() - start
    for m, member_logs in zip(members, logs):
        state = m.state
        state["train_seconds"] += seconds
        state["train_images"] += (steps - skip) * batch
        state["epoch_seconds"] = state.get("epoch_seconds", 0.0) + seconds
        state["partial"] = merge_partial(state["partial"], steps, member_logs)
        state["step"] = steps
    return steps >= total


def step_options(options=None):
    """How the scan loop runs a step, defaults filled in (what the run record says)."""
    unknown = set(options or {}) - set(STEP_OPTIONS)
    if unknown:
        raise ValueError(f"unknown step options {sorted(unknown)}; known: {sorted(STEP_OPTIONS)}")
    return {**STEP_OPTIONS, **(options or {})}
