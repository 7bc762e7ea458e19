"""ResNet-20 with BatchNorm, GroupNorm, LayerNorm or InstanceNorm on CIFAR-10 (He et al. 2015,
Section 4.2; Wu & He 2018): the ResNet builder, and one resumable run with its command line.

    from train import build_resnet20           # in your own code: the model, uncompiled,
    model = build_resnet20("gn", groups=8)     # returning logits (from_logits=True)

    python train.py --norm gn --batch-size 32 --seed 1   # one run (paper scale: 100 epochs, W 8)
    python train.py --task 7                             # entry 7 of the sweep grid (from 0)
    python train.py --profile quick                      # a profile's whole grid, then
                                                         # reproduce.py and plot.py
    python train.py --grid [--profile P] | --help        # the grid; every option

A step takes W * N images (W workers of N, --workers, --batch-size); BatchNorm normalizes each
worker's N on its own, the gradient is over all W * N, as on the paper's 8 GPUs. A run NAME
(e.g. bn_b4_w8_s1) writes models/NAME.keras (the final model), models/NAME.json (its run
record: configuration, per-epoch history, the paper's statistic, provenance) and logs/NAME/
(TensorBoard scalars); a profile P other than Figure 1's uses models/P/ and logs/P/. It
checkpoints to models/checkpoints/ at every epoch's end and, on SIGUSR1/SIGTERM, at the end of
the current compiled call, then exits with status 75; the same command resumes it, to the same
weights as an uninterrupted run.

Reading order: the model (build_resnet), compile_model and evaluate, then train(): one run, or
the seeds of one configuration as a pack, from its first step to its saved model. The recipe
and the grids are gnrepro/recipe.py's, the epoch loops gnrepro/loops.py's, the files
gnrepro/runfiles.py's, the data gnrepro/cifar10.py's. Importing this file loads none of them
but the recipe, and changes nothing: no variable, no signal handler.
"""
import contextlib
import functools
import os
import statistics
import sys
import time
from dataclasses import asdict

if __name__ == "__main__":
    # The command line, first what needs no Keras: the stop handler (before NumPy, so that a
    # signal during start-up stops the run at its first chance), --help, --grid, a whole
    # profile (handed to the sweep), a run whose data is missing. Then Keras, quietly.
    from gnrepro import launch
    _STOP, _RUN = launch.before_keras()

import keras
import numpy as np

import layer   # (the normalization layers, registered: saved models load)
from gnrepro import backends, recipe
from gnrepro.recipe import BN_MOMENTUM, EPSILON, GROUPS, NORMS, WEIGHT_DECAY


# ---------------------------------------------------------------------------
# The model: He et al. (2015) Section 4.2, conv -> norm -> ReLU.

def _l2(weight_decay):
    # Keras' L2(l) adds l * sum(w^2), whose gradient is 2 l w: half the decay gives decay * w.
    return keras.regularizers.L2(weight_decay / 2) if weight_decay else None


def _he():
    # He et al.'s initialisation: N(0, 2 / fan_in), untruncated (Keras' HeNormal truncates).
    return keras.initializers.VarianceScaling(2.0, "fan_in", "untruncated_normal")


def _conv(filters, kernel, strides, name, weight_decay):
    return keras.layers.Conv2D(filters, kernel, strides=strides, padding="same", use_bias=False,
                               kernel_initializer=_he(), kernel_regularizer=_l2(weight_decay),
                               name=name)


def _norm(norm, groups, channels_per_group, slices, moving_statistics, weight_decay, zero_gamma,
          name, channels):
    """The normalization layer `name` for `channels` channels. slices: BN's worker slices per
    device; None for Keras' own BN (W = 1, one device), so such models need no layer.py to
    load. LN and IN are GroupNormalization with one group and with one channel per group."""
    common = dict(epsilon=EPSILON, gamma_initializer="zeros" if zero_gamma else "ones",
                  gamma_regularizer=_l2(weight_decay), beta_regularizer=_l2(weight_decay),
                  name=name)
    if norm == "bn" and slices is None:
        return keras.layers.BatchNormalization(momentum=BN_MOMENTUM, **common)
    if norm == "bn":
        return layer.WorkerBatchNormalization(workers=slices, moving_statistics=moving_statistics,
                                              momentum=BN_MOMENTUM, **common)
    if norm == "ln":
        groups = 1
    elif norm == "in":
        groups = -1   # one group per channel
    elif channels_per_group:
        groups = channels // channels_per_group
    return layer.GroupNormalization(groups=groups, **common)


def _block(x, filters, strides, norm_layer, conv, name):
    """Basic block: conv-norm-ReLU-conv-norm, add the shortcut, ReLU."""
    y = conv(filters, 3, strides, f"{name}_conv1")(x)
    y = norm_layer(False, f"{name}_norm1", filters)(y)
    y = keras.layers.ReLU(name=f"{name}_relu1")(y)
    y = conv(filters, 3, 1, f"{name}_conv2")(y)
    y = norm_layer(True, f"{name}_norm2", filters)(y)   # gamma = 0: the block starts as identity
    if strides != 1 or x.shape[-1] != filters:
        x = conv(filters, 1, strides, f"{name}_proj")(x)   # 1x1 projection where the shape changes
        x = norm_layer(False, f"{name}_proj_norm", filters)(x)
    return keras.layers.ReLU(name=f"{name}_out")(keras.layers.Add(name=f"{name}_add")([x, y]))


def check_workers(workers, devices=1):
    if not recipe.is_positive_int(workers):
        raise ValueError(f"workers should be a positive integer (1 = BatchNorm over the whole "
                         f"batch), got {workers!r}")
    if not recipe.is_positive_int(devices) or workers % devices:
        raise ValueError(f"devices should be a positive integer that divides workers = {workers} "
                         f"(each device holds workers / devices of them), got {devices!r}")


def build_resnet(depth=20, norm="bn", groups=GROUPS, num_classes=10, input_shape=(32, 32, 3),
                 workers=1, devices=1, channels_per_group=None, moving_statistics="first",
                 weight_decay=WEIGHT_DECAY):
    """ResNet-(6n+2) for CIFAR: 3 stages of n basic blocks with 16, 32, 64 filters, global
    average pooling and a dense layer. Uncompiled; it returns logits (compile its loss with
    from_logits=True).

    norm: "bn", "gn" (`groups` groups in every layer, or, if channels_per_group is given,
    that many channels per group, so G grows with the width), "ln" (GN with one group: all
    of (H, W, C)) or "in" (GN with one channel per group).

    workers: W; in training, BN normalizes each of W equal slices of the step's batch on its
    own (layer.WorkerBatchNormalization), whose moving statistics come from the first slice
    (moving_statistics="first", as the paper's code) or the mean over the slices ("mean").
    devices: K, when the model is to be trained under a MirroredStrategy of K replicas, each
    of which sees W / K slices. Inference ignores all three; GN ignores them (it is per image).

    weight_decay: the L2 penalty's coefficient on every weight, gamma and beta included, as
    the loss's regularization (1e-4, He et al.'s; its gradient is weight_decay * w). Give 0
    (or None) for none, e.g. where the optimizer decays the weights itself.
    """
    if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError(f"depth should be 6n+2 (20, 32, 44, ...), got {depth!r}")
    if norm not in NORMS:
        raise ValueError(f"norm should be one of {NORMS}, got {norm!r}")
    if norm == "gn" and channels_per_group is not None:
        recipe.check_groups(channels_per_group, "channels_per_group")
    elif norm == "gn":
        recipe.check_groups(groups)
    check_workers(workers, devices)
    if moving_statistics not in layer.MOVING_STATISTICS:
        raise ValueError(f"moving_statistics should be one of {layer.MOVING_STATISTICS}, got "
                         f"{moving_statistics!r}")
    number = isinstance(weight_decay, (int, float)) and not isinstance(weight_decay, bool)
    if weight_decay is not None and not (number and weight_decay >= 0):
        raise ValueError(f"weight_decay should be a number >= 0 (0 or None: no L2 penalty), "
                         f"got {weight_decay!r}")
    slices = backends.slices_per_replica(workers, devices) if workers > 1 else None
    norm_layer = functools.partial(_norm, norm, groups, channels_per_group, slices,
                                   moving_statistics, weight_decay)
    conv = functools.partial(_conv, weight_decay=weight_decay)
    inputs = keras.Input(input_shape, name="image")
    x = conv(16, 3, 1, "stem_conv")(inputs)
    x = keras.layers.ReLU(name="stem_relu")(norm_layer(False, "stem_norm", 16)(x))
    for stage, filters in enumerate((16, 32, 64)):
        for block in range((depth - 2) // 6):
            strides = 2 if stage > 0 and block == 0 else 1
            x = _block(x, filters, strides, norm_layer, conv, f"stage{stage + 1}_block{block + 1}")
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(num_classes, kernel_initializer=_he(),
                                 kernel_regularizer=_l2(weight_decay),
                                 bias_regularizer=_l2(weight_decay), name="logits",
                                 dtype="float32")(x)   # float32 logits under mixed precision
    return keras.Model(inputs, outputs, name=f"resnet{depth}_{norm}")


def build_resnet20(norm="bn", groups=GROUPS, workers=1, **kwargs):
    """ResNet-20 (0.27M parameters): the model of the sweep, uncompiled (see build_resnet)."""
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
                              channels_per_group=cfg.channels_per_group,
                              moving_statistics=cfg.moving_statistics)


# ---------------------------------------------------------------------------
# Training and evaluation (reproduce.py evaluates with this same function).

def compile_model(model, cfg, steps_per_epoch, devices=1):
    """SGD with momentum and cfg's schedule (in optimizer steps), the cross-entropy of logits,
    and the training metrics the run records."""
    # Boundaries are in optimizer steps; the first step of epoch d already uses the new rate.
    boundaries = [d * steps_per_epoch - 1 for d in cfg.lr_drops]
    values = [cfg.lr * recipe.LR_DROP_FACTOR ** i for i in range(len(boundaries) + 1)]
    schedule = (keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)
                if boundaries else cfg.lr)   # (a run of one epoch has no drop)
    model.compile(
        optimizer=keras.optimizers.SGD(schedule, momentum=recipe.MOMENTUM),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalCrossentropy(from_logits=True, name="ce"),
                 keras.metrics.SparseCategoricalAccuracy(name="acc")],
        steps_per_execution=backends.steps_per_execution(
            max(1, recipe.IMAGES_PER_EXECUTION // (cfg.batch_size * cfg.workers)), devices),
        jit_compile=backends.jit_compile())
    model.optimizer.build(model.trainable_variables)


def evaluate(model, data):
    """(test loss, test error in %) on data's test images, inference mode, deterministic."""
    logits = np.asarray(backends.predict(model, data.test_inputs, recipe.EVAL_BATCH_SIZE),
                        np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    y = np.asarray(data.y_test)
    loss = -log_p[np.arange(len(y)), y].mean()
    return float(loss), float(100 * np.mean(logits.argmax(axis=1) != y))


def median_last5(history):
    """The paper's statistic: median test error over the final 5 epochs (or all, if fewer)."""
    return float(statistics.median(e["test_error"] for e in history[-5:]))


# ---------------------------------------------------------------------------
# One run (or a pack of runs: the seeds of one configuration, trained together).

def train(cfgs, data_dir=None, models_dir="models", logs_dir="logs", force=False, progress=None,
          stop=None, devices=None, loop="auto", options=None):
    """Run (or resume) cfgs, a Config or the seeds of one configuration, to their saved models.
    Returns the exit status: 0; signals.PREEMPTED once stopped (every run checkpointed); or
    runfiles.BUSY where other processes hold every run that is left (their locks).

    Finished runs are skipped (force: retrained). On JAX's scan loop the runs that stand at
    the same point train as one pack, in one compiled program; elsewhere one after another.
    devices: K devices (backends.pick_devices; the same experiment). loop: "fit", "scan"
    (JAX) or "auto" (loops.resolve_loop). options: how the scan loop's step runs (recorded).
    """
    from gnrepro import cifar10, loops, runfiles, signals   # a run's machinery: loaded now
    cfgs = recipe.check_pack([cfgs] if isinstance(cfgs, recipe.Config) else list(cfgs))
    backends.enable_determinism()                              # before the backend starts
    backends.undo_malloc_patch()                               # tensors on the heap
    names = backends.pick_devices(cfgs[0].workers, devices)   # a wrong --devices: before any file
    loop = loops.resolve_loop(loop, len(names))
    if len(names) > 1:
        print(f"{cfgs[0].name}: {backends.parallel_name()} over {', '.join(names)}, "
              f"{cfgs[0].workers // len(names)} worker(s) of {cfgs[0].batch_size} images on each",
              flush=True)
    options = loops.step_options(options) if loop == "scan" else {}
    with contextlib.ExitStack() as stack:
        runs, status = runfiles.claim(cfgs, models_dir, logs_dir, force, stack,
                                      recipe.run_identity)   # finished skipped, each run locked
        if not runs:
            return status
        stop = stop or stack.enter_context(signals.StopOnSignal())
        progress = sys.stdout.isatty() if progress is None else progress
        data = cifar10.prepare_data(data_dir, cfgs[0].train_images, cfgs[0].test_images)
        if not data.official:
            print(f"note: {data.source} is not the official release of CIFAR-10 (its files' "
                  f"md5s); this run trains on {len(data.y_train)} and tests on "
                  f"{len(data.y_test)} images (recorded in the run record)", flush=True)
        steps = steps_per_epoch(data, cfgs[0])
        runs = [resumed(cfg, paths, force) for cfg, paths in runs]
        if len(runs) > 1 and loop != "scan":
            print(f"{len(runs)} runs ({', '.join(c.name for c, _, _ in runs)}): one after another "
                  f"(packs need JAX's scan loop: KERAS_BACKEND=jax, --loop scan)", flush=True)
        packs = loops.packs(runs, loop)
        if loop == "scan" and len(packs) > 1:
            print(f"note: the pack's runs stand at {len(packs)} different points; each point "
                  f"trains as its own pack, the least advanced first", flush=True)
        for pack in packs:
            code = run(pack, data, steps, stop, names, loop, options, progress)
            if code:
                return code
        return 0


def run(pack, data, steps, stop, devices, loop, options, progress):
    """Train a pack ((cfg, paths, checkpoint) of one run, or of several at the same point) to
    its end: build, compile and restore each run; then every epoch train, evaluate, record and
    checkpoint; then save. Returns 0, or signals.PREEMPTED once stopped."""
    import tensorboard.summary
    from gnrepro import loops, runfiles, signals
    members = []
    for cfg, paths, saved in pack:
        keras.utils.set_random_seed(cfg.seed)    # every run of cfg starts from the same weights
        with backends.distributed(devices):      # (its variables on every device)
            model = build_model(cfg, devices=len(devices))
            compile_model(model, cfg, steps, devices=len(devices))
        state = saved and runfiles.restore(paths, model, saved)
        if state:
            state["resumed"] += 1
            print(f"{paths.name}: resuming at epoch {state['epoch'] + 1}, step {state['step']} "
                  f"from {paths.checkpoint}", flush=True)
        else:
            state = new_state(cfg)
        runfiles.open_segment(state, loop)   # this session: where it starts, what it runs on
        others = {p.name for _, p, _ in pack} - {paths.name}
        state["packed_with"] = sorted(set(state.get("packed_with", [])) | others)
        writer = tensorboard.summary.Writer(str(paths.logs))
        members.append(loops.Member(cfg, paths, model, state, writer, options))
    if len(members) > 1:
        print(f"pack of {len(members)}: {', '.join(m.paths.name for m in members)} in one "
              f"compiled program", flush=True)
    while members[0].state["epoch"] < members[0].cfg.epochs:
        start = time.perf_counter()
        if not stop.requested and loops.train_epoch(members, data, stop, progress, loop):
            for m in members:
                end_epoch(m, data)               # evaluate, record (history, TensorBoard)
        seconds = time.perf_counter() - start    # a pack's: each member waited for all of it
        for m in members:
            m.state["wall_seconds"] += seconds
            runfiles.close_segment(m.state)
            runfiles.save_checkpoint(m.paths, m.model, m.state)
        if stop.requested:
            for m in members:
                print(f"{m.paths.name}: checkpointed at epoch {m.state['epoch'] + 1}, step "
                      f"{m.state['step']} ({m.paths.checkpoint}); exiting with status "
                      f"{signals.PREEMPTED}", flush=True)
            return signals.PREEMPTED
    for m in members:
        save(m, data, devices, loop)
    return 0


def steps_per_epoch(data, cfg):
    """Steps of W * N images in an epoch of data's training images (none: an error)."""
    from gnrepro import cifar10
    steps = cifar10.steps_per_epoch(len(data.y_train), cfg.batch_size * cfg.workers)
    if steps < 1:
        raise SystemExit(f"error: {len(data.y_train)} training images make no step of W * N = "
                         f"{cfg.workers} * {cfg.batch_size} images: use more --train-images, or "
                         f"a smaller --batch-size or --workers")
    return steps


def resumed(cfg, paths, force):
    """(cfg, paths, checkpoint or None): the run as its checkpoint left it. A run keeps the
    moving-statistics rule it started with (recipe.KEPT_FROM_START): a checkpoint of an
    earlier version of train.py goes on with the mean over the workers."""
    from gnrepro import runfiles
    if force:
        paths.checkpoint.unlink(missing_ok=True)
        return cfg, paths, None
    saved = runfiles.read_checkpoint(paths, asdict(cfg), recipe.run_identity)
    if saved is None:
        return cfg, paths, None
    started = recipe.stored_config(saved.state["config"])
    if started.moving_statistics != cfg.moving_statistics:
        print(f"{paths.name}: its checkpoint was trained with moving statistics "
              f"{started.moving_statistics!r}: the run goes on with them", flush=True)
    saved.state["config"] = asdict(started)
    return started, paths, saved


def new_state(cfg):
    """A run's state before its first step (what its checkpoints save, besides the arrays)."""
    return {"config": asdict(cfg), "epoch": 0, "step": 0, "partial": None, "history": [],
            "train_seconds": 0.0, "train_images": 0, "wall_seconds": 0.0, "resumed": 0}


def end_epoch(m, data):
    """Evaluate member m, append the epoch to its history and TensorBoard, print it."""
    cfg, state = m.cfg, m.state
    test_loss, test_error = evaluate(m.model, data)
    entry = {"epoch": state["epoch"] + 1,
             "lr": cfg.lr * recipe.LR_DROP_FACTOR ** sum(state["epoch"] >= d for d in cfg.lr_drops),
             "train_loss": state["partial"]["ce"],
             "train_error": 100 * (1 - state["partial"]["acc"]),
             "test_loss": test_loss, "test_error": test_error,
             "seconds": state.pop("epoch_seconds")}
    images = state["partial"]["steps"] * cfg.batch_size * cfg.workers
    entry["images_per_second"] = images / max(entry["seconds"], 1e-9)
    state["history"].append(entry)
    state.update(epoch=state["epoch"] + 1, step=0, partial=None)
    # TensorBoard's own writer (no TensorFlow needed): scalars as tf.summary.scalar writes them.
    for key in ("train_loss", "train_error", "test_loss", "test_error", "lr", "images_per_second"):
        m.writer.add_scalar(key.replace("_", "/", 1) if key.startswith(("train", "test")) else key,
                            entry[key], entry["epoch"])
    m.writer.flush()
    print(f"{m.paths.name} epoch {entry['epoch']}/{cfg.epochs}  lr {entry['lr']:.4g}  "
          f"train loss {entry['train_loss']:.3f} err {entry['train_error']:.2f}%  "
          f"test loss {test_loss:.3f} err {test_error:.2f}%  "
          f"{entry['seconds']:.1f}s  {entry['images_per_second']:.0f} img/s", flush=True)


def save(m, data, devices, loop):
    """Member m's final evaluation, model and run record; its checkpoint goes."""
    from gnrepro import runfiles
    test_loss, test_error = evaluate(m.model, data)
    record = run_record(m, data, test_loss, test_error, devices, loop)
    model = m.model
    if len(devices) > 1 and backends.name() == "tensorflow":
        model = single_device_copy(model, m.cfg, record["config"]["steps_per_epoch"])
    runfiles.atomic_write(m.paths.model, lambda tmp: model.save(tmp))
    runfiles.write_json(m.paths.record, record)
    m.paths.checkpoint.unlink(missing_ok=True)
    print(f"{m.paths.name}: test error {test_error:.2f}% (median of the final 5 epochs "
          f"{record['median_last5_error']:.2f}%), saved {m.paths.model} and {m.paths.record}",
          flush=True)


def run_record(m, data, test_loss, test_error, devices, loop):
    """The run record (models/NAME.json): the configuration as it ran, the history, the final
    evaluation and the paper's statistic, the data, how it trained, and its provenance."""
    from gnrepro import cifar10, runfiles
    cfg, state = m.cfg, m.state
    step = cfg.batch_size * cfg.workers
    steps = cifar10.steps_per_epoch(len(data.y_train), step)
    return {
        "name": m.paths.name, "status": "finished",
        "config": {"run": asdict(cfg), "lr": cfg.lr, "lr_drops": cfg.lr_drops,
                   "schedule": cfg.schedule, "step_images": step, "steps_per_epoch": steps,
                   "lr_drop_steps": [d * steps for d in cfg.lr_drops], "steps": steps * cfg.epochs,
                   "lr_drop_factor": recipe.LR_DROP_FACTOR, "momentum": recipe.MOMENTUM,
                   "weight_decay": WEIGHT_DECAY, "bn_momentum": BN_MOMENTUM, "epsilon": EPSILON,
                   "moving_statistics": cfg.moving_statistics,
                   **{k: getattr(cfg, k) for k in ("norm", "groups", "channels_per_group",
                                                   "batch_size", "workers", "seed", "epochs",
                                                   "profile")},
                   "train_images": len(data.y_train), "test_images": len(data.y_test)},
        "history": state["history"],
        "test_error": test_error, "test_loss": test_loss,
        "median_last5_error": median_last5(state["history"]),
        "params": int(sum(np.prod(w.shape) for w in m.model.trainable_weights)),
        "wall_seconds": state["wall_seconds"],
        "images_per_second": state["train_images"] / max(state["train_seconds"], 1e-9),
        "data": {"checksum": data.checksum, "source": data.source, "official": data.official,
                 "train_images": len(data.y_train), "test_images": len(data.y_test)},
        "resumed": state["resumed"],
        "devices": devices,   # the last session's: a resumed run may have changed them
        "loop": loop,         # fit, or scan (backends.ScanLoop): the last session's
        "packed_with": state.get("packed_with", []),   # trained in one program with it
        # each session's stretch of training and where it ran (runfiles.open_segment); the
        # top-level provenance below is the last session's
        "segments": state.get("segments", []),
        "step_options": m.options,   # how the scan loop ran its step (loops.step_options)
        # XLA's flags (JAX): command buffers (CUDA graphs) and determinism are set there
        "xla_flags": os.environ.get("XLA_FLAGS", "") if backends.name() == "jax" else None,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **runfiles.session_provenance(state),   # the last session's, as it started
    }


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


def main(argv=None, stop=None, run=None):
    """The command line: one run, or a pack of its seeds (run: launch.before_backend's answer,
    where the script asked it before Keras started)."""
    from gnrepro import launch
    args, cfg, paths = run or launch.before_backend(argv, stop)
    backends.set_threads(args.threads)
    return train(recipe.pack_of(cfg, args.seeds, args.pack), args.data_dir, paths["models_dir"],
                 paths["logs_dir"], args.force, stop=stop, devices=args.devices, loop=args.loop,
                 options={"unroll": args.unroll} if args.unroll else None)


if __name__ == "__main__":
    from gnrepro.signals import exit_with
    exit_with(lambda: main(stop=_STOP, run=_RUN))
