"""ResNet-20 with BatchNorm or GroupNorm on CIFAR-10: one run of the sweep, resumable.

    python train.py --norm gn --batch-size 32 --seed 1   # one run (paper scale: 100 epochs, W 8)
    python train.py --norm bn --batch-size 4 --workers 8 # 8 workers of 4 images per step
    python train.py --task 7 [--devices 2]               # the 7th entry of the sweep grid
                                                         # (on 2 GPUs: see backends.py)
    KERAS_BACKEND=jax python train.py ...                # any Keras backend: TensorFlow
                                                         # (default), JAX, PyTorch
    python train.py --grid [--profile quick]             # print the grid (train.sh reads it)
    python train.py --profile quick                      # every grid entry at laptop scale,
                                                         # then reproduce.py and plot.py

A step takes W * N images (W workers of N, --workers, --batch-size); BatchNorm normalizes
each worker's N on its own, the gradient is over all W * N, as on the paper's 8 GPUs.
A run NAME (e.g. bn_b4_w8_s1; gn_b32_s1 at W = 1) writes models/NAME.keras (the final
model), models/NAME.json (its run record: configuration, per-epoch history, the paper's
statistic, provenance) and logs/NAME/ (TensorBoard scalars). It checkpoints to
models/checkpoints/ at every epoch end and, on SIGUSR1/SIGTERM, at the end of the current
compiled call (IMAGES_PER_EXECUTION images of steps under fit, IMAGES_PER_SCAN under JAX's
scan loop), then exits with status 75; rerunning the same command resumes and ends with the
same weights as an uninterrupted run (resumed on other --devices: up to float rounding).
"""
import argparse
import contextlib
import functools
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


class StopOnSignal:
    """SIGUSR1/SIGTERM ask the run to stop at the end of the current step (a context manager)."""
    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self):
        self.requested = None

    def handle(self, signum, frame):
        self.requested = signal.Signals(signum).name
        print(f"received {self.requested}: checkpointing at the end of the current call", flush=True)

    def __enter__(self):
        self.previous = {s: signal.signal(s, self.handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


if __name__ == "__main__":
    # Installed before the slow imports below, so that a signal during start-up is not fatal.
    _STOP = StopOnSignal().__enter__()


import keras  # noqa: E402
import numpy as np  # noqa: E402

import backends  # noqa: E402
import cifar10  # noqa: E402
import layer  # noqa: E402  (registers GroupNormalization for loading)

# ---------------------------------------------------------------------------
# The recipe (Wu & He 2018, Sec. 6.1, on He et al. 2015, Sec. 4.2) and the sweep grid.
# train.sh, the tests and the README read these; nothing copies them.
EPOCHS = 100                # training epochs
LR_PER_32 = 0.1             # learning rate for 32 images per worker, linear in N: 0.1 * N / 32,
                            #   whatever the number of workers W (the paper's rule at W = 8)
LR_DROPS = (30, 60, 90)     # epochs (of EPOCHS) after which the learning rate is divided by 10;
LR_DROP_FACTOR = 0.1        #   scaled proportionally when --epochs is not 100
MOMENTUM = 0.9              # SGD momentum
WEIGHT_DECAY = 1e-4         # on every weight, gamma and beta included (coupled, as in Caffe/Torch)
GROUPS = 8                  # GN groups: half the smallest width (16 channels)
BN_MOMENTUM = 0.9           # BN moving-average momentum (torch's 0.1 in Keras' convention)
EPSILON = 1e-5              # BN and GN epsilon, as in the paper's implementation and torch
EVAL_BATCH_SIZE = 1000      # evaluation batch (inference mode, so it does not change the result)
IMAGES_PER_EXECUTION = 64   # images per compiled call of fit: small batches run several steps
IMAGES_PER_SCAN = 8192      # images per compiled call of the JAX scan loop (--loop scan): few
                            #   calls per epoch, so a GPU is not bound by per-call dispatch
THREADS = 1                 # intra-op threads per process (TensorFlow, XLA on CPU, torch) (0: one per core): on a CPU,
                            #   small batches are op-overhead bound, and one thread halves their
                            #   CPU time per image (python bench.py train); more cores serve
                            #   more runs at once (train.sh's array tasks). Fixed, so that a
                            #   result does not depend on the machine's core count.

NORMS = ("bn", "gn")
BATCH_SIZES = (32, 16, 8, 4, 2)   # images per worker, Figure 1's x axis
SEEDS = (1, 2, 3)                 # three seeds, so the figure can show the spread
WORKERS = 8                       # workers W of the default sweep, the paper's 8 GPUs: a step
                                  #   takes W * N images, BN normalizes each N on its own

# A profile scales the whole experiment; "default" is the paper's scale and setting.
PROFILES = {
    "default": dict(epochs=EPOCHS, train_images=None, test_images=None, seeds=SEEDS,
                    workers=WORKERS),
    # Laptop scale: the whole grid (one seed, two runs at a time) in about 16 minutes on 2 CPU
    # cores: 6,000 training images (12 %), 5 epochs, 2,000 test images (all class-balanced).
    # W = 1 (BN over the whole step, as earlier single-device reproductions): at W = 8 a
    # small training set makes too few steps per epoch at N = 32 to learn anything.
    "quick": dict(epochs=5, train_images=6000, test_images=2000, seeds=(1,), workers=1),
}
PREEMPTED = 75              # exit status after a checkpoint on SIGUSR1/SIGTERM (EX_TEMPFAIL)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    norm: str = "gn"
    batch_size: int = 32
    seed: int = 1
    epochs: int = EPOCHS
    groups: int = GROUPS
    workers: int = 1                  # W: a step takes W * batch_size images (see WORKERS)
    train_images: int | None = None   # class-balanced subset of the training set; None = all
    test_images: int | None = None    # class-balanced subset of the test set; None = all
    profile: str = "default"
    jit_compile: bool = False         # XLA (GPU option; Keras' "auto" would turn it on there)
    mixed_precision: bool = False     # mixed_float16 (GPU option; GN and BN keep float32 stats)

    @property
    def name(self):
        workers = f"_w{self.workers}" if self.workers > 1 else ""
        return f"{self.norm}_b{self.batch_size}{workers}_s{self.seed}"

    @property
    def lr(self):
        # Per worker: the paper's 0.1 * N / 32 at W = 8 (0.1 per 256 images, Goyal et al.'s
        # reference), earlier reproductions' at W = 1; along Figure 1's axis, for any fixed W,
        # the rate stays proportional to the step's W * N images (the linear scaling rule).
        return LR_PER_32 * self.batch_size / 32

    @property
    def lr_drops(self):
        """Epoch boundaries of the schedule, scaled from LR_DROPS to self.epochs."""
        return [max(1, round(d * self.epochs / EPOCHS)) for d in LR_DROPS]


def grid(profile="default"):
    """The sweep, seed-major: entries 0-9 are seed 1 (bn then gn, batch 32 to 2), and so on."""
    p = PROFILES[profile]
    return [Config(norm=n, batch_size=b, seed=s, epochs=p["epochs"], workers=p["workers"],
                   train_images=p["train_images"], test_images=p["test_images"], profile=profile)
            for s in p["seeds"] for n in NORMS for b in BATCH_SIZES]


# ---------------------------------------------------------------------------
# The model: He et al. (2015) Section 4.2, conv -> norm -> ReLU.

def _l2():
    # Keras' L2(l) adds l * sum(w^2), whose gradient is 2 l w: half the decay gives decay * w.
    return keras.regularizers.L2(WEIGHT_DECAY / 2)


@keras.saving.register_keras_serializable(package="train")
class WorkerBatchNormalization(keras.layers.BatchNormalization):
    """BatchNorm as on `workers` workers that do not synchronize their statistics (the paper's
    BN: each of its 8 GPUs normalizes its own N images).

    Training: the batch is cut into `workers` equal consecutive slices, each normalized with
    its own mean and variance; the moving mean and variance are updated (with `momentum`)
    from the mean over the slices of the per-slice mean and (biased, as Keras' BN) variance,
    i.e. the average of what the workers' own moving averages would be. The update is linear
    in the statistics, so on K devices, each holding W / K slices, the cross-replica mean of
    the K updates is the same update. Inference: BatchNormalization, moving statistics.
    """

    def __init__(self, workers, **kwargs):
        if kwargs.get("axis", -1) != -1:
            raise ValueError(f"WorkerBatchNormalization normalizes the last axis (channels last), "
                             f"got axis={kwargs['axis']!r}")
        super().__init__(**kwargs)
        check_workers(workers)
        self.workers = workers

    def add_weight(self, *args, **kwargs):
        # Keras' BN leaves aggregation "none": under MirroredStrategy the moving statistics
        # would then keep one replica's update and drop the others' slices; "mean" averages them.
        if not kwargs.get("trainable", True):
            kwargs["aggregation"] = "mean"
        return super().add_weight(*args, **kwargs)

    def call(self, inputs, training=None, mask=None):
        if not (training and self.trainable) or self.workers == 1:
            return super().call(inputs, training=training, mask=mask)
        if mask is not None:
            raise ValueError(f"{self.name}: masks are not supported with several workers")
        batch = inputs.shape[0]
        if batch is not None and batch % self.workers:
            raise ValueError(f"{self.name}: a training batch of {batch} images cannot be cut "
                             f"into {self.workers} equal worker slices")
        ops = keras.ops
        x = ops.cast(inputs, keras.backend.result_type(inputs.dtype, "float32"))   # as Keras' BN
        slices = ops.reshape(x, (self.workers, -1, *x.shape[1:]))   # (W, N, H, W, C)
        axes = list(range(1, len(slices.shape) - 1))
        mean, variance = ops.moments(slices, axes=axes, keepdims=True)
        # ops.batch_normalization's own formula, written out: on JAX and PyTorch it reshapes
        # the statistics to the channel axis, and these are (W, 1, 1, 1, C).
        inv = ops.rsqrt(variance + self.epsilon)
        if self.scale:
            inv = inv * ops.cast(self.gamma, x.dtype)
        shift = -mean * inv
        if self.center:
            shift = shift + ops.cast(self.beta, x.dtype)
        y = slices * inv + shift
        for moving, stat in ((self.moving_mean, mean), (self.moving_variance, variance)):
            stat = ops.mean(ops.reshape(stat, (self.workers, -1)), axis=0)
            moving.assign(moving * self.momentum + stat * (1.0 - self.momentum))
        return ops.cast(ops.reshape(y, ops.shape(x)), self.compute_dtype)

    def get_config(self):
        return {**super().get_config(), "workers": self.workers}


def _norm(norm, groups, slices, zero_gamma, name):
    """slices: BN's worker slices per device; None for Keras' own BN (W = 1, one device),
    so that such models need nothing of this file to load."""
    gamma = "zeros" if zero_gamma else "ones"
    if norm == "bn":
        kind, extra = ((keras.layers.BatchNormalization, {}) if slices is None
                       else (WorkerBatchNormalization, dict(workers=slices)))
        return kind(momentum=BN_MOMENTUM, epsilon=EPSILON, gamma_initializer=gamma,
                    gamma_regularizer=_l2(), beta_regularizer=_l2(), name=name, **extra)
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
    y = norm_layer(False, f"{name}_norm1")(y)
    y = keras.layers.ReLU(name=f"{name}_relu1")(y)
    y = _conv(filters, 3, 1, f"{name}_conv2")(y)
    y = norm_layer(True, f"{name}_norm2")(y)   # gamma = 0: the block starts as identity
    if strides != 1 or x.shape[-1] != filters:
        x = _conv(filters, 1, strides, f"{name}_proj")(x)   # 1x1 projection where the shape changes
        x = norm_layer(False, f"{name}_proj_norm")(x)
    return keras.layers.ReLU(name=f"{name}_out")(keras.layers.Add(name=f"{name}_add")([x, y]))


def check_groups(groups):
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1 or 16 % groups:
        raise ValueError(f"groups should divide every stage's width (16, 32, 64), "
                         f"i.e. be 1, 2, 4, 8 or 16; got {groups!r}")


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
                 workers=1, devices=1):
    """ResNet-(6n+2) for CIFAR: 3 stages of n basic blocks with 16, 32, 64 filters.

    workers: W; in training, BN normalizes each of W equal slices of the step's batch on its
    own (WorkerBatchNormalization). devices: K, when the model is to be trained under a
    MirroredStrategy of K replicas, each of which sees W / K slices. Inference ignores both;
    GN ignores both (it is per image).
    """
    if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError(f"depth should be 6n+2 (20, 32, 44, ...), got {depth!r}")
    if norm not in NORMS:
        raise ValueError(f"norm should be one of {NORMS}, got {norm!r}")
    if norm == "gn":
        check_groups(groups)
    check_workers(workers, devices)
    slices = backends.slices_per_replica(workers, devices) if workers > 1 else None
    norm_layer = functools.partial(_norm, norm, groups, slices)
    inputs = keras.Input(input_shape, name="image")
    x = _conv(16, 3, 1, "stem_conv")(inputs)
    x = keras.layers.ReLU(name="stem_relu")(norm_layer(False, "stem_norm")(x))
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
    --mixed-precision (compile then adds loss scaling), float32 otherwise."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16" if cfg.mixed_precision else "float32")
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def build_model(cfg, devices=1):
    """cfg's ResNet-20, in cfg's precision, for `devices` devices (see build_resnet)."""
    with dtype_policy(cfg):
        return build_resnet20(cfg.norm, cfg.groups, cfg.workers, devices=devices)


# ---------------------------------------------------------------------------
# Data and evaluation (reproduce.py evaluates with these same functions).

@dataclass
class Data:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    mean: np.ndarray        # per-pixel mean of the training images used (He et al.)
    checksum: str           # sha256 of the whole data set as read, before any subset
    source: str
    official: bool          # 50,000 + 10,000 images, as the official release

    @functools.cached_property
    def padded(self):
        """The training images normalized and zero-padded, float32 (n, 40, 40, 3): the
        batches of every epoch are crops of it (cifar10.TrainBatches, backends.ScanLoop)."""
        return cifar10.padded(self.x_train, self.mean)

    @functools.cached_property
    def test_inputs(self):
        return cifar10.test_inputs(self.x_test, self.mean)


def prepare_data(data_dir=None, train_images=None, test_images=None):
    root = cifar10.locate(data_dir)
    with warnings.catch_warnings():   # a subset is fine here: the run record says so
        warnings.simplefilter("ignore", cifar10.SubsetWarning)
        x_train, y_train, x_test, y_test = cifar10.load(root)
    official = (len(y_train), len(y_test)) == (50000, 10000)
    checksum = cifar10.checksum(x_train, y_train, x_test, y_test)
    if train_images:
        x_train, y_train = cifar10.balanced_subset(x_train, y_train, train_images)
    if test_images:
        x_test, y_test = cifar10.balanced_subset(x_test, y_test, test_images)
    return Data(x_train, y_train, x_test, y_test, cifar10.pixel_mean(x_train), checksum,
                str(root), official)


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
# Files: every one written to a temporary name in the same folder, then renamed.

class Paths:
    def __init__(self, models_dir, logs_dir, name):
        self.models, self.name = Path(models_dir), name
        self.model = self.models / f"{name}.keras"
        self.record = self.models / f"{name}.json"
        self.checkpoint = self.models / "checkpoints" / f"{name}.npz"
        self.logs = Path(logs_dir) / name


def _atomic(path, write):
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
    _atomic(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=1) + "\n"))


def save_checkpoint(paths, model, state):
    arrays = {f"w{i}": w for i, w in enumerate(model.get_weights())}
    arrays |= {f"o{i}": np.asarray(v) for i, v in enumerate(model.optimizer.variables)}
    arrays["state"] = np.array(json.dumps(state))

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    _atomic(paths.checkpoint, write)


def load_checkpoint(paths, model, cfg):
    """Restore weights and optimizer state; return the saved state, or None without one."""
    if not paths.checkpoint.exists():
        return None
    with np.load(paths.checkpoint) as z:
        state = json.loads(str(z["state"]))
        if state["config"] != asdict(cfg):
            raise SystemExit(f"error: {paths.checkpoint} belongs to another configuration "
                             f"({state['config']}); rerun with --force to start afresh")
        model.set_weights([z[f"w{i}"] for i in range(len(model.weights))])
        for i, v in enumerate(model.optimizer.variables):
            v.assign(z[f"o{i}"])
    return state


def finished_record(paths, cfg):
    """The run record if this run already finished with this configuration, else None."""
    if not (paths.model.exists() and paths.record.exists()):
        return None
    record = json.loads(paths.record.read_text())
    if record.get("config", {}).get("run") != asdict(cfg):
        raise SystemExit(f"error: {paths.record} was trained with another configuration "
                         f"({record.get('config', {}).get('run')}); use --force to retrain it, "
                         f"or another --models-dir")
    return record


# ---------------------------------------------------------------------------
# One run.

class StepCallback(keras.callbacks.Callback):
    """Counts steps within the epoch, shows a progress bar on a terminal, honours the stop flag."""

    def __init__(self, stop, skip, total, progress):
        super().__init__()
        self.stop, self.skip, self.steps, self.total, self.logs = stop, skip, skip, total, {}
        self.bar = keras.utils.Progbar(total, stateful_metrics=["ce", "acc"]) if progress else None
        if self.bar and skip:
            self.bar.update(skip)

    def on_train_batch_end(self, batch, logs=None):
        # With steps_per_execution > 1, batch is the last step of the call just made.
        self.steps = min(self.total, self.skip + batch + 1)
        self.logs = {k: float(v) for k, v in (logs or {}).items()}
        if self.bar:
            self.bar.update(self.steps, [(k, self.logs[k]) for k in ("ce", "acc") if k in self.logs])
        if self.stop.requested:
            self.model.stop_training = True


def _merge(partial, steps, logs):
    """Epoch-so-far training metrics, merging those saved before a mid-epoch stop."""
    ce, acc = logs.get("ce", float("nan")), logs.get("acc", float("nan"))
    if partial:
        before = partial["steps"]
        ce = (partial["ce"] * before + ce * (steps - before)) / steps
        acc = (partial["acc"] * before + acc * (steps - before)) / steps
    return {"steps": steps, "ce": ce, "acc": acc}


class Batches(keras.utils.PyDataset):
    """cifar10.TrainBatches as Keras' backend-neutral input (one batch at a time, in order)."""

    def __init__(self, batches):
        super().__init__()
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        return self.batches[i]


def _fit_epoch(model, data, cfg, state, stop, progress, total):
    """The rest of the epoch through model.fit; (steps done, last logs)."""
    batches = cifar10.TrainBatches(data.padded, data.y_train, cfg.batch_size * cfg.workers,
                                   cfg.seed, state["epoch"], skip_batches=state["step"])
    callback = StepCallback(stop, state["step"], total, progress)
    model.fit(Batches(batches), epochs=1, verbose=0, shuffle=False, callbacks=[callback])
    return callback.steps, callback.logs


def scan_loop(model, padded, labels, batch):
    """backends.ScanLoop with IMAGES_PER_SCAN images of steps per call (at most an epoch)."""
    steps = max(1, min(cifar10.steps_per_epoch(len(labels), batch), IMAGES_PER_SCAN // batch))
    return backends.ScanLoop(model, padded, labels, batch, steps)


def _scan_epoch(model, data, cfg, state, stop, progress, total):
    """The rest of the epoch through backends.ScanLoop (JAX): (steps done, metrics)."""
    loop = getattr(model, "_scan_loop", None)   # compiled once per run
    if loop is None:
        loop = model._scan_loop = scan_loop(model, data.padded, data.y_train,
                                            cfg.batch_size * cfg.workers)
    bar = keras.utils.Progbar(total, stateful_metrics=["ce", "acc"]) if progress else None
    model.reset_metrics()
    draws = cifar10.epoch_draws(len(data.y_train), cfg.seed, state["epoch"])
    steps, logs = loop.run(draws, state["step"], total, lambda: bool(stop.requested))
    if bar:
        bar.update(steps, [(k, logs[k]) for k in ("ce", "acc") if k in logs])
    return steps, logs


def train_epoch(model, data, cfg, state, stop, progress, loop="fit"):
    """Train (the rest of) epoch state['epoch']; return True if it completed."""
    batch = cfg.batch_size * cfg.workers
    total = cifar10.steps_per_epoch(len(data.y_train), batch)
    skip = state["step"]
    start = time.perf_counter()
    steps, logs = (_scan_epoch if loop == "scan" else _fit_epoch)(
        model, data, cfg, state, stop, progress, total)
    seconds = time.perf_counter() - start
    state["train_seconds"] += seconds
    state["train_images"] += (steps - skip) * batch
    state["epoch_seconds"] = state.get("epoch_seconds", 0.0) + seconds
    state["partial"] = _merge(state["partial"], steps, logs)
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
    return {"git_commit": git_commit(), "versions": backends.versions(), "host": platform.node(),
            "cpus": os.cpu_count(), "gpus": backends.gpus(),
            "intra_op_threads": backends.intra_op_threads()}


def finish(paths, model, data, cfg, state, devices, loop):
    test_loss, test_error = evaluate(model, data)
    record = {
        "name": cfg.name, "status": "finished",
        "config": {"run": asdict(cfg), "lr": cfg.lr, "lr_drops": cfg.lr_drops,
                   "lr_drop_factor": LR_DROP_FACTOR, "momentum": MOMENTUM,
                   "weight_decay": WEIGHT_DECAY, "bn_momentum": BN_MOMENTUM, "epsilon": EPSILON,
                   "norm": cfg.norm, "groups": cfg.groups, "batch_size": cfg.batch_size,
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
        "jit_compile_used": bool(model.jit_compile),   # what Keras did with --jit-compile
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **provenance(),
    }
    if len(devices) > 1 and backends.name() == "tensorflow":
        steps = cifar10.steps_per_epoch(len(data.y_train), cfg.batch_size * cfg.workers)
        model = single_device_copy(model, cfg, steps)
    _atomic(paths.model, lambda tmp: model.save(tmp))
    write_json(paths.record, record)
    paths.checkpoint.unlink(missing_ok=True)
    print(f"{cfg.name}: test error {test_error:.2f}% (median of the final 5 epochs "
          f"{record['median_last5_error']:.2f}%), saved {paths.model} and {paths.record}", flush=True)
    return record


def train(cfg, data_dir=None, models_dir="models", logs_dir="logs", force=False, progress=None,
          stop=None, devices=None, loop="auto"):
    """Run (or resume) one configuration; return the process exit status (0, or PREEMPTED).

    devices: K, to train on K devices (see backends.pick_devices); the result is the same
    experiment. loop: "fit" (model.fit), "scan" (JAX only: backends.ScanLoop), or "auto"
    (scan on JAX with a GPU, fit elsewhere).
    """
    loop = resolve_loop(loop)
    paths = Paths(models_dir, logs_dir, cfg.name)
    if not force and finished_record(paths, cfg):
        print(f"{cfg.name}: already finished ({paths.model}); --force retrains it", flush=True)
        return 0
    progress = sys.stdout.isatty() if progress is None else progress
    if stop is None:
        with StopOnSignal() as stop:
            return _train(cfg, paths, data_dir, force, progress, stop, devices, loop)
    return _train(cfg, paths, data_dir, force, progress, stop, devices, loop)


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


def _train(cfg, paths, data_dir, force, progress, stop, devices=None, loop="fit"):
    backends.enable_determinism()
    keras.utils.set_random_seed(cfg.seed)
    names = backends.pick_devices(cfg.workers, devices)   # before the data: a wrong --devices fails fast
    if len(names) > 1 and loop == "scan":
        print(f"note: --loop scan is single-device; on {len(names)} devices the run uses fit",
              flush=True)
        loop = "fit"
    data = prepare_data(data_dir, cfg.train_images, cfg.test_images)
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
    with backends.distributed(names):   # variables on every device
        model = build_model(cfg, devices=len(names))
        compile_model(model, cfg, steps, devices=len(names))
    if force:
        paths.checkpoint.unlink(missing_ok=True)
    state = load_checkpoint(paths, model, cfg)
    if state:
        state["resumed"] += 1
        print(f"{cfg.name}: resuming at epoch {state['epoch'] + 1}, step {state['step']} "
              f"from {paths.checkpoint}", flush=True)
    else:
        state = {"config": asdict(cfg), "epoch": 0, "step": 0, "partial": None, "history": [],
                 "train_seconds": 0.0, "train_images": 0, "wall_seconds": 0.0, "resumed": 0}
    import tensorboard.summary
    writer = tensorboard.summary.Writer(str(paths.logs))
    while state["epoch"] < cfg.epochs:
        start = time.perf_counter()
        done = not stop.requested and train_epoch(model, data, cfg, state, stop, progress, loop)
        if done:
            end_epoch(model, data, cfg, state, writer)
        state["wall_seconds"] += time.perf_counter() - start
        save_checkpoint(paths, model, state)
        if stop.requested:
            print(f"{cfg.name}: checkpointed at epoch {state['epoch'] + 1}, step {state['step']} "
                  f"({paths.checkpoint}); exiting with status {PREEMPTED}", flush=True)
            return PREEMPTED
    finish(paths, model, data, cfg, state, names, loop)
    return 0


# ---------------------------------------------------------------------------
# Command line.

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:12]))
    what = p.add_argument_group("what to run")
    what.add_argument("--task", type=int, help="run the I-th entry of the sweep grid (see --grid)")
    what.add_argument("--grid", action="store_true", help="print the sweep grid and exit")
    what.add_argument("--profile", choices=sorted(PROFILES),
                      help="scale of the experiment; alone, runs its whole grid, then reproduce.py "
                           "and plot.py (default profile: the paper's scale)")
    run = p.add_argument_group("one run (override the profile's or the grid entry's settings)")
    run.add_argument("--norm", choices=NORMS)
    run.add_argument("--batch-size", type=int, help="images per worker, N")
    run.add_argument("--workers", type=int,
                     help=f"W workers of N images per step, BN statistics per worker "
                          f"(default: the profile's; {WORKERS} at the paper's scale)")
    run.add_argument("--seed", type=int)
    run.add_argument("--epochs", type=int, help=f"training epochs (default {EPOCHS})")
    run.add_argument("--groups", type=int, help=f"GroupNorm groups (default {GROUPS})")
    run.add_argument("--train-images", type=int, help="class-balanced subset of K training images")
    run.add_argument("--test-images", type=int, help="class-balanced subset of the test images")
    io = p.add_argument_group("files")
    io.add_argument("--data-dir", help="folder with cifar-10-batches-py/ or cifar-10-python.tar.gz "
                                       "(default: $CIFAR10_DIR, else the Keras cache, downloading)")
    io.add_argument("--models-dir", default="models")
    io.add_argument("--logs-dir", default="logs")
    io.add_argument("--results", default="results.csv", help="(whole profile) results file")
    io.add_argument("--plot", default="plot.png", help="(whole profile) figure file")
    io.add_argument("--label", help="(whole profile) names the data in the figure's title, "
                                    "e.g. 'CIFAR-10 (JPEG copy)'")
    p.add_argument("--devices", type=int,
                   help="K devices (GPUs): TensorFlow's MirroredStrategy or JAX's DataParallel, "
                        "each holding W / K workers: the same experiment (default: as many "
                        "visible GPUs as divide W)")
    p.add_argument("--force", action="store_true", help="retrain a finished run, drop a checkpoint")
    p.add_argument("--loop", choices=("auto", "fit", "scan"), default="auto",
                   help="training loop: model.fit, or (JAX) several steps fused per compiled call "
                        "(backends.ScanLoop); auto: scan on JAX with a GPU, fit elsewhere")
    p.add_argument("--jobs", type=int, help="(whole profile) runs at a time (default: one per "
                                            "core on a CPU, 1 with a GPU)")
    p.add_argument("--threads", type=int, default=THREADS,
                   help=f"intra-op threads per process (TensorFlow, XLA on a CPU, torch), "
                        f"0 = one per core "
                        f"(default {THREADS}: see THREADS in train.py)")
    gpu = p.add_argument_group("speed options for GPUs (off by default; see python bench.py train)")
    gpu.add_argument("--jit-compile", action="store_true",
                     help="compile the training step with XLA (TensorFlow; JAX always does)")
    gpu.add_argument("--mixed-precision", action="store_true",
                     help="mixed_float16: float16 convolutions, float32 weights, normalization "
                          "statistics and logits, loss scaling")
    args = p.parse_args(argv)
    if args.threads < 0:
        p.error(f"--threads must be 0 (one per core) or a positive integer, got {args.threads}")
    for name in ("batch_size", "workers", "devices", "epochs", "groups", "train_images",
                 "test_images", "jobs"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    return p, args


def resolve(p, args):
    """The Config that the arguments ask for: grid entry or profile defaults, then overrides."""
    profile = args.profile or "default"
    entries = grid(profile)
    if args.task is not None:
        if not 0 <= args.task < len(entries):
            p.error(f"--task {args.task} is outside the {profile} grid (0-{len(entries) - 1}); "
                    f"see python train.py --grid --profile {profile}")
        cfg = entries[args.task]
    else:
        if args.norm is None or args.batch_size is None:
            p.error("give --norm and --batch-size (and --seed), or --task I, or --profile alone")
        cfg = replace(entries[0], seed=PROFILES[profile]["seeds"][0])
    overrides = {k: getattr(args, k) for k in ("norm", "batch_size", "workers", "seed", "epochs",
                                               "groups", "train_images", "test_images")
                 if getattr(args, k) is not None}
    overrides |= {k: True for k in ("jit_compile", "mixed_precision") if getattr(args, k)}
    cfg = replace(cfg, **overrides)
    try:
        check_groups(cfg.groups)
    except ValueError as e:
        p.error(f"--groups: {e}")
    if args.devices and cfg.workers % args.devices:
        p.error(f"--devices {args.devices} should divide the workers W = {cfg.workers} "
                f"(each device holds W / K workers)")
    return cfg


def print_grid(profile):
    entries = grid(profile)
    print(f"# {len(entries)} runs, profile {profile} "
          f"({len(PROFILES[profile]['seeds'])} seeds x {len(NORMS)} norms x "
          f"{len(BATCH_SIZES)} batch sizes, {PROFILES[profile]['workers']} workers)")
    for i, c in enumerate(entries):
        print(f"{i} {c.name} --norm {c.norm} --batch-size {c.batch_size} --workers {c.workers} "
              f"--seed {c.seed}")


def _forwarded(args):
    """The arguments that a grid entry's own process needs to run as this one would."""
    out = ["--profile", args.profile]
    for name in ("epochs", "groups", "workers", "train_images", "test_images", "data_dir",
                 "models_dir", "logs_dir", "threads", "devices", "loop"):
        if getattr(args, name, None) is not None:
            out += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    return out + [f"--{f.replace('_', '-')}" for f in ("force", "jit_compile", "mixed_precision")
                  if getattr(args, f, False)]


def _default_jobs(args):
    # One single-threaded run per core on a CPU; one at a time where a GPU is to be shared.
    if backends.gpus() or not args.threads:
        return 1
    return max(1, (os.cpu_count() or 1) // args.threads)


def _relay(proc):
    for line in proc.stdout:
        print(line, end="", flush=True)


def run_entries(args, stop):
    """Train every grid entry of the profile, args.jobs processes at a time; an exit status."""
    import threading
    jobs = args.jobs or _default_jobs(args)
    # Longest runs (smallest batches) first, so parallel processes finish together.
    order = sorted(range(len(grid(args.profile))), key=lambda i: grid(args.profile)[i].batch_size)
    print(f"profile {args.profile}: {len(order)} runs, {jobs} at a time", flush=True)
    running, failed = [], []
    while order or running:
        while order and len(running) < jobs and not stop.requested:
            task = order.pop(0)
            proc = subprocess.Popen([sys.executable, "-u", __file__, "--task", str(task),
                                     *_forwarded(args)], stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
            running.append((task, proc, threading.Thread(target=_relay, args=(proc,), daemon=True)))
            running[-1][2].start()
        if stop.requested:
            order = []
            for _, proc, _ in running:
                proc.send_signal(signal.SIGUSR1)   # each checkpoints and exits with PREEMPTED
        time.sleep(0.2)
        for entry in [r for r in running if r[1].poll() is not None]:
            running.remove(entry)
            entry[2].join()
            if entry[1].returncode:
                failed.append((entry[0], entry[1].returncode))
    if stop.requested:
        return PREEMPTED
    for task, code in failed:
        print(f"profile {args.profile}: grid entry {task} failed (exit status {code})", flush=True)
    return 1 if failed else 0


def run_profile(args, stop):
    """Every grid entry of the profile, then reproduce.py and plot.py (the main job)."""
    start = time.perf_counter()
    code = run_entries(args, stop)
    if code:
        return code
    here = Path(__file__).resolve().parent
    data = ["--data-dir", args.data_dir] if args.data_dir else []
    label = ["--label", args.label] if args.label else []
    # The paper's statistic is the median of the final 5 of 100 epochs; in a run of a few
    # epochs those 5 include its first ones, so a reduced profile plots the final error.
    metric = [] if grid(args.profile)[0].epochs >= 20 else ["--metric", "test_error"]
    plot = Path(args.plot)   # plot.png -> curves.png, plot-quick.png -> curves-quick.png
    curves = str(plot.with_name(plot.name.replace("plot", "curves", 1) if "plot" in plot.name
                                else f"{plot.stem}-curves.png"))
    for cmd in ([here / "reproduce.py", "--models-dir", args.models_dir, "--out", args.results, *data],
                [here / "plot.py", "--results", args.results, "--out", args.plot, *label, *metric],
                [here / "plot.py", "--curves", "--models-dir", args.models_dir, "--out", curves, *label]):
        code = subprocess.run([sys.executable, *map(str, cmd)]).returncode
        if code:
            return code
    print(f"profile {args.profile}: done in {(time.perf_counter() - start) / 60:.1f} min: "
          f"{args.results}, {args.plot}, {curves}", flush=True)
    return 0


def main(argv=None, stop=None):
    p, args = parse_args(argv)
    backends.set_threads(args.threads)
    if args.grid:
        print_grid(args.profile or "default")
        return 0
    singles = ("task", "norm", "batch_size", "seed")
    if args.profile and all(getattr(args, k) is None for k in singles):
        if stop is None:
            with StopOnSignal() as stop:
                return run_profile(args, stop)
        return run_profile(args, stop)
    cfg = resolve(p, args)
    return train(cfg, args.data_dir, args.models_dir, args.logs_dir, args.force, stop=stop,
                 devices=args.devices, loop=args.loop)


if __name__ == "__main__":
    sys.exit(main(stop=_STOP))
