"""Performance measurements, printed side by side (timing is not a test).

    python bench.py train [--quick] [--workers 1 8] [--threads T] [--mixed-precision]
    python bench.py backends [--backends tensorflow jax torch] [--python-jax PATH] [--cpus K]
    python bench.py malloc [--batch-sizes 8] [--workers 8] [--python-tensorflow PATH]
    python bench.py layer [--batch-sizes 2 32 128] [--repeats 7] [--steps 20]
    python bench.py input [--epoch-seconds 6] [--steps 30] [--repeats 5] [--test-images 10000]
                          [--threads T]
    KERAS_BACKEND=jax python bench.py loop [--loops scan fit] [--precisions float32 mixed]
    KERAS_BACKEND=jax python bench.py pack [--pack 3] [--batch-sizes 32 16 8 4 2]
                          [--variants float32 unroll4 bf16] [--xla-flags FLAGS]
    python bench.py plan --step-ms IMAGES=MS ... [--processes K --speedup X]
                         [--session-minutes M] [--pack-cost 1.0]   # GPU minutes left

`train` (on the backend of KERAS_BACKEND: tensorflow, jax or torch; the default is
tensorflow where it is installed, else jax): training throughput (images per second after
warm-up) of train.py's ResNet-20 with BN and with GN at batch sizes N = 32 to 2 and W
workers, trained as train.py trains it (build_model, compile_model, backends.fit_input of
loops.Batches of cifar10.TrainBatches, loops.StepCallback), and in the same run a plain
baseline: the same architecture with keras.layers.BatchNormalization (over all W * N images
of a step) / GroupNormalization, compiled with SGD and Keras' defaults (one step per call),
fed from NumPy arrays by model.fit with default settings (verbose=0). Each configuration is built,
compiled and run once untimed first; the configurations are interleaved in every repeat
(a busy CPU slows them alike); the table shows medians, the ratios to the baseline,
GN/BN, each batch size against 32, the cores kept busy (process CPU seconds per second),
the rate of train.evaluate's inference (predict on the test inputs, in batches of
recipe.EVAL_BATCH_SIZE) and the wall time of the full sweep (train.py's grid, 100 epochs of
50,000 training and 10,000 test images) at those rates. The images are synthetic (speed
does not depend on them), so no data set is needed. Intra-op threads are set per process
(backends.set_threads), so the baseline runs with train.py's THREADS too (compare
--threads 0 for the library's default).

`backends`: `train`'s measurement of ours on several backends side by side, in one run:
one worker process per backend (`bench.py train --serve`, with that backend's Python:
this one for TensorFlow, .venv-backends' for JAX and torch where it exists, or
--python-BACKEND), each with the same --threads. That is a library setting, and not every
library keeps to it (the cores column shows what each used); --cpus K pins every worker,
all its threads, to the same K cores. The workers start one after the other
(building, compiling, warming up), then every repeat visits each configuration on each
backend in turn, the backends' order rotating between repeats, while the other workers
wait: a busy CPU slows all alike. One table: rows (norm, N, W), img/s of each backend,
the ratios to the first backend, the cores each kept busy; then evaluation's img/s.

`malloc`: TensorFlow only, `train`'s measurement of ours in two worker processes side by
side, interleaved as `backends` runs them: one as train.py runs, one with the C library's
setting that TensorFlow leaves. The first tf.data generator of a process (backends.fit_input
makes one of the batches that train.py feeds fit) sets glibc's mmap threshold to 128 KiB for
good, so every larger tensor is mapped, page-faulted in and unmapped each step; train.py spends that
patch at its start, puts the threshold at 32 MiB and has glibc keep its heaps
(backends.undo_malloc_patch, keep_heap). The table:
img/s of each, their ratio, and the share of each worker's CPU time spent in the kernel.

`layer`: forward plus backward (gradients for the input and the weights) of
layer.GroupNormalization, keras.layers.GroupNormalization and
keras.layers.BatchNormalization (training=True) on the three ResNet-20 feature-map
shapes, compiled as training compiles them (tf.function under TensorFlow, jax.jit
under JAX; eager under PyTorch, as Keras' torch trainer runs). Warm-up excluded; the
three layers are interleaved in every repeat so a busy CPU slows all of them alike,
and the table shows medians over repeats and the ratios to BatchNormalization.

`input`: TensorFlow only, the wall time of whole calls of fit (one epoch) and predict, fed as
train.py feeds them (backends.fit_input, backends.predict: tf.data without its autotuning)
against Keras' own feeding (fit on the PyDataset, predict on the NumPy array), interleaved in
every repeat. fit trains a one-layer model on --steps batches that take --epoch-seconds / steps
each to make (sleeping), so the work of an epoch is known; predict is train.evaluate's, ResNet-20
(GN) on --test-images synthetic test inputs. Keras' own feeding often ends a call only when
tf.data's tuning thread next wakes (10 ms, doubling to 60 s). The table: median and longest call
of each, and the ratio of Keras' own median to train.py's.

`loop`: JAX only, the scan loop (backends.ScanLoop) against fit, as a GPU runs the sweep.

`pack`: JAX only, a pack of K seeds (one compiled program, backends.ScanLoop over K stacked
states, as train.py --pack trains them) against one run alone, side by side for each N:
images per second (all of the pack's members together) and milliseconds a step, for each
step-cost variant (float32; unroll4: lax.scan unrolled 4 steps an iteration; bf16: mixed
bfloat16 with float32 statistics, weights and loss), the median of --calls calls of --steps
steps after the first (compilation; its seconds are shown). XLA flags (command buffers:
--xla-flags "--xla_gpu_enable_command_buffer=+WHILE") are per process: compare two runs.

`plan`: no measurement; the GPU minutes that the paper-scale grids still need (the entries
without a run record in their models folder) at the step times measured on your card:
--step-ms IMAGES=MS, the milliseconds of a training step of IMAGES (W * N) images at two step
sizes or more (`bench.py pack`'s solo ms, or 1000 * W * N / `bench.py loop`'s img/s), linear in
the step's images between and beyond them; per norm with --step-ms-bn and --step-ms-gn (GN's
for LN and IN too). Evaluation counts at EVAL_SPEEDUP times the training rate of the largest
measured step. --processes K --speedup X: K processes at once train X times one's img/s;
--session-minutes M: how many sessions of M minutes of training the work takes with them, on a
GPU held for a limited time (a cloud spot instance, a time-limited notebook), one run a process
or packs of the seeds (whose step costs --pack-cost solo steps: measure it with `bench.py
pack`); without it the sessions columns show '-'. For example, at the figures measured on an
NVIDIA H200 with JAX 0.11.2 on 2026-11-27 (`bench.py loop`, the scan loop at W = 8, float32, one
process: BN 6,261 and GN 6,325 img/s at 16 images a step, 44,024 and 41,192 at 256; and 4
processes at once 1.8x one), in sessions of 10 minutes of training:

    python bench.py plan --step-ms-bn 16=2.56 256=5.82 --step-ms-gn 16=2.53 256=6.21 \
        --processes 4 --speedup 1.8 --session-minutes 10

Writes nothing; prints the tables to stdout.
"""
import argparse
import bisect
import contextlib
import importlib.util
import inspect
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND",
                      "tensorflow" if importlib.util.find_spec("tensorflow") else "jax")
PIN = "BENCH_PIN_CPUS"   # bench.py backends --cpus: a worker's cores, e.g. "0"
if os.environ.get(PIN):   # pinned before any library starts a thread: every thread inherits it
    os.sched_setaffinity(0, [int(c) for c in os.environ[PIN].split(",")])

from gnrepro import startup  # noqa: E402  (before Keras: its start-up chatter off)

with startup.quiet():
    import keras  # noqa: E402
import numpy as np  # noqa: E402

from gnrepro import loops, recipe  # noqa: E402

FEATURE_MAPS = [(32, 32, 16), (16, 16, 32), (8, 8, 64)]  # ResNet-20's three stages
GROUPS = 8  # what train.py uses
EVAL_IMAGES = 2000  # test inputs of the evaluation rate (the first of the synthetic images)


def candidates():
    """name -> a fresh, unbuilt normalization layer; BatchNorm last, the baseline."""
    import layer
    return {"this GN": lambda: layer.GroupNormalization(groups=GROUPS, epsilon=1e-5),
            "keras GN": lambda: keras.layers.GroupNormalization(groups=GROUPS, epsilon=1e-5),
            "keras BN": lambda: keras.layers.BatchNormalization(epsilon=1e-5)}


def train_step(norm, x):
    """A compiled function: the loss sum(y * w) and its gradients for x and the weights."""
    norm.build(x.shape)
    w = keras.ops.convert_to_tensor(np.random.default_rng(1).normal(size=x.shape), "float32")
    backend = keras.backend.backend()
    steps = {"tensorflow": _tf_step, "jax": _jax_step, "torch": _torch_step}
    if backend not in steps:
        raise ValueError(f"bench.py supports tensorflow, jax and torch, not {backend}")
    return steps[backend](norm, x, w)


def _tf_step(norm, x, w):
    import tensorflow as tf

    @tf.function(jit_compile=False)  # Keras' "auto" picks no XLA on a CPU
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(norm(x, training=True) * w)
        return tape.gradient(loss, [x] + norm.trainable_variables)
    return lambda: step(x)  # TF runs ops synchronously on the CPU


def _jax_step(norm, x, w):
    import jax
    state = [v.value for v in norm.trainable_variables]
    others = [v.value for v in norm.non_trainable_variables]

    # stateless_call passes keywords straight to call(), which GN's lacks.
    takes_training = "training" in inspect.signature(norm.call).parameters
    kwargs = {"training": True} if takes_training else {}

    def loss(trainable, x):
        y, _ = norm.stateless_call(trainable, others, x, **kwargs)
        return (y * w).sum()
    step = jax.jit(jax.grad(loss, argnums=(0, 1)))
    return lambda: jax.block_until_ready(step(state, x))


def _torch_step(norm, x, w):
    x = x.clone().requires_grad_(True)

    def step():
        loss = (norm(x, training=True) * w).sum()
        return loss.backward()   # eager, as Keras' torch trainer runs
    return step


def seconds_per_step(step, steps):
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def bench_layer(args):
    """Median milliseconds per step of each candidate on each shape; prints a table."""
    keras.utils.set_random_seed(0)
    makers = candidates()
    shapes = [(n, *hwc) for n in args.batch_sizes for hwc in FEATURE_MAPS]
    steps = {}
    for shape in shapes:
        x = keras.ops.convert_to_tensor(np.random.default_rng(0).normal(size=shape), "float32")
        for name, make in makers.items():
            steps[shape, name] = train_step(make(), x)
            for _ in range(3):  # warm-up: tracing, compilation, allocator
                steps[shape, name]()
    times = {key: [] for key in steps}
    for _ in range(args.repeats):
        for shape in shapes:
            for name in makers:  # interleaved: each repeat visits every candidate
                times[shape, name].append(seconds_per_step(steps[shape, name], args.steps))
    print_table(shapes, list(makers), {k: 1e3 * statistics.median(v) for k, v in times.items()})


def print_table(shapes, names, ms):
    baseline = names[-1]
    head = f"{'shape (N,H,W,C)':<20}" + "".join(f"{n + ' ms':>12}" for n in names)
    head += "".join(f"{n + '/BN':>12}" for n in names[:-1])
    print(head)
    for shape in shapes:
        row = f"{str(shape):<20}" + "".join(f"{ms[shape, n]:>12.3f}" for n in names)
        row += "".join(f"{ms[shape, n] / ms[shape, baseline]:>12.2f}" for n in names[:-1])
        print(row)


# ---------------------------------------------------------------- bench.py train

class Throughput(keras.callbacks.Callback):
    """Images per second from the first call that ends after `warmup` seconds of fit to
    the first that ends `seconds` later, then stops fit. Counts across epochs. `cores`: the
    process's CPU seconds per second over the same span (how many cores the backend's
    threads and the input pipeline kept busy between them)."""

    def __init__(self, images_per_step, warmup, seconds):
        super().__init__()
        self.images_per_step, self.warmup, self.seconds = images_per_step, warmup, seconds

    def on_train_begin(self, logs=None):
        self.begin, self.steps, self.start, self.end = time.perf_counter(), 0, None, None

    def on_epoch_begin(self, epoch, logs=None):
        self.last = -1

    def on_train_batch_end(self, batch, logs=None):
        # Once per compiled call; batch is the call's last step within the epoch.
        now, self.steps, self.last = time.perf_counter(), self.steps + batch - self.last, batch
        if self.start is None:
            if now - self.begin >= self.warmup:
                self.start = now, self.steps, time.process_time()
        elif now - self.start[0] >= self.seconds:
            self.end = now, self.steps, time.process_time()
            self.model.stop_training = True

    @property
    def rate(self):
        (t0, s0, _), (t1, s1, _) = self.start, self.end
        return (s1 - s0) * self.images_per_step / (t1 - t0)

    @property
    def cores(self):
        (t0, _, c0), (t1, _, c1) = self.start, self.end
        return (c1 - c0) / (t1 - t0)


class NoStop:
    requested = None   # loops.StepCallback's stop flag, never raised here


def synthetic(images, seed=0):
    """CIFAR-shaped uint8 images and labels: the speed does not depend on the pixels."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (images, 32, 32, 3), dtype=np.uint8)
    return x, rng.integers(0, 10, images)


class Images:
    """Synthetic training images as train.py prepares a run's data: the padded set that
    every epoch's batches are cut from (one copy, shared by every configuration), and the
    test inputs that evaluation predicts on (the first `test` images, unaugmented)."""

    def __init__(self, images, test=EVAL_IMAGES, seed=0):
        from gnrepro import cifar10
        self.x, self.y = synthetic(images, seed)
        self.mean = cifar10.pixel_mean(self.x)
        self.padded = cifar10.padded(self.x, self.mean)
        self.test_inputs = cifar10.test_inputs(self.x[:test], self.mean)


def ours(norm, batch_size, workers, args, data):
    """fit(callback) for train.py's model, compiled and fed as loops.fit_epoch does:
    build_model, compile_model, backends.fit_input of loops.Batches of cifar10.TrainBatches,
    loops.StepCallback."""
    from gnrepro import backends, cifar10
    import train
    cfg = recipe.Config(norm=norm, batch_size=batch_size, workers=workers,
                        mixed_precision=args.mixed_precision)
    step = batch_size * workers
    total = cifar10.steps_per_epoch(len(data.y), step)
    model = train.build_model(cfg)
    train.compile_model(model, cfg, total)
    batches = backends.fit_input(
        loops.Batches(cifar10.TrainBatches(data.padded, data.y, step, cfg.seed, 0)))
    steps = loops.StepCallback(NoStop(), 0, total, False)

    def fit(callback):
        # train.py calls fit once per epoch on that epoch's batches; this fit goes over epoch
        # 0's again and again until the callback stops it (the same batches, as fast).
        model.fit(batches, epochs=10**6, verbose=0, shuffle=False, callbacks=[steps, callback])
    return model, fit


def keras_norm(layer_):
    """clone_model's clone_function: train.py's norm layers become Keras' own."""
    import layer
    config = layer_.get_config()
    if isinstance(layer_, keras.layers.BatchNormalization):   # WorkerBatchNormalization too
        for ours in ("workers", "moving_statistics"):   # Keras' BN: one batch, its own rule
            config.pop(ours, None)
        return keras.layers.BatchNormalization.from_config(config)
    if isinstance(layer_, layer.GroupNormalization):
        return keras.layers.GroupNormalization.from_config(config)
    return layer_.__class__.from_config(config)


def baseline(norm, batch_size, workers, args, data):
    """fit(callback) for the plain baseline: the same architecture with Keras' BN (over the
    whole step of W * N images) or GN, SGD with Keras' default compile settings, NumPy
    arrays, model.fit's defaults."""
    from gnrepro import cifar10
    import train
    cfg = recipe.Config(norm=norm, batch_size=batch_size)
    model = keras.models.clone_model(train.build_resnet20(norm, recipe.GROUPS),
                                     clone_function=keras_norm)
    model.compile(optimizer=keras.optimizers.SGD(cfg.lr, momentum=recipe.MOMENTUM),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    images = cifar10.normalize(data.x, data.mean)

    def fit(callback):
        model.fit(images, data.y, batch_size=batch_size * workers, epochs=10**6, verbose=0,
                  callbacks=[callback])
    return model, fit


KINDS = {"ours": ours, "keras": baseline}


def configurations(args):
    """(norm, N, W) of every measured run, in the order of the tables."""
    return [(norm, n, w) for norm in args.norms for w in args.workers for n in args.batch_sizes]


def prepare(args, data, kinds):
    """{(norm, N, W, kind): (model, fit)}, each built, compiled and run once untimed
    (tracing, compilation, the first steps) for `args.warmup` seconds after its first call."""
    runs = {}
    for norm, n, w in configurations(args):
        for kind in kinds:
            model, fit = KINDS[kind](norm, n, w, args, data)
            fit(Throughput(n * w, 0.0, args.warmup))
            runs[norm, n, w, kind] = model, fit
    return runs


def measure(runs, key, args):
    """(img/s, cores) of one timed fit of runs[key], after its own warm-up seconds."""
    timer = Throughput(key[1] * key[2], args.warmup, args.seconds)
    runs[key][1](timer)
    return timer.rate, timer.cores


def eval_rate(model, data, repeats=2, warmup=True):
    """Images per second of train.evaluate's inference pass (predict on the test inputs in
    batches of recipe.EVAL_BATCH_SIZE); median of `repeats`, after one untimed pass."""
    from gnrepro import backends

    def predict():
        backends.predict(model, data.test_inputs, recipe.EVAL_BATCH_SIZE)
    if warmup:
        predict()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        predict()
        times.append(time.perf_counter() - start)
    return len(data.test_inputs) / statistics.median(times)


def medians(samples, column=1):
    """{key: [(rate, cores, ...), ...]} -> ({key: median rate}, {key: median of the column,
    cores by default})."""
    return ({k: statistics.median(r[0] for r in v) for k, v in samples.items()},
            {k: statistics.median(r[column] for r in v) for k, v in samples.items()})


def threads_line(args):
    from gnrepro import backends
    return (f"intra-op threads {backends.intra_op_threads()} (--threads {args.threads}; "
            f"0: one per core), set by backends.set_threads")


def speed_line():
    """How ours runs its step here (train.compile_model's jit_compile: backends.jit_compile)."""
    from gnrepro import backends
    return {"tensorflow": "tf.function without XLA (TensorFlow's op determinism rules it out)",
            "jax": "jitted (always on JAX)",
            "torch": "eager (Keras' torch trainer)"}[backends.name()]


def bench_train(args):
    """Interleaved throughput of every (norm, N, W, ours/baseline); prints the tables."""
    from gnrepro import backends
    backends.set_threads(args.threads)   # before the backend starts; one process: baseline too
    backends.enable_determinism()        # as train.py runs
    backends.undo_malloc_patch()         # as train.py runs
    keras.utils.set_random_seed(0)
    data = Images(args.images)
    runs = prepare(args, data, KINDS)
    print(f"{threads_line(args)}, and backends.enable_determinism() as train.py: ours and "
          f"keras alike; ours: {speed_line()}, mixed_precision={args.mixed_precision}")
    samples = {key: [] for key in runs}
    for _ in range(args.repeats):
        for key in runs:   # interleaved: each repeat visits every one
            samples[key].append(measure(runs, key, args))
    rate, cores = medians(samples)
    evals = {norm: eval_rate(runs[norm, args.batch_sizes[0], args.workers[0], "ours"][0], data)
             for norm in args.norms}
    print_train_table(args, rate, cores, evals)
    print_sweep(args, rate, evals)


def print_train_table(args, rate, cores, evals):
    top = max(args.batch_sizes)
    print(f"{'norm':<5}{'N':>4}{'W':>3}{'ours img/s':>12}{'keras img/s':>13}{'ours/keras':>12}"
          f"{'GN/BN':>7}{'keras GN/BN':>13}{f'N/{top}':>7}{f'keras N/{top}':>14}"
          f"{'ours cores':>12}{'keras cores':>13}")
    for norm, n, w in configurations(args):
        o, k = rate[norm, n, w, "ours"], rate[norm, n, w, "keras"]
        gn_bn = [f"{rate['gn', n, w, c] / rate['bn', n, w, c]:.2f}"
                 if {"bn", "gn"} <= set(args.norms) else "-" for c in ("ours", "keras")]
        print(f"{norm:<5}{n:>4}{w:>3}{o:>12.0f}{k:>13.0f}{o / k:>12.2f}"
              f"{gn_bn[0]:>7}{gn_bn[1]:>13}{o / rate[norm, top, w, 'ours']:>7.2f}"
              f"{k / rate[norm, top, w, 'keras']:>14.2f}"
              f"{cores[norm, n, w, 'ours']:>12.2f}{cores[norm, n, w, 'keras']:>13.2f}")
    print(f"evaluation (train.evaluate's inference, batch {recipe.EVAL_BATCH_SIZE}): "
          + ", ".join(f"{norm} {r:.0f} img/s" for norm, r in evals.items()))
    print(f"{args.images} synthetic images; medians of {args.repeats} interleaved repeats of "
          f"{args.seconds:g} s after {args.warmup:g} s of warm-up each; cores: the process's "
          f"CPU seconds per wall second (under 1 where it waited, for the CPU on a busy machine "
          f"or for its input)")


def print_sweep(args, rate, evals):
    """Wall time of train.py's grid at these rates: EPOCHS epochs of the official set."""
    from gnrepro import cifar10
    runs = sorted({(c.norm, c.batch_size) for c in recipe.grid() if c.seed == recipe.SEEDS[0]})
    norms = sorted({norm for norm, _ in runs})   # Figure 1's: bn and gn
    if not {(norm, n) for norm in args.norms for n in args.batch_sizes} >= set(runs):
        print(f"sweep estimate: needs every norm {norms} and batch size {recipe.BATCH_SIZES}")
        return
    n_train, n_test = cifar10.OFFICIAL_COUNTS
    for w in args.workers:
        hours = {}
        for kind in KINDS:
            seconds = 0.0
            for norm, n in runs:
                step = n * w
                trained = cifar10.steps_per_epoch(n_train, step) * step
                seconds += recipe.EPOCHS * (trained / rate[norm, n, w, kind]
                                           + n_test / evals[norm])
            hours[kind] = seconds / 3600
        seeds = len(recipe.SEEDS)
        print(f"sweep at these rates ({len(runs)} runs = {len(norms)} norms x "
              f"{len(recipe.BATCH_SIZES)} batch sizes, W = {w}, {recipe.EPOCHS} epochs of "
              f"{n_train:,} training + {n_test:,} test images, one process at a time on this "
              f"machine): ours {hours['ours']:.1f} h, keras baseline {hours['keras']:.1f} h; "
              f"x {seeds} seeds: ours {seeds * hours['ours']:.1f} h")


# ---------------------------------------------------------------- bench.py backends

HERE = Path(__file__).resolve().parent
SHORT = {"tensorflow": "tf", "jax": "jax", "torch": "torch"}
MARK = "@bench "   # a reply line of a worker (other lines on its stdout are messages)


def reply(obj):
    print(MARK + json.dumps(obj), flush=True)


def serve(args):
    """bench.py train --serve, the worker of bench.py backends (one process, one backend):
    builds and warms up ours for every configuration, replies that it is ready, then
    answers one JSON request a line from stdin until it ends: {"run": [norm, N, W]} ->
    {"rate", "cores", "kernel"} of one timed fit (kernel: the share of its CPU time spent in
    the kernel); {"eval": norm} -> {"rate"} of one timed predict. --keep-malloc-patch: leaves
    TensorFlow's mmap threshold as tf.data sets it (bench.py malloc's other worker)."""
    from gnrepro import backends
    backends.set_threads(args.threads)
    backends.enable_determinism()   # as train.py runs
    if not args.keep_malloc_patch:
        backends.undo_malloc_patch()   # as train.py runs
    keras.utils.set_random_seed(0)
    data = Images(args.images)
    runs = prepare(args, data, ["ours"])
    first = {norm: runs[norm, args.batch_sizes[0], args.workers[0], "ours"][0]
             for norm in args.norms}   # the model that evaluation's rate is measured on
    for model in first.values():
        eval_rate(model, data, repeats=1)   # untimed: predict's compilation, first calls
    reply({"versions": backends.versions(), "threads": backends.intra_op_threads(),
           "python": sys.executable, "cpus": sorted(os.sched_getaffinity(0))})
    for line in sys.stdin:
        request = json.loads(line)
        if "run" in request:
            before = resource.getrusage(resource.RUSAGE_SELF)
            rate, cores = measure(runs, (*request["run"], "ours"), args)
            after = resource.getrusage(resource.RUSAGE_SELF)
            system, user = after.ru_stime - before.ru_stime, after.ru_utime - before.ru_utime
            reply({"rate": rate, "cores": cores, "kernel": system / max(system + user, 1e-9)})
        else:
            reply({"rate": eval_rate(first[request["eval"]], data, repeats=1, warmup=False)})


class Worker:
    """One backend's `bench.py train --serve` process, run with that backend's interpreter
    (label: what its messages and errors are named by; the backend's name by default)."""

    def __init__(self, backend, python, argv, cpus=None, label=None):
        self.backend, self.python, self.label = backend, python, label or backend
        env = dict(os.environ, KERAS_BACKEND=backend)
        env.pop(PIN, None)
        if cpus:
            env[PIN] = ",".join(map(str, cpus))
        self.proc = subprocess.Popen([python, "-u", str(HERE / "bench.py"), "train", "--serve",
                                      *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env, cwd=HERE)
        self.info = self.read()

    def ask(self, request):
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self.read()

    def read(self):
        for line in self.proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])
            print(f"[{self.label}] {line}", end="", file=sys.stderr, flush=True)
        code = self.proc.wait()
        raise SystemExit(f"error: the {self.label} worker ({self.python}) exited with status "
                         f"{code} (its messages are above)")

    def close(self):
        if self.proc.stdin and not self.proc.stdin.closed:
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.close()
        self.proc.wait()


def interpreter(args, backend):
    """The Python that runs a backend's worker: --python-BACKEND; else, for TensorFlow, this
    one (or .venv's beside bench.py where this one has no TensorFlow), and for JAX and torch
    .venv-backends' (Keras with JAX and torch, no TensorFlow) where it exists."""
    given = getattr(args, f"python_{backend}")
    if given:
        return given
    if backend == "tensorflow":
        venv = HERE / ".venv" / "bin" / "python"
        use_venv = not importlib.util.find_spec("tensorflow")
    else:
        venv = HERE / ".venv-backends" / "bin" / "python"
        use_venv = True
    return str(venv) if use_venv and venv.exists() else sys.executable


def worker_argv(args):
    argv = ["--norms", *args.norms, "--batch-sizes", *map(str, args.batch_sizes),
            "--workers", *map(str, args.workers)]
    for name in ("repeats", "warmup", "seconds", "images", "threads"):
        argv += [f"--{name}", str(getattr(args, name))]
    return argv


def bench_backends(args):
    """ours on each backend, in one worker process per backend, interleaved: every repeat
    visits every configuration on every backend in turn (the backends' order rotating), and
    only one worker computes at a time; prints one table of medians."""
    cpus = sorted(os.sched_getaffinity(0))[:args.cpus] if args.cpus else None
    with started_workers() as workers:
        for backend in args.backends:   # one at a time: a starting worker competes with none
            workers[backend] = Worker(backend, interpreter(args, backend), worker_argv(args), cpus)
            info = workers[backend].info
            versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items()
                                 if k not in ("backend", "python"))
            print(f"{SHORT[backend]}: {info['python']} (python {info['versions']['python']}), "
                  f"{versions}, intra-op threads {info['threads']}, may run on "
                  f"{len(info['cpus'])} core(s) {','.join(map(str, info['cpus']))}", flush=True)
        samples, evals = interleave(workers, args)
    rate, cores = medians(samples)
    print_backends_table(args, rate, cores, {k: statistics.median(v) for k, v in evals.items()})


@contextlib.contextmanager
def started_workers():
    """A dict for the Workers the block starts, every one closed when the block ends or fails."""
    workers = {}
    try:
        yield workers
    finally:
        for worker in workers.values():
            worker.close()


def interleave(workers, args):
    """Every repeat visits every configuration on every worker in turn (their order rotating
    between repeats), one worker computing at a time: ({(name, norm, N, W): [(rate, cores,
    kernel), ...]}, {(name, norm): [eval rate, ...]})."""
    names = list(workers)
    samples = {(b, *c): [] for b in names for c in configurations(args)}
    evals = {(b, norm): [] for b in names for norm in args.norms}
    for r in range(args.repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for config in configurations(args):
            for b in order:
                got = workers[b].ask({"run": list(config)})
                samples[(b, *config)].append((got["rate"], got["cores"], got["kernel"]))
        for norm in args.norms:
            for b in order:
                evals[b, norm].append(workers[b].ask({"eval": norm})["rate"])
    return samples, evals


def print_backends_table(args, rate, cores, evals):
    names = [SHORT[b] for b in args.backends]
    ref = args.backends[0]
    print(f"{'norm':<5}{'N':>4}{'W':>3}" + "".join(f"{n + ' img/s':>13}" for n in names)
          + "".join(f"{n + '/' + names[0]:>10}" for n in names[1:])
          + "".join(f"{n + ' cores':>13}" for n in names))
    for config in configurations(args):
        row = f"{config[0]:<5}{config[1]:>4}{config[2]:>3}"
        row += "".join(f"{rate[(b, *config)]:>13.0f}" for b in args.backends)
        row += "".join(f"{rate[(b, *config)] / rate[(ref, *config)]:>10.2f}"
                       for b in args.backends[1:])
        row += "".join(f"{cores[(b, *config)]:>13.2f}" for b in args.backends)
        print(row)
    print(f"{'eval':<12}" + "".join(f"{n + ' img/s':>13}" for n in names)
          + "".join(f"{n + '/' + names[0]:>10}" for n in names[1:]))
    for norm in args.norms:
        print(f"{norm:<12}" + "".join(f"{evals[b, norm]:>13.0f}" for b in args.backends)
              + "".join(f"{evals[b, norm] / evals[ref, norm]:>10.2f}" for b in args.backends[1:]))
    print(f"ours (train.py's build_model, compile_model, loops.Batches, StepCallback) on each "
          f"backend, {args.images} synthetic images; medians of {args.repeats} interleaved "
          f"repeats of {args.seconds:g} s after {args.warmup:g} s of warm-up each; eval: predict "
          f"on {min(EVAL_IMAGES, args.images)} test inputs in batches of "
          f"{recipe.EVAL_BATCH_SIZE}; cores: the worker's CPU seconds per wall second (under 1 "
          f"where it waited, for the CPU on a busy machine or for its input)")


# ---------------------------------------------------------------- bench.py malloc

MALLOC_WORKERS = {"train.py": [], "tf.data's": ["--keep-malloc-patch"]}


def bench_malloc(args):
    """ours on TensorFlow in two worker processes, interleaved as `backends` runs them: one as
    train.py runs (backends.undo_malloc_patch), one with the mmap threshold tf.data leaves."""
    from gnrepro import backends
    python = interpreter(args, "tensorflow")
    with started_workers() as workers:
        for name, extra in MALLOC_WORKERS.items():
            workers[name] = Worker("tensorflow", python, worker_argv(args) + extra, label=name)
        info = workers["train.py"].info
        versions, threads = info["versions"], info["threads"]
        print(f"{python}: python {versions['python']}, tensorflow {versions['tensorflow']}, "
              f"keras {versions['keras']}, {' '.join(platform.libc_ver()) or 'libc unknown'}, "
              f"intra-op threads {threads}", flush=True)
        samples, _ = interleave(workers, args)
    rate, kernel = medians(samples, column=2)
    names = list(MALLOC_WORKERS)
    print(f"{'norm':<5}{'N':>4}{'W':>3}" + "".join(f"{n + ' img/s':>17}" for n in names)
          + f"{'ratio':>7}" + "".join(f"{n + ' kernel':>18}" for n in names))
    for config in configurations(args):
        ours, theirs = (rate[(n, *config)] for n in names)
        print(f"{config[0]:<5}{config[1]:>4}{config[2]:>3}{ours:>17.0f}{theirs:>17.0f}"
              f"{ours / theirs:>7.2f}"
              + "".join(f"{kernel[(n, *config)]:>18.0%}" for n in names))
    print(f"mmap threshold: train.py's {backends.MMAP_THRESHOLD >> 20} MiB, heaps kept, against "
          f"tf.data's {backends.TF_MMAP_THRESHOLD >> 10} KiB, a worker process each "
          f"({python}); ratio: train.py's img/s over tf.data's; kernel: the share of the "
          f"worker's CPU time spent in the kernel (page faults, mapping and unmapping); medians "
          f"of {args.repeats} interleaved repeats of {args.seconds:g} s after {args.warmup:g} s "
          f"of warm-up each, {args.images} synthetic images")


# ---------------------------------------------------------------- bench.py input (TensorFlow)

class SlowBatches(keras.utils.PyDataset):
    """`steps` batches of 8 zeros (images of 4 values) that take `seconds` each to make."""

    def __init__(self, steps, seconds):
        super().__init__()
        self.steps, self.seconds = steps, seconds

    def __len__(self):
        return self.steps

    def __getitem__(self, i):
        time.sleep(self.seconds)
        return np.zeros((8, 4), np.float32), np.zeros((8,), np.int32)


def input_calls(args):
    """{(call, feeding): a function making one whole call}: fit (one epoch) and predict, fed as
    train.py feeds them and as Keras feeds itself."""
    from gnrepro import backends
    import train
    keras.utils.set_random_seed(0)
    tiny = keras.Sequential([keras.Input((4,)), keras.layers.Dense(10)])
    tiny.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    batches = SlowBatches(args.steps, args.epoch_seconds / args.steps)
    resnet = train.build_resnet20("gn")
    x = Images(args.test_images, test=args.test_images).test_inputs
    batch = recipe.EVAL_BATCH_SIZE
    return {
        ("fit", "train.py"): lambda: tiny.fit(backends.fit_input(batches), verbose=0,
                                              shuffle=False),
        ("fit", "Keras"): lambda: tiny.fit(batches, verbose=0, shuffle=False),
        ("predict", "train.py"): lambda: backends.predict(resnet, x, batch),
        ("predict", "Keras"): lambda: resnet.predict(x, batch_size=batch, verbose=0)}


def bench_input(args):
    """Seconds of whole fit and predict calls, train.py's feeding against Keras' own."""
    calls = input_calls(args)
    for call in calls.values():   # untimed: compilation, first calls
        call()
    seconds = {key: [] for key in calls}
    for _ in range(args.repeats):
        for key, call in calls.items():
            start = time.perf_counter()
            call()
            seconds[key].append(time.perf_counter() - start)
    print(f"{'call':<9}{'feeding':<10}{'median s':>10}{'longest s':>11}{'ratio':>7}")
    for (call, feeding), times in seconds.items():
        ratio = statistics.median(seconds[call, "Keras"]) / statistics.median(times)
        print(f"{call:<9}{feeding:<10}{statistics.median(times):>10.2f}{max(times):>11.2f}"
              f"{ratio:>7.2f}")
    print(f"train.py: backends.fit_input / backends.predict (tf.data, autotuning off); Keras: "
          f"fit on the PyDataset, predict on the NumPy array; ratio: Keras' median over this "
          f"row's; {args.repeats} interleaved repeats after one untimed; fit: one epoch of "
          f"{args.steps} batches made in {args.epoch_seconds:g} s; predict: ResNet-20 (GN) on "
          f"{args.test_images} test inputs in batches of {recipe.EVAL_BATCH_SIZE}; intra-op "
          f"threads {args.threads}")


# ---------------------------------------------------------------- bench.py loop (JAX)

def loop_rate(norm, batch_size, workers, mixed, loop, x, y, calls=2):
    """Images per second of one run's training, as train.py trains it on JAX: its model and
    compile_model, fed by backends.ScanLoop (`scan`) or model.fit (`fit`); compilation and
    the first call excluded, then the median of `calls` timed calls (scan: IMAGES_PER_SCAN
    images each; fit: one epoch of x each)."""
    from gnrepro import cifar10
    import train
    cfg = recipe.Config(norm=norm, batch_size=batch_size, workers=workers, mixed_precision=mixed)
    step = batch_size * workers
    total = cifar10.steps_per_epoch(len(y), step)
    model = train.build_model(cfg)
    train.compile_model(model, cfg, total)
    padded = cifar10.padded(x, cifar10.pixel_mean(x))
    draws = cifar10.epoch_draws(len(y), cfg.seed, 0)
    if loop == "scan":
        runner = loops.scan_loop(model, padded, y, step)

        def one():
            runner.run(draws, 0, runner.steps)
        images = runner.steps * step
    else:
        batches = loops.Batches(cifar10.TrainBatches(padded, y, step, cfg.seed, 0))

        def one():
            model.fit(batches, epochs=1, verbose=0, shuffle=False)
        images = total * step
    times = []
    for i in range(calls + 1):
        start = time.perf_counter()
        one()
        times.append(time.perf_counter() - start)
    return images / statistics.median(times[1:]), times[0]


def bench_loop(args):
    """One line per configuration: img/s of the scan loop (and fit, if asked); then the
    sweep's estimated time at those rates, one run at a time."""
    from gnrepro import backends
    if backends.name() != "jax":
        raise SystemExit(f"error: bench.py loop measures the JAX scan loop; run it with "
                         f"KERAS_BACKEND=jax (this is {backends.name()})")
    backends.enable_determinism()   # as train.py runs (XLA's deterministic GPU ops)
    x, y = synthetic(args.images)
    print(f"devices: {', '.join(backends.gpus()) or 'CPU only'}")
    print(f"{'loop':<6}{'norm':<5}{'N':>4}{'W':>3}{'precision':>11}{'img/s':>10}{'first call s':>14}",
          flush=True)
    rates = {}
    for loop in args.loops:
        for mixed in args.precisions:
            for norm in args.norms:
                for n in args.batch_sizes:
                    rate, first = loop_rate(norm, n, args.workers, mixed, loop, x, y)
                    rates[loop, mixed, norm, n] = rate
                    print(f"{loop:<6}{norm:<5}{n:>4}{args.workers:>3}"
                          f"{'mixed' if mixed else 'float32':>11}{rate:>10.0f}{first:>14.1f}",
                          flush=True)
    return rates


# ---------------------------------------------------------------- bench.py plan

PAPER_PROFILES = ("default", "he", "norms", "workers", "groups")   # recipe.PROFILES' order at
                            #   the paper's scale: a profile counts the runs it provides
EVAL_SPEEDUP = 3   # evaluation's img/s against training's at the largest measured step: an
                   #   assumption (a forward pass alone, in batches of 1000), not measured


def step_figure(text):
    """'16=2.56' -> (16, 2.56): a step of 16 images in 2.56 ms (--step-ms' argparse type)."""
    images, _, ms = text.partition("=")
    try:
        images, ms = int(images), float(ms)
    except ValueError:
        images = ms = None
    if images is None or images < 1 or not ms > 0:
        raise argparse.ArgumentTypeError(
            f"expected IMAGES=MS, a step of IMAGES images (a positive integer) in MS "
            f"milliseconds (positive), e.g. 16=2.56; got {text!r}")
    return images, ms


def step_times(parser, args):
    """{"bn": [(images, ms), ...], "gn": ...} sorted by images, from --step-ms and the per-norm
    --step-ms-bn / --step-ms-gn (which win); at least two step sizes each, or parser.error."""
    times = {}
    for norm in ("bn", "gn"):
        option = f"--step-ms-{norm}" if getattr(args, f"step_ms_{norm}") else "--step-ms"
        figures = getattr(args, f"step_ms_{norm}") or args.step_ms
        if not figures:
            parser.error("--step-ms IMAGES=MS ... is required (or both --step-ms-bn and "
                         "--step-ms-gn): the milliseconds of a training step of IMAGES images "
                         "at two step sizes or more, e.g. --step-ms 16=2.56 256=5.81; measure "
                         "them on your card with `bench.py pack` (solo ms) or `bench.py loop` "
                         "(ms = 1000 * W * N / img/s)")
        sizes = [images for images, _ in figures]
        if len(set(sizes)) < 2 or len(set(sizes)) < len(sizes):
            parser.error(f"{option} needs two step sizes or more, each once (IMAGES=MS with "
                         f"distinct IMAGES), got {' '.join(f'{i}={m:g}' for i, m in figures)}")
        times[norm] = sorted(figures)
    return times


def check_plan_arguments(parser, args):
    args.step_ms = step_times(parser, args)
    recipe.require_positive(parser, args, ("processes",))
    if (args.processes is None) != (args.speedup is None):
        parser.error("--processes K and --speedup X go together: K processes at once train X "
                     "times one's images per second (measure it: K runs at once against one)")
    if args.processes is None:
        args.processes, args.speedup = 1, 1.0
    if not 0 < args.speedup <= args.processes:
        parser.error(f"--speedup should be more than 0 and at most --processes "
                     f"({args.processes}), got {args.speedup:g}")
    for name in ("pack_cost", "session_minutes"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {value:g}")


def ms_per_step(figures, images):
    """ms a step of `images` images: linear in the images between the measured step sizes
    (figures: (images, ms), sorted) and, beyond them, along the nearest two."""
    i = min(max(bisect.bisect_left([x for x, _ in figures], images), 1), len(figures) - 1)
    (x0, t0), (x1, t1) = figures[i - 1], figures[i]
    ms = t0 + (t1 - t0) * (images - x0) / (x1 - x0)
    if ms <= 0:
        raise SystemExit(f"error: the step times {' '.join(f'{i}={m:g}' for i, m in figures)} "
                         f"extrapolate to {ms:.3g} ms a step of {images} images: give one "
                         f"measured nearer {images} images too (--step-ms)")
    return ms


def run_minutes(cfg, step_ms):
    """GPU minutes of one paper-scale run at the measured step times (step_ms[norm]; LN, IN:
    GN's), its evaluation (each epoch's test images at EVAL_SPEEDUP times the training
    rate of the largest measured step) included."""
    from gnrepro import cifar10
    n_train, n_test = cifar10.OFFICIAL_COUNTS
    figures = step_ms["bn" if cfg.norm == "bn" else "gn"]
    images = cfg.batch_size * cfg.workers
    train_s = cfg.epochs * cifar10.steps_per_epoch(n_train, images) * ms_per_step(figures,
                                                                                 images) / 1000
    x1, t1 = figures[-1]
    eval_s = cfg.epochs * n_test / (EVAL_SPEEDUP * x1 / t1 * 1000)
    return (train_s + eval_s) / 60


def work_left(profile, args):
    """(minutes of each run left, of each pack left) of a paper-scale profile: its entries
    without a run record in its models folder, each once (recipe.provider); a pack of
    seeds takes its longest member's minutes times --pack-cost."""
    from dataclasses import replace
    models = Path(args.models_dir or ".") / recipe.profile_paths(profile)["models_dir"]
    left = [c for c in recipe.grid(profile) if recipe.provider(c) == profile
            and not (models / f"{c.name}.json").exists()]
    minutes = [run_minutes(c, args.step_ms) for c in left]
    packs = {}
    for c, m in zip(left, minutes):
        packs.setdefault(replace(c, seed=0), []).append(m)
    return minutes, [max(ms) * (args.pack_cost if len(ms) > 1 else 1) for ms in packs.values()]


def sessions(work, args):
    """Sessions of --session-minutes of training that `work` (minutes of runs) takes with
    --processes at --speedup: at least the work over the processes' rate, and at least the
    longest run (it resumes in the next session); None without --session-minutes."""
    if args.session_minutes is None:
        return None
    m = args.session_minutes
    return max(math.ceil(sum(work) / (m * args.speedup)), math.ceil(max(work, default=0) / m))


def bench_plan(args):
    """A line per paper-scale profile: runs left, GPU minutes, the longest run, sessions (or
    '-' without --session-minutes), then the same for packs of the seeds; then the total."""
    def cell(n):
        return "-" if n is None else n
    print(f"{'profile':<9}{'runs left':>10}{'GPU min':>9}{'longest':>9}{'sessions':>10}"
          f"{'packs':>7}{'pack min':>10}{'sessions':>10}")
    total = [0, 0.0, 0, 0, 0.0, 0]
    for profile in PAPER_PROFILES:
        minutes, packs = work_left(profile, args)
        row = (len(minutes), sum(minutes), sessions(minutes, args), len(packs), sum(packs),
               sessions(packs, args))
        print(f"{profile:<9}{row[0]:>10}{row[1]:>9.0f}{max(minutes, default=0):>9.1f}"
              f"{cell(row[2]):>10}{row[3]:>7}{row[4]:>10.0f}{cell(row[5]):>10}")
        total = [None if a is None or b is None else a + b for a, b in zip(total, row)]
    print(f"{'all':<9}{total[0]:>10}{total[1]:>9.0f}{'-':>9}{cell(total[2]):>10}{total[3]:>7}"
          f"{total[4]:>10.0f}{cell(total[5]):>10}")
    together = (f"{args.processes} processes at once at {args.speedup:g}x one"
                if args.processes > 1 else "one process")
    at = (f"sessions of {args.session_minutes:g} min of training, {together}; a run longer than "
          f"a session resumes in the next" if args.session_minutes else
          "sessions: give --session-minutes")
    figures = ", ".join(f"{norm} " + " ".join(f"{i}={ms:g}" for i, ms in args.step_ms[norm])
                        for norm in args.step_ms)
    print(f"(GPU min: one process at a time, at the step ms {figures}; {at}; packs: the seeds "
          f"of an entry in one process at {args.pack_cost} solo steps a step)")


def add_plan_parser(sub):
    q = sub.add_parser("plan", help="GPU minutes (and sessions) of the paper-scale work left, "
                                    "at step times measured on your card (no measurement)",
                       epilog="e.g. at an NVIDIA H200's (JAX 0.11.2, 2026-11-27, float32, one "
                              "process): --step-ms-bn 16=2.56 256=5.82 --step-ms-gn 16=2.53 "
                              "256=6.21 --processes 4 --speedup 1.8 --session-minutes 10")
    q.add_argument("--step-ms", type=step_figure, nargs="+", metavar="IMAGES=MS",
                   help="ms a training step of IMAGES images (W * N), at two step sizes or more, "
                        "e.g. 16=2.56 256=5.81 (linear in between and beyond); measure them with "
                        "`bench.py pack` (solo ms) or `bench.py loop`; required unless both "
                        "--step-ms-bn and --step-ms-gn are given")
    q.add_argument("--step-ms-bn", type=step_figure, nargs="+", metavar="IMAGES=MS",
                   help="BN's step times (instead of --step-ms)")
    q.add_argument("--step-ms-gn", type=step_figure, nargs="+", metavar="IMAGES=MS",
                   help="GN's step times, LN's and IN's too (instead of --step-ms)")
    q.add_argument("--processes", type=int, metavar="K",
                   help="K processes at once (with --speedup; default: one)")
    q.add_argument("--speedup", type=float, metavar="X",
                   help="the K processes train X times one process's images per second "
                        "(measured; at most K)")
    q.add_argument("--session-minutes", type=float, metavar="M",
                   help="count the sessions of M minutes of training the work takes, for a GPU "
                        "held for a limited time (a cloud spot instance, a time-limited notebook)")
    q.add_argument("--pack-cost", type=float, default=1.0, metavar="C",
                   help="a pack's step in solo steps (1: as cheap as one run's; measure it with "
                        "`bench.py pack`)")
    q.add_argument("--models-dir", metavar="DIR",
                   help="the repository whose models/ says what is finished (default: this "
                        "folder)")
    q.set_defaults(run=bench_plan, check=check_plan_arguments)


# ---------------------------------------------------------------- bench.py pack (JAX)

STEP_VARIANTS = {"float32": {}, "unroll4": {"unroll": 4}, "bf16": {"bfloat16": True}}


def pack_rate(norm, batch_size, workers, k, variant, x, y, steps, calls):
    """(img/s of all k members, ms a step, first call s) of k seeds on backends.ScanLoop, built
    and compiled as train.py builds them, in calls of `steps` steps (at most an epoch of x)."""
    from gnrepro import backends
    from gnrepro import cifar10
    import train
    options = dict(STEP_VARIANTS[variant])
    bf16 = options.pop("bfloat16", False)
    step = batch_size * workers
    steps = min(steps, cifar10.steps_per_epoch(len(y), step))
    models, seeds = [], list(range(1, k + 1))
    for seed in seeds:
        cfg = recipe.Config(norm=norm, batch_size=batch_size, workers=workers, seed=seed,
                           bfloat16=bf16)
        keras.utils.set_random_seed(seed)
        models.append(train.build_model(cfg))
        train.compile_model(models[-1], cfg, cifar10.steps_per_epoch(len(y), step))
    padded = cifar10.padded(x, cifar10.pixel_mean(x))
    loop = backends.ScanLoop(models, padded, y, step, steps, **options)
    draws = [cifar10.epoch_draws(len(y), seed, 0) for seed in seeds]
    times = []
    for _ in range(calls + 1):
        start = time.perf_counter()
        loop.run(draws, 0, steps)   # ends with the metrics read back: the call has finished
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times[1:])
    return k * steps * step / seconds, 1000 * seconds / steps, times[0]


def bench_pack(args):
    """One line per (norm, N, variant): one run alone and a pack of K, side by side."""
    from gnrepro import backends
    if backends.name() != "jax":
        raise SystemExit(f"error: bench.py pack measures JAX's packs; run it with "
                         f"KERAS_BACKEND=jax (this is {backends.name()})")
    backends.enable_determinism()   # as train.py runs
    x, y = synthetic(args.images)
    print(f"devices: {', '.join(backends.gpus()) or 'CPU only'}; XLA_FLAGS="
          f"{os.environ.get('XLA_FLAGS', '')!r}; {args.steps} steps a call, median of "
          f"{args.calls} calls after the first")
    k = args.pack
    print(f"{'norm':<5}{'N':>4}{'W':>3}{'variant':>9}{'solo img/s':>12}{'solo ms':>9}"
          f"{f'pack{k} img/s':>13}{f'pack{k} ms':>10}{'pack/solo':>11}{'compile s':>11}", flush=True)
    rows = {}
    for norm in args.norms:
        for n in args.batch_sizes:
            for variant in args.variants:
                solo = pack_rate(norm, n, args.workers, 1, variant, x, y, args.steps, args.calls)
                pack = pack_rate(norm, n, args.workers, k, variant, x, y, args.steps, args.calls)
                rows[norm, n, variant] = solo, pack
                print(f"{norm:<5}{n:>4}{args.workers:>3}{variant:>9}{solo[0]:>12.0f}"
                      f"{solo[1]:>9.2f}{pack[0]:>13.0f}{pack[1]:>10.2f}"
                      f"{pack[0] / solo[0]:>11.2f}{pack[2]:>11.1f}", flush=True)
    return rows


def add_run_arguments(t, batch_sizes, workers):
    """What `train` and `backends` share: the configurations and how each is timed."""
    t.add_argument("--norms", nargs="+", choices=("bn", "gn"), default=["bn", "gn"])
    t.add_argument("--batch-sizes", type=int, nargs="+", default=batch_sizes,
                   help="images per worker N (the largest is the reference of the N/max column)")
    t.add_argument("--workers", type=int, nargs="+", default=workers,
                   help="W workers of N images per step (BN per worker, as train.py --workers)")
    t.add_argument("--repeats", type=int, default=3, help="interleaved repeats (median)")
    t.add_argument("--warmup", type=float, default=1.0, help="seconds of each fit not timed")
    t.add_argument("--seconds", type=float, default=2.0, help="timed seconds of each fit")
    t.add_argument("--images", type=int, default=4096, help="synthetic training images")
    t.add_argument("--quick", action="store_true", help="batch sizes 32 and 2, 2 repeats")
    t.add_argument("--threads", type=int,
                   help="intra-op threads of the backend (backends.set_threads), 0 = one per "
                        "core (default: train.py's THREADS)")


def check_run_arguments(parser, args):
    if args.quick:
        args.batch_sizes, args.repeats = [32, 2], 2
    recipe.require_positive(parser, args, ("repeats", "images", "workers", "batch_sizes"))
    if args.seconds <= 0 or args.warmup < 0:
        parser.error(f"--seconds must be positive and --warmup not negative, "
                     f"got {args.seconds} and {args.warmup}")
    step = max(args.batch_sizes) * max(args.workers)
    if args.images < 2 * step:
        parser.error(f"--images {args.images} should hold at least 2 steps of {step} images")
    if args.threads is None:
        args.threads = recipe.THREADS
    recipe.require_threads(parser, args.threads)


def check_backends_arguments(parser, args):
    check_run_arguments(parser, args)
    if len(set(args.backends)) < len(args.backends):
        parser.error(f"--backends should not repeat a backend, got {args.backends}")
    allowed = len(os.sched_getaffinity(0))
    if args.cpus is not None and not 1 <= args.cpus <= allowed:
        parser.error(f"--cpus should be in 1..{allowed} (the cores this process may use), "
                     f"got {args.cpus}")
    for backend in args.backends:
        python = interpreter(args, backend)
        if not os.access(python, os.X_OK):
            parser.error(f"--python-{backend} {python}: not an executable file")


def check_layer_arguments(parser, args):
    recipe.require_positive(parser, args, ("batch_sizes", "repeats", "steps"))


def check_loop_arguments(parser, args):
    recipe.require_positive(parser, args, ("batch_sizes", "workers", "images"))
    args.precisions = [p == "mixed" for p in args.precisions]   # loop_rate's `mixed`


def check_pack_arguments(parser, args):
    recipe.require_positive(parser, args, ("workers", "pack", "steps", "calls", "images",
                                           "batch_sizes"))
    if args.images < max(args.batch_sizes) * args.workers:
        parser.error(f"--images {args.images} should hold a step of "
                     f"{max(args.batch_sizes) * args.workers} images")
    if args.xla_flags:
        from gnrepro import backends
        if keras.backend.backend() == "jax" and backends._jax_started():
            parser.error("--xla-flags: JAX has started in this process already")
        backends._add_xla_flags(*args.xla_flags.split())


def add_layer_parser(sub):
    p = sub.add_parser("layer", help="GroupNorm layers vs BatchNorm, forward + backward")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[2, 32, 128])
    p.add_argument("--repeats", type=int, default=7, help="interleaved repeats (median)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per repeat")
    p.set_defaults(run=bench_layer, check=check_layer_arguments)


def add_train_parser(sub):
    t = sub.add_parser("train", help="ResNet-20 training throughput, ours vs plain Keras, "
                                     "on the backend of KERAS_BACKEND")
    add_run_arguments(t, [32, 16, 8, 4, 2], [1])
    t.add_argument("--mixed-precision", action="store_true",
                   help="ours in mixed_float16 (train.py --mixed-precision)")
    # bench.py backends' and malloc's worker process (see serve), not for people:
    t.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    t.add_argument("--keep-malloc-patch", action="store_true", help=argparse.SUPPRESS)
    t.set_defaults(run=bench_train, check=check_run_arguments)


def add_backends_parser(sub):
    b = sub.add_parser("backends", help="ours on TensorFlow and JAX (and torch), one worker "
                                        "process each, interleaved, side by side")
    add_run_arguments(b, [32, 2], [1, 8])
    b.add_argument("--backends", nargs="+", choices=tuple(SHORT), default=["tensorflow", "jax"],
                   help="the first is the reference of the ratios")
    b.add_argument("--cpus", type=int,
                   help="pin every worker to K of the cores (os.sched_setaffinity, all its "
                        "threads): the same CPU for each backend whatever its thread settings "
                        "do (default: not pinned)")
    for name in SHORT:
        b.add_argument(f"--python-{name}", metavar="PATH",
                       help=f"the Python with Keras and {name} (default: "
                            + ("this one, or .venv/bin/python beside bench.py where this one "
                               "has no TensorFlow)" if name == "tensorflow" else
                               ".venv-backends/bin/python beside bench.py if it exists, "
                               "else this one)"))
    b.set_defaults(run=bench_backends, check=check_backends_arguments, mixed_precision=False)


def add_malloc_parser(sub):
    m = sub.add_parser("malloc", help="TensorFlow: training img/s with glibc's mmap threshold "
                                      "where train.py puts it and where tf.data leaves it")
    add_run_arguments(m, [8], [8])
    m.add_argument("--python-tensorflow", metavar="PATH",
                   help="the Python with Keras and TensorFlow (default: this one, or "
                        ".venv/bin/python beside bench.py where this one has no TensorFlow)")
    m.set_defaults(run=bench_malloc, check=check_run_arguments)


def add_input_parser(sub):
    i = sub.add_parser("input", help="TensorFlow: seconds of whole fit and predict calls fed as "
                                     "train.py feeds them and as Keras feeds itself")
    i.add_argument("--epoch-seconds", type=float, default=6.0,
                   help="the time it takes to make an epoch's batches (default 6)")
    i.add_argument("--steps", type=int, default=30, help="batches an epoch (default 30)")
    i.add_argument("--repeats", type=int, default=5, help="interleaved repeats (default 5)")
    i.add_argument("--test-images", type=int, default=10000,
                   help="synthetic test inputs predict runs on (default 10000)")
    i.add_argument("--threads", type=int, default=recipe.THREADS,
                   help=f"intra-op threads (default {recipe.THREADS}, train.py's)")
    i.set_defaults(run=bench_input, check=check_input_arguments)


def check_input_arguments(parser, args):
    if keras.backend.backend() != "tensorflow":
        parser.error(f"input measures TensorFlow's tf.data (KERAS_BACKEND is "
                     f"{keras.backend.backend()}); run it with KERAS_BACKEND=tensorflow")
    if (not 0 <= args.epoch_seconds < math.inf
            or min(args.steps, args.repeats, args.test_images) < 1):
        parser.error(f"--epoch-seconds should be 0 or more (finite) and --steps, --repeats and "
                     f"--test-images 1 or more, got {args.epoch_seconds:g}, {args.steps}, "
                     f"{args.repeats} and {args.test_images}")
    recipe.require_threads(parser, args.threads)
    from gnrepro import backends
    backends.set_threads(args.threads)


def add_loop_parser(sub):
    s = sub.add_parser("loop", help="JAX: training img/s of the scan loop (train.py --loop scan) "
                                    "and of fit, as a GPU runs the sweep")
    s.add_argument("--norms", nargs="+", choices=("bn", "gn"), default=["bn", "gn"])
    s.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 2])
    s.add_argument("--workers", type=int, default=8)
    s.add_argument("--loops", nargs="+", choices=("scan", "fit"), default=["scan"])
    s.add_argument("--precisions", nargs="+", choices=("float32", "mixed"), default=["float32"])
    s.add_argument("--images", type=int, default=8192, help="synthetic training images")
    s.set_defaults(run=bench_loop, check=check_loop_arguments)


def add_pack_parser(sub):
    k = sub.add_parser("pack", help="JAX: a pack of K seeds in one compiled program against one "
                                    "run alone, img/s and ms a step, per step-cost variant")
    k.add_argument("--norms", nargs="+", choices=("bn", "gn"), default=["bn", "gn"])
    k.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 16, 8, 4, 2])
    k.add_argument("--workers", type=int, default=8)
    k.add_argument("--pack", type=int, default=3, help="K seeds in the pack (default 3)")
    k.add_argument("--variants", nargs="+", choices=tuple(STEP_VARIANTS),
                   default=list(STEP_VARIANTS))
    k.add_argument("--steps", type=int, default=256, help="steps a compiled call")
    k.add_argument("--calls", type=int, default=2, help="timed calls after the first (median)")
    k.add_argument("--images", type=int, default=8192, help="synthetic training images")
    k.add_argument("--xla-flags", help="added to XLA_FLAGS before JAX starts, e.g. "
                                       "'--xla_gpu_enable_command_buffer=+WHILE'")
    k.set_defaults(run=bench_pack, check=check_pack_arguments)


def make_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (add_layer_parser, add_train_parser, add_backends_parser, add_malloc_parser,
                add_input_parser, add_loop_parser, add_pack_parser, add_plan_parser):
        add(sub)
    return parser


def print_header(args):
    """The first line of every table: what it ran on (the backends' parent runs none)."""
    if args.command in ("backends", "malloc"):
        print(f"bench.py {args.command}: python={sys.version.split()[0]} cpus={os.cpu_count()} "
              f"load average={os.getloadavg()[0]:.2f}", flush=True)
    else:
        print(f"backend={keras.backend.backend()} keras={keras.__version__} "
              f"python={sys.version.split()[0]} cpus={os.cpu_count()} "
              f"load average={os.getloadavg()[0]:.2f}", flush=True)


def main(argv=None):
    parser = make_parser()
    args = parser.parse_args(argv)
    args.check(parser, args)
    if args.command == "train" and args.serve:
        return serve(args)
    print_header(args)
    args.run(args)
    print(f"load average at the end={os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
