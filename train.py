"""ResNet-20 with BatchNorm, GroupNorm, LayerNorm or InstanceNorm on CIFAR-10: the ResNet
builder and one resumable run with its command line (the recipe and the grids: recipe.py).

    python train.py --norm gn --batch-size 32 --seed 1   # one run (paper scale: 100 epochs, W 8)
    python train.py --norm bn --batch-size 4 --workers 8 # 8 workers of 4 images per step
    python train.py --task 7 [--devices 2]               # the 7th entry of the sweep grid
                                                         # (on 2 GPUs: see backends.py)
    KERAS_BACKEND=jax python train.py ...                # any Keras backend: TensorFlow
                                                         # (default), JAX, PyTorch
    KERAS_BACKEND=jax python train.py --norm bn --batch-size 2 --seeds "1 2 3" --pack
                                                         # 3 seeds in one compiled program
                                                         # (JAX's scan loop; else in turn)
    python train.py --grid [--profile quick]             # print a profile's grid
    python train.py --profile quick                      # every entry of a profile's grid,
                                                         # then reproduce.py and plot.py
                                                         # (handed over to sweep.py)

A step takes W * N images (W workers of N, --workers, --batch-size); BatchNorm normalizes
each worker's N on its own, the gradient is over all W * N, as on the paper's 8 GPUs.
A run NAME (e.g. bn_b4_w8_s1; gn_b32_s1 at W = 1; gn_g4_... with G = 4) writes
models/NAME.keras (the final model), models/NAME.json (its run record: configuration,
per-epoch history, the paper's statistic, provenance) and logs/NAME/ (TensorBoard
scalars); a profile P other than the paper's Figure 1 uses models/P/ and logs/P/. It
checkpoints to models/checkpoints/ at every epoch end and, on SIGUSR1/SIGTERM, at the end
of the current compiled call (IMAGES_PER_EXECUTION images of steps under fit,
IMAGES_PER_SCAN under JAX's scan loop), then exits with status 75; rerunning the same
command resumes and ends with the same weights as an uninterrupted run (resumed on other
--devices: up to float rounding). Files are written through runfiles.py, the data read
through cifar10.py, what differs per backend is in backends.py. What needs no backend
(--help, --grid, a whole profile, a run without its data) is done before Keras starts.
"""
import contextlib
import functools
import os
import signal
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

from gnrepro.recipe import (  # noqa: F401  (train.NAME stays importable: tests, plot.py, bench.py)
    StopOnSignal, SWEEP_SIGNALS, exit_with, EPOCHS, LR_PER_32, LR_DROPS, LR_DROP_FACTOR,
    MOMENTUM, WEIGHT_DECAY, GROUPS, BN_MOMENTUM, EPSILON, EVAL_BATCH_SIZE, IMAGES_PER_EXECUTION,
    IMAGES_PER_SCAN, THREADS, NORMS, BATCH_SIZES, SEEDS, WORKERS, GROUP_COUNTS,
    CHANNELS_PER_GROUP, STUDIES, SCALES, PROFILES, PREEMPTED, SCHEDULES, STEP_IMAGES,
    STEP_OPTIONS, Config, base_config, grid, provider, paper_runs, profile_paths, check_groups,
    parse_args, resolve, print_grid,
)

if __name__ == "__main__":
    # Installed at once (recipe.py imports nothing slow), before NumPy and Keras, so that a
    # signal during start-up is not fatal: it stops the run at its first chance.
    _STOP = StopOnSignal().__enter__()

from gnrepro import cifar10    # NumPy only, as are recipe.py and runfiles.py: no backend starts before
from gnrepro import runfiles   # before_backend() has decided that one is needed
from gnrepro import startup    # (before Keras: its start-up chatter off)

HERE = Path(__file__).resolve().parent


def before_backend(argv=None, stop=None):
    """The command line, as far as it needs no Keras backend: --help and --grid print and exit;
    a whole profile is handed over to sweep.py (hand_over: this process becomes it); a run
    whose data cannot be found says so, once, and exits with status 1 (a finished run needs
    none). Otherwise (args, cfg, paths) of the one run asked for."""
    p, args = parse_args(argv)
    if args.grid:
        print_grid(args.profile or "default", args.seeds)
        sys.exit(0)
    if args.profile and all(getattr(args, k) is None for k in ("task", "norm", "batch_size", "seed")):
        hand_over(sys.argv[1:] if argv is None else argv, stop)
    if args.tasks is not None:
        p.error("--tasks selects entries of a whole profile's sweep: give --profile alone")
    if args.pack and args.seed is not None:
        p.error(f"--pack trains the run with each seed of --seeds; give --seeds, not --seed "
                f"{args.seed}")
    cfg = resolve(p, args)
    by = provider(cfg)
    if by != cfg.profile and args.models_dir is None and args.logs_dir is None:
        # One configuration, one run: where the profile that provides it keeps it.
        print(f"{cfg.name}: provided by profile {by}: its run, in "
              f"{profile_paths(by)['models_dir']}/", flush=True)
        cfg = replace(cfg, profile=by)
    paths = profile_paths(cfg.profile, args)
    for member in pack_of(args, cfg):
        run = runfiles.Paths(paths["models_dir"], paths["logs_dir"], member.name)
        if args.force or not runfiles.finished_record(run, asdict(member), asdict(Config())):
            cifar10.require(args.data_dir)
            break
    return args, cfg, paths


def pack_of(args, cfg):
    """The runs that the command line asks for: cfg, or with --pack cfg with each seed of
    --seeds (default: its scale's)."""
    if not args.pack:
        return [cfg]
    return [replace(cfg, seed=s) for s in args.seeds or SCALES[PROFILES[cfg.profile][1]]["seeds"]]


def hand_over(argv, stop=None):
    """Become `python sweep.py ARGV`, the one local runner of a grid (an exec: train.py does not
    import sweep.py, which stands on recipe.py). The signals that sweep.py handles are held
    (blocked, which exec keeps) until it has installed its handlers, so that one sent in
    between is not lost; one that came before (stop) exits with PREEMPTED at once."""
    if getattr(stop, "requested", None):
        print(f"stopped by {stop.requested} before the sweep started; run the same command again",
              flush=True)
        sys.exit(PREEMPTED)
    sys.stdout.flush()
    sys.stderr.flush()
    signal.pthread_sigmask(signal.SIG_BLOCK, SWEEP_SIGNALS)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])])}   # -m finds gnrepro from any folder
    os.execve(sys.executable, [sys.executable, "-m", "gnrepro.sweep", *map(str, argv)], env)


if __name__ == "__main__":
    _RUN = before_backend(stop=_STOP)


with startup.quiet():
    import keras  # noqa: E402
import numpy as np  # noqa: E402

from gnrepro import backends  # noqa: E402
import layer  # noqa: E402  (registers the normalization layers for loading)


# ---------------------------------------------------------------------------
# The model: He et al. (2015) Section 4.2, conv -> norm -> ReLU.

def _l2():
    # Keras' L2(l) adds l * sum(w^2), whose gradient is 2 l w: half the decay gives decay * w.
    return keras.regularizers.L2(WEIGHT_DECAY / 2)


def _norm(norm, groups, channels_per_group, slices, zero_gamma, name, channels):
    """The normalization layer `name` for `channels` channels. slices: BN's worker slices per
    device; None for Keras' own BN (W = 1, one device), so such models need no layer.py to
    load. LN and IN are GroupNormalization with one group and with one channel per group."""
    gamma = "zeros" if zero_gamma else "ones"
    if norm == "bn":
        kind, extra = ((keras.layers.BatchNormalization, {}) if slices is None
                       else (layer.WorkerBatchNormalization, dict(workers=slices)))
        return kind(momentum=BN_MOMENTUM, epsilon=EPSILON, gamma_initializer=gamma,
                    gamma_regularizer=_l2(), beta_regularizer=_l2(), name=name, **extra)
    if norm == "ln":
        groups = 1
    elif norm == "in":
        groups = -1   # one group per channel
    elif channels_per_group:
        groups = channels // channels_per_group
    return layer.GroupNormalization(
        groups=groups, epsilon=EPSILON, gamma_initializer=gamma,
        gamma_regularizer=_l2(), beta_regularizer=_l2(), name=name)


def _conv(filters, kernel, strides, name):
    return keras.layers.Conv2D(
        filters, kernel, strides=strides, padding="same", use_bias=False,
        kernel_initializer=_he(),
        kernel_regularizer=_l2(), name=name)


def _he():
    # He et al.'s initialisation: N(0, 2 / fan_in), untruncated (Keras' HeNormal truncates).
    return keras.initializers.VarianceScaling(2.0, "fan_in", "untruncated_normal")


def _block(x, filters, strides, norm_layer, name):
    """Basic block: conv-norm-ReLU-conv-norm, add the shortcut, ReLU."""
    y = _conv(filters, 3, strides, f"{name}_conv1")(x)
    y = norm_layer(False, f"{name}_norm1", filters)(y)
    y = keras.layers.ReLU(name=f"{name}_relu1")(y)
    y = _conv(filters, 3, 1, f"{name}_conv2")(y)
    y = norm_layer(True, f"{name}_norm2", filters)(y)   # gamma = 0: the block starts as identity
    if strides != 1 or x.shape[-1] != filters:
        x = _conv(filters, 1, strides, f"{name}_proj")(x)   # 1x1 projection where the shape changes
        x = norm_layer(False, f"{name}_proj_norm", filters)(x)
    return keras.layers.ReLU(name=f"{name}_out")(keras.layers.Add(name=f"{name}_add")([x, y]))




def _positive(value):
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_workers(workers, devices=1):
    if not _positive(workers):
        raise ValueError(f"workers should be a positive integer (1 = BatchNorm over the whole "
                         f"batch), got {workers!r}")
    if not _positive(devices) or workers % devices:
        raise ValueError(f"devices should be a positive integer that divides workers = {workers} "
                         f"(each device holds workers / devices of them), got {devices!r}")


def build_resnet(depth=20, norm="bn", groups=GROUPS, num_classes=10, input_shape=(32, 32, 3),
                 workers=1, devices=1, channels_per_group=None):
    """ResNet-(6n+2) for CIFAR: 3 stages of n basic blocks with 16, 32, 64 filters.

    norm: "bn", "gn" (`groups` groups in every layer, or, if channels_per_group is given,
    that many channels per group, so G grows with the width), "ln" (GN with one group: all
    of (H, W, C)) or "in" (GN with one channel per group).

    workers: W; in training, BN normalizes each of W equal slices of the step's batch on its
    own (WorkerBatchNormalization). devices: K, when the model is to be trained under a
    MirroredStrategy of K replicas, each of which sees W / K slices. Inference ignores both;
    GN ignores both (it is per image).
    """
    if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError(f"depth should be 6n+2 (20, 32, 44, ...), got {depth!r}")
    if norm not in NORMS:
        raise ValueError(f"norm should be one of {NORMS}, got {norm!r}")
    if norm == "gn" and channels_per_group is not None:
        check_groups(channels_per_group, "channels_per_group")
    elif norm == "gn":
        check_groups(groups)
    check_workers(workers, devices)
    slices = backends.slices_per_replica(workers, devices) if workers > 1 else None
    norm_layer = functools.partial(_norm, norm, groups, channels_per_group, slices)
    inputs = keras.Input(input_shape, name="image")
    x = _conv(16, 3, 1, "stem_conv")(inputs)
    x = keras.layers.ReLU(name="stem_relu")(norm_layer(False, "stem_norm", 16)(x))
    for stage, filters in enumerate((16, 32, 64)):
        for block in range((depth - 2) // 6):
            strides = 2 if stage > 0 and block == 0 else 1
            x = _block(x, filters, strides, norm_layer, f"stage{stage + 1}_block{block + 1}")
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(num_classes, kernel_initializer=_he(), kernel_regularizer=_l2(),
                                 bias_regularizer=_l2(), name="logits",
                                 dtype="float32")(x)   # float32 logits under mixed precision
    return keras.Model(inputs, outputs, name=f"resnet{depth}_{norm}")


def build_resnet20(norm="bn", groups=GROUPS, workers=1, **kwargs):
    """ResNet-20 (0.27M parameters): the model of the sweep, uncompiled."""
    return build_resnet(20, norm=norm, groups=groups, workers=workers, **kwargs)


@contextlib.contextmanager
def dtype_policy(cfg):
    """Keras' global dtype policy while cfg's model is built: mixed_float16 with
    --mixed-precision (compile then adds loss scaling), mixed_bfloat16 with --bfloat16,
    float32 otherwise."""
    if cfg.mixed_precision and cfg.bfloat16:
        raise ValueError("give mixed_precision (float16) or bfloat16, not both")
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16" if cfg.mixed_precision else
                                  "mixed_bfloat16" if cfg.bfloat16 else "float32")
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def build_model(cfg, devices=1):
    """cfg's ResNet-20, in cfg's precision, for `devices` devices (see build_resnet)."""
    with dtype_policy(cfg):
        return build_resnet20(cfg.norm, cfg.groups, cfg.workers, devices=devices,
                              channels_per_group=cfg.channels_per_group)


# ---------------------------------------------------------------------------
# Evaluation (reproduce.py evaluates with this same function, on cifar10.prepare_data's data).

def evaluate(model, data):
    """(test loss, test error in %) on data's test images, inference mode, deterministic."""
    logits = np.asarray(model.predict(data.test_inputs, batch_size=EVAL_BATCH_SIZE, verbose=0),
                        np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    y = np.asarray(data.y_test)
    loss = -log_p[np.arange(len(y)), y].mean()
    return float(loss), float(100 * np.mean(logits.argmax(axis=1) != y))


def compile_model(model, cfg, steps_per_epoch, devices=1):
    # Boundaries are in optimizer steps; the first step of epoch d already uses the new rate.
    boundaries = [d * steps_per_epoch - 1 for d in cfg.lr_drops]
    values = [cfg.lr * LR_DROP_FACTOR ** i for i in range(len(boundaries) + 1)]
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)
    model.compile(
        optimizer=keras.optimizers.SGD(schedule, momentum=MOMENTUM),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalCrossentropy(from_logits=True, name="ce"),
                 keras.metrics.SparseCategoricalAccuracy(name="acc")],
        steps_per_execution=backends.steps_per_execution(
            max(1, IMAGES_PER_EXECUTION // (cfg.batch_size * cfg.workers)), devices),
        # TensorFlow: off unless asked: Keras' "auto" means XLA on a GPU and none on a CPU,
        # and on 2 CPU cores XLA made the training step slower (`python bench.py train
        # --jit-compile`). JAX: always jitted ("auto"); PyTorch: "auto" is eager.
        jit_compile=cfg.jit_compile if backends.name() == "tensorflow" else "auto")
    model.optimizer.build(model.trainable_variables)
    if cfg.jit_compile and backends.name() == "tensorflow" and not model.jit_compile:
        # Keras' model_supports_jit: no XLA while TensorFlow's op determinism is on.
        print("note: --jit-compile: Keras trains without XLA here (TensorFlow's op determinism, "
              "which train.py turns on, rules it out); the run record says so", file=sys.stderr)


# ---------------------------------------------------------------------------
# Devices: one, or several (backends.distributed: MirroredStrategy, or JAX's DataParallel).

def single_device_copy(model, cfg, steps_per_epoch):
    """The model as one device holds it (W slices, not W / K), optimizer state included:
    what is saved, so that a saved model does not depend on the run's devices (TensorFlow;
    under JAX the model already holds all W slices)."""
    copy = build_model(cfg)
    compile_model(copy, cfg, steps_per_epoch)
    copy.set_weights(model.get_weights())
    for target, source in zip(copy.optimizer.variables, model.optimizer.variables):
        target.assign(np.asarray(source))
    return copy


# ---------------------------------------------------------------------------
# One run.

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
        if len(self.model.metrics_variables) == len(self.metrics):   # else: merged (_merge)
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


def _merge(partial, steps, logs):
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


class Member:
    """One run as the epoch loop holds it: its Config, files (runfiles.Paths), Keras model,
    state (what its checkpoint saves) and TensorBoard writer. A pack is a list of these."""

    def __init__(self, cfg, paths, model, state, options=None):
        self.cfg, self.paths, self.model, self.state, self.writer = cfg, paths, model, state, None
        self.options = options or {}   # how the step runs, not what it computes (STEP_OPTIONS)


def _fit_epoch(members, data, stop, progress, total):
    """The rest of the epoch through model.fit (one member); (steps done, [last logs])."""
    (m,) = members
    cfg, state = m.cfg, m.state
    batches = cifar10.TrainBatches(data.padded, data.y_train, cfg.batch_size * cfg.workers,
                                   cfg.seed, state["epoch"], skip_batches=state["step"])
    saved = (state["partial"] or {}).get("metrics")
    callback = StepCallback(stop, state["step"], total, progress, metrics=saved)
    m.model.fit(Batches(batches), epochs=1, verbose=0, shuffle=False, callbacks=[callback])
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


def _scan_epoch(members, data, stop, progress, total):
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
    steps, logs = (_scan_epoch if loop == "scan" else _fit_epoch)(members, data, stop, progress,
                                                                  total)
    seconds = time.perf_counter() - start
    for m, member_logs in zip(members, logs):
        state = m.state
        state["train_seconds"] += seconds
        state["train_images"] += (steps - skip) * batch
        state["epoch_seconds"] = state.get("epoch_seconds", 0.0) + seconds
        state["partial"] = _merge(state["partial"], steps, member_logs)
        state["step"] = steps
    return steps >= total


def _epoch_line(cfg, entry):
    return (f"{cfg.name} epoch {entry['epoch']}/{cfg.epochs}  lr {entry['lr']:.4g}  "
            f"train loss {entry['train_loss']:.3f} err {entry['train_error']:.2f}%  "
            f"test loss {entry['test_loss']:.3f} err {entry['test_error']:.2f}%  "
            f"{entry['seconds']:.1f}s  {entry['images_per_second']:.0f} img/s")


def end_epoch(model, data, cfg, state, writer):
    """Evaluate, append the epoch to the history, log it; the epoch is then complete."""
    test_loss, test_error = evaluate(model, data)
    steps = state["partial"]["steps"]
    entry = {"epoch": state["epoch"] + 1,
             "lr": cfg.lr * LR_DROP_FACTOR ** sum(state["epoch"] >= d for d in cfg.lr_drops),
             "train_loss": state["partial"]["ce"], "train_error": 100 * (1 - state["partial"]["acc"]),
             "test_loss": test_loss, "test_error": test_error,
             "seconds": state.pop("epoch_seconds")}
    entry["images_per_second"] = steps * cfg.batch_size * cfg.workers / max(entry["seconds"], 1e-9)
    state["history"].append(entry)
    state.update(epoch=state["epoch"] + 1, step=0, partial=None)
    # TensorBoard's own writer (no TensorFlow needed): scalars as tf.summary.scalar writes them.
    for key in ("train_loss", "train_error", "test_loss", "test_error", "lr", "images_per_second"):
        writer.add_scalar(key.replace("_", "/", 1) if key.startswith(("train", "test")) else key,
                          entry[key], entry["epoch"])
    writer.flush()
    print(_epoch_line(cfg, entry), flush=True)


def median_last5(history):
    """The paper's statistic: median test error over the final 5 epochs (or all, if fewer)."""
    return float(statistics.median(e["test_error"] for e in history[-5:]))


def finish(paths, model, data, cfg, state, devices, loop, options=None):
    test_loss, test_error = evaluate(model, data)
    step = cfg.batch_size * cfg.workers
    steps = cifar10.steps_per_epoch(len(data.y_train), step)
    record = {
        "name": cfg.name, "status": "finished",
        "config": {"run": asdict(cfg), "lr": cfg.lr, "lr_drops": cfg.lr_drops,
                   "schedule": cfg.schedule, "step_images": step, "steps_per_epoch": steps,
                   "lr_drop_steps": [d * steps for d in cfg.lr_drops],
                   "steps": steps * cfg.epochs,
                   "lr_drop_factor": LR_DROP_FACTOR, "momentum": MOMENTUM,
                   "weight_decay": WEIGHT_DECAY, "bn_momentum": BN_MOMENTUM, "epsilon": EPSILON,
                   "norm": cfg.norm, "groups": cfg.groups,
                   "channels_per_group": cfg.channels_per_group, "batch_size": cfg.batch_size,
                   "workers": cfg.workers, "seed": cfg.seed, "epochs": cfg.epochs,
                   "profile": cfg.profile, "train_images": len(data.y_train),
                   "test_images": len(data.y_test)},
        "history": state["history"],
        "test_error": test_error, "test_loss": test_loss,
        "median_last5_error": median_last5(state["history"]),
        "params": int(sum(np.prod(w.shape) for w in model.trainable_weights)),
        "wall_seconds": state["wall_seconds"],
        "images_per_second": state["train_images"] / max(state["train_seconds"], 1e-9),
        "data": {"checksum": data.checksum, "source": data.source, "official": data.official,
                 "train_images": len(data.y_train), "test_images": len(data.y_test)},
        "resumed": state["resumed"],
        "devices": devices,   # the last session's: a resumed run may have changed them
        "loop": loop,         # fit, or scan (backends.ScanLoop): the last session's
        # the runs trained in one compiled program with this one (a pack, any session)
        "packed_with": state.get("packed_with", []),
        "step_options": options or {},   # how the scan loop ran its step (step_options)
        # XLA's flags (JAX): command buffers (CUDA graphs) and determinism are set there
        "xla_flags": os.environ.get("XLA_FLAGS", "") if backends.name() == "jax" else None,
        "jit_compile_used": bool(model.jit_compile),   # what Keras did with --jit-compile
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **runfiles.provenance(),
    }
    if len(devices) > 1 and backends.name() == "tensorflow":
        steps = cifar10.steps_per_epoch(len(data.y_train), cfg.batch_size * cfg.workers)
        model = single_device_copy(model, cfg, steps)
    runfiles.atomic_write(paths.model, lambda tmp: model.save(tmp))
    runfiles.write_json(paths.record, record)
    paths.checkpoint.unlink(missing_ok=True)
    print(f"{cfg.name}: test error {test_error:.2f}% (median of the final 5 epochs "
          f"{record['median_last5_error']:.2f}%), saved {paths.model} and {paths.record}", flush=True)
    return record


def train(cfg, data_dir=None, models_dir="models", logs_dir="logs", force=False, progress=None,
          stop=None, devices=None, loop="auto", options=None):
    """Run (or resume) one configuration; return the process exit status (0, PREEMPTED, or
    runfiles.BUSY where another process is training the same run: its lock, runfiles.RunLock).

    devices: K, to train on K devices (see backends.pick_devices); the result is the same
    experiment. loop: "fit" (model.fit), "scan" (JAX only: backends.ScanLoop), or "auto"
    (scan on JAX with a GPU, fit elsewhere). options: how the scan loop's step runs
    (step_options), recorded in the run record.
    """
    return train_pack([cfg], data_dir, models_dir, logs_dir, force, progress, stop, devices, loop,
                      options)


def train_pack(cfgs, data_dir=None, models_dir="models", logs_dir="logs", force=False,
               progress=None, stop=None, devices=None, loop="auto", options=None):
    """Run (or resume) configurations that differ only in seed (pack_configs), as train()
    runs one: on JAX's scan loop in one compiled program (a pack; a solo run is a pack of
    one), elsewhere one after another. Finished members are skipped; members that stand at
    different points (epoch, step) of their runs train as separate packs, the least
    advanced first. Returns 0, or PREEMPTED once stopped."""
    loop = resolve_loop(loop)
    if devices:   # a wrong --devices fails before anything is written (the locks' folder)
        backends.pick_devices(cfgs[0].workers, devices)
    pending, busy = [], []
    with contextlib.ExitStack() as stack:
        for cfg in pack_configs(cfgs):
            paths = runfiles.Paths(models_dir, logs_dir, cfg.name)
            if _finished(cfg, paths, force):
                continue
            lock = stack.enter_context(runfiles.RunLock(paths))   # each member its own
            if not lock.held:
                busy.append(f"{cfg.name}: {lock.holder} is training this run (it holds "
                            f"{paths.lock})")
            elif not _finished(cfg, paths, force):   # (by the process that held the lock)
                pending.append((cfg, paths))
        then = "not here" if pending else f"exiting with status {runfiles.BUSY}"
        for message in busy:
            print(f"{message}; {then}", file=sys.stderr, flush=True)
        if not pending:
            return runfiles.BUSY if busy else 0
        progress = sys.stdout.isatty() if progress is None else progress
        if stop is None:
            stop = stack.enter_context(StopOnSignal())
        if loop == "scan" or len(pending) == 1:
            return _train(pending, data_dir, force, progress, stop, devices, loop, options)
        print(f"{len(pending)} runs ({', '.join(c.name for c, _ in pending)}): one after another "
              f"(packs need JAX's scan loop: KERAS_BACKEND=jax, --loop scan)", flush=True)
        for run in pending:
            code = _train([run], data_dir, force, progress, stop, devices, loop, options)
            if code:
                return code
        return 0


def _finished(cfg, paths, force):
    """Whether cfg's run has finished (said once), unless --force retrains it."""
    if force or not runfiles.finished_record(paths, asdict(cfg), asdict(Config())):
        return False
    print(f"{cfg.name}: already finished ({paths.model}); --force retrains it", flush=True)
    return True


def pack_configs(cfgs):
    """Check that cfgs may form a pack (distinct seeds, nothing else different); cfgs."""
    rest = {replace(c, seed=0) for c in cfgs}
    if len(rest) > 1 or len({c.seed for c in cfgs}) < len(cfgs):
        raise ValueError(f"a pack's runs differ in their seeds only; got "
                         f"{', '.join(c.name for c in cfgs)}")
    return cfgs


def step_options(options=None):
    """How the scan loop runs a step, defaults filled in (what the run record says)."""
    unknown = set(options or {}) - set(STEP_OPTIONS)
    if unknown:
        raise ValueError(f"unknown step options {sorted(unknown)}; known: {sorted(STEP_OPTIONS)}")
    return {**STEP_OPTIONS, **(options or {})}


def resolve_loop(loop):
    if loop == "auto":
        # XLA on a CPU runs a scan's loop body far slower than the same step jitted alone
        # (0.35 s against 0.02 s a step of 8 images here): scan only where there is a GPU.
        return "scan" if backends.name() == "jax" and backends.gpus() else "fit"
    if loop == "scan" and backends.name() != "jax":
        raise SystemExit(f"error: --loop scan needs KERAS_BACKEND=jax (this is "
                         f"{backends.name()}); use --loop fit")
    if loop not in ("fit", "scan"):
        raise SystemExit(f"error: --loop should be auto, fit or scan, got {loop!r}")
    return loop


def _start(cfg, paths, steps, devices, force, options=None):
    """cfg's Member: its model (initialised from cfg.seed, as every run of cfg is), compiled,
    restored from its checkpoint if it has one."""
    keras.utils.set_random_seed(cfg.seed)
    with backends.distributed(devices):   # variables on every device
        model = build_model(cfg, devices=len(devices))
        compile_model(model, cfg, steps, devices=len(devices))
    if force:
        paths.checkpoint.unlink(missing_ok=True)
    state = runfiles.load_checkpoint(paths, model, asdict(cfg), asdict(Config()))
    if state:
        state["resumed"] += 1
        print(f"{cfg.name}: resuming at epoch {state['epoch'] + 1}, step {state['step']} "
              f"from {paths.checkpoint}", flush=True)
    else:
        state = {"config": asdict(cfg), "epoch": 0, "step": 0, "partial": None, "history": [],
                 "train_seconds": 0.0, "train_images": 0, "wall_seconds": 0.0, "resumed": 0}
    return Member(cfg, paths, model, state, options)


def _train(runs, data_dir, force, progress, stop, devices=None, loop="fit", options=None):
    """runs: (Config, Paths) pairs, one, or a pack's (scan loop only)."""
    backends.enable_determinism()
    cfg = runs[0][0]
    names = backends.pick_devices(cfg.workers, devices)   # before the data: a wrong --devices fails fast
    if len(names) > 1 and loop == "scan":
        print(f"note: --loop scan is single-device; on {len(names)} devices the run uses fit",
              flush=True)
        loop = "fit"
        if len(runs) > 1:   # no pack then: its runs one after another
            for run in runs:
                code = _train([run], data_dir, force, progress, stop, devices, loop, options)
                if code:
                    return code
            return 0
    data = cifar10.prepare_data(data_dir, cfg.train_images, cfg.test_images)
    steps = cifar10.steps_per_epoch(len(data.y_train), cfg.batch_size * cfg.workers)
    if steps < 1:
        raise SystemExit(f"error: {len(data.y_train)} training images make no step of W * N = "
                         f"{cfg.workers} * {cfg.batch_size} images: use more --train-images, or "
                         f"a smaller --batch-size or --workers")
    if not data.official:
        print(f"note: {data.source} is not the official 50,000 + 10,000 images; this run trains on "
              f"{len(data.y_train)} and tests on {len(data.y_test)} (recorded in the run record)")
    if len(names) > 1:
        print(f"{cfg.name}: {backends.parallel_name()} over {', '.join(names)}, "
              f"{cfg.workers // len(names)} worker(s) of {cfg.batch_size} images on each",
              flush=True)
    options = step_options(options) if loop == "scan" else {}
    members = [_start(c, paths, steps, names, force, options) for c, paths in runs]
    points = {}
    for m in members:
        points.setdefault((m.state["epoch"], m.state["step"]), []).append(m)
    if len(points) > 1:
        print(f"note: the pack's runs stand at {len(points)} different points; each point "
              f"trains as its own pack, the least advanced first", flush=True)
    for point in sorted(points):
        code = _train_members(points[point], data, stop, progress, names, loop)
        if code:
            return code
    return 0


def _train_members(members, data, stop, progress, names, loop):
    """The epoch loop of members that stand at the same point: one run, or a pack."""
    import tensorboard.summary
    cfg = members[0].cfg
    for m in members:
        m.writer = tensorboard.summary.Writer(str(m.paths.logs))
        others = [o.cfg.name for o in members if o is not m]
        m.state["packed_with"] = sorted(set(m.state.get("packed_with", [])) | set(others))
    if len(members) > 1:
        print(f"pack of {len(members)}: {', '.join(m.cfg.name for m in members)} in one "
              f"compiled program", flush=True)
    while members[0].state["epoch"] < cfg.epochs:
        start = time.perf_counter()
        if not stop.requested and train_epoch(members, data, stop, progress, loop):
            for m in members:
                end_epoch(m.model, data, m.cfg, m.state, m.writer)
        seconds = time.perf_counter() - start   # a pack's: each member waited for all of it
        for m in members:
            m.state["wall_seconds"] += seconds
            runfiles.save_checkpoint(m.paths, m.model, m.state)
        if stop.requested:
            for m in members:
                print(f"{m.cfg.name}: checkpointed at epoch {m.state['epoch'] + 1}, step "
                      f"{m.state['step']} ({m.paths.checkpoint}); exiting with status "
                      f"{PREEMPTED}", flush=True)
            return PREEMPTED
    for m in members:
        finish(m.paths, m.model, data, m.cfg, m.state, names, loop, m.options)
    return 0




def main(argv=None, stop=None, run=None):
    """One run of the command line, or a pack of it (run: before_backend's answer, where it
    was asked already)."""
    args, cfg, paths = run or before_backend(argv, stop)
    backends.set_threads(args.threads)
    options = {"unroll": args.unroll} if args.unroll else None
    return train_pack(pack_of(args, cfg), args.data_dir, paths["models_dir"], paths["logs_dir"],
                      args.force, stop=stop, devices=args.devices, loop=args.loop, options=options)


if __name__ == "__main__":
    exit_with(lambda: main(stop=_STOP, run=_RUN))
