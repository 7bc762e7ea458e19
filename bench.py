"""Performance measurements, printed side by side (timing is not a test).

    python bench.py train [--quick] [--workers 8] [--threads T] [--jit-compile] [--mixed-precision]
    python bench.py layer [--batch-sizes 2 32 128] [--repeats 7] [--steps 20]
    KERAS_BACKEND=jax python bench.py loop [--loops scan fit] [--precisions float32 mixed]

`train`: training throughput (images per second after warm-up) of train.py's ResNet-20
with BN and with GN at batch sizes 32 to 2, trained as train.py trains it (its builder,
compile_model, cifar10.train_dataset, the callback of train_epoch), and in the same run
a plain baseline: the same architecture with keras.layers.BatchNormalization /
GroupNormalization, compiled with SGD and Keras' defaults (one step per call), fed
from NumPy arrays by model.fit with default settings (verbose=0). The configurations
are interleaved in every repeat (a busy CPU slows them alike); the table shows medians,
the ratios to the baseline, GN/BN, each batch size against 32, and the wall time of
the full sweep (train.py's grid, 100 epochs of 50,000 training and 10,000 test images)
at those rates. The images are synthetic (speed does not depend on them), so no data
set is needed. TensorFlow's intra-op threads are set per process, so the baseline runs
with train.py's THREADS too (compare --threads 0 for TensorFlow's default).

`layer`: forward plus backward (gradients for the input and the weights) of
layer.GroupNormalization, keras.layers.GroupNormalization and
keras.layers.BatchNormalization (training=True) on the three ResNet-20 feature-map
shapes, compiled as training compiles them (tf.function under TensorFlow, jax.jit
under JAX; eager under PyTorch, as Keras' torch trainer runs). Warm-up excluded; the
three layers are interleaved in every repeat so a busy CPU slows all of them alike,
and the table shows medians over repeats and the ratios to BatchNormalization.
Writes nothing; prints the table to stdout.
"""
import argparse
import inspect
import os
import statistics
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

FEATURE_MAPS = [(32, 32, 16), (16, 16, 32), (8, 8, 64)]  # ResNet-20's three stages
GROUPS = 8  # what train.py uses


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
    if backend == "tensorflow":
        import tensorflow as tf

        @tf.function(jit_compile=False)  # Keras' "auto" picks no XLA on a CPU
        def step(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                loss = tf.reduce_sum(norm(x, training=True) * w)
            return tape.gradient(loss, [x] + norm.trainable_variables)
        return lambda: step(x)  # TF runs ops synchronously on the CPU
    if backend == "jax":
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
    if backend == "torch":
        x = x.clone().requires_grad_(True)

        def step():
            loss = (norm(x, training=True) * w).sum()
            return loss.backward()
        return step
    raise ValueError(f"bench.py supports tensorflow, jax and torch, not {backend}")


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
    the first that ends `seconds` later, then stops fit. Counts across epochs."""

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
                self.start = now, self.steps
        elif now - self.start[0] >= self.seconds:
            self.end = now, self.steps
            self.model.stop_training = True

    @property
    def rate(self):
        (t0, s0), (t1, s1) = self.start, self.end
        return (s1 - s0) * self.images_per_step / (t1 - t0)


class NoStop:
    requested = None   # train.StepCallback's stop flag, never raised here


def synthetic(images, seed=0):
    """CIFAR-shaped uint8 images and labels: the speed does not depend on the pixels."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (images, 32, 32, 3), dtype=np.uint8)
    return x, rng.integers(0, 10, images)


def ours(norm, batch_size, args, x, y):
    """fit(callback) for train.py's model, compiled and fed as train.py's train_epoch does."""
    import cifar10
    import train
    cfg = train.Config(norm=norm, batch_size=batch_size, workers=args.workers,
                       **{k: True for k in ("jit_compile", "mixed_precision") if getattr(args, k)})
    step = batch_size * args.workers
    total = cifar10.steps_per_epoch(len(y), step)
    model = train.build_model(cfg)
    train.compile_model(model, cfg, total)
    ds = cifar10.train_dataset(x, y, cifar10.pixel_mean(x), step, cfg.seed, 0)
    stop = NoStop()

    def fit(callback):
        model.fit(ds, epochs=10**6, verbose=0, shuffle=False,
                  callbacks=[train.StepCallback(stop, 0, total, False), callback])
    return model, fit


def keras_norm(layer_):
    """clone_model's clone_function: train.py's norm layers become Keras' own."""
    import layer
    config = layer_.get_config()
    if isinstance(layer_, keras.layers.BatchNormalization):   # WorkerBatchNormalization too
        config.pop("workers", None)
        return keras.layers.BatchNormalization.from_config(config)
    if isinstance(layer_, layer.GroupNormalization):
        return keras.layers.GroupNormalization.from_config(config)
    return layer_.__class__.from_config(config)


def baseline(norm, batch_size, args, x, y):
    """fit(callback) for the plain baseline: the same architecture with Keras' BN or GN,
    SGD with Keras' default compile settings, NumPy arrays, model.fit's defaults."""
    import train
    cfg = train.Config(norm=norm, batch_size=batch_size)
    model = keras.models.clone_model(train.build_resnet20(norm, train.GROUPS),
                                     clone_function=keras_norm)
    model.compile(optimizer=keras.optimizers.SGD(cfg.lr, momentum=train.MOMENTUM),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    images = (x / np.float32(255) - x.mean(axis=0) / np.float32(255)).astype(np.float32)

    def fit(callback):
        model.fit(images, y, batch_size=batch_size * args.workers, epochs=10**6, verbose=0,
                  callbacks=[callback])
    return model, fit


def eval_rate(model, x, y, repeats=2):
    """Images per second of train.evaluate's inference pass (median; warm-up excluded)."""
    import cifar10
    import train
    ds = cifar10.test_dataset(x, y, cifar10.pixel_mean(x), train.EVAL_BATCH_SIZE)
    model.predict(ds, verbose=0)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.predict(ds, verbose=0)
        times.append(time.perf_counter() - start)
    return len(y) / statistics.median(times)


def bench_train(args):
    """Interleaved throughput of every (norm, batch size, ours/baseline); prints the tables."""
    import train
    train.set_threads(args.threads)   # before TensorFlow starts; one process: baseline too
    print(f"TensorFlow intra-op threads {args.threads} (0: one per core), ours and keras alike; "
          f"ours: jit_compile={args.jit_compile}, mixed_precision={args.mixed_precision}")
    keras.utils.set_random_seed(0)
    x, y = synthetic(args.images)
    runs = {}
    for norm in args.norms:
        for n in args.batch_sizes:
            for kind, make in (("ours", ours), ("keras", baseline)):
                runs[norm, n, kind] = make(norm, n, args, x, y)
    rates = {key: [] for key in runs}
    for _ in range(args.repeats):
        for key, (model, fit) in runs.items():   # interleaved: each repeat visits every one
            timer = Throughput(key[1] * args.workers, args.warmup, args.seconds)
            fit(timer)
            rates[key].append(timer.rate)
    rate = {key: statistics.median(v) for key, v in rates.items()}
    evals = {norm: eval_rate(runs[norm, args.batch_sizes[0], "ours"][0], x[:2000], y[:2000])
             for norm in args.norms}
    print_train_table(args, rate, evals)
    print_sweep(args, rate, evals)


def print_train_table(args, rate, evals):
    top = max(args.batch_sizes)
    print(f"{'norm':<5}{'N':>4}{'W':>3}{'ours img/s':>12}{'keras img/s':>13}{'ours/keras':>12}"
          f"{'GN/BN':>7}{'keras GN/BN':>13}{f'N/{top}':>7}{f'keras N/{top}':>14}")
    for norm in args.norms:
        for n in args.batch_sizes:
            o, k = rate[norm, n, "ours"], rate[norm, n, "keras"]
            gn_bn = [f"{rate['gn', n, c] / rate['bn', n, c]:.2f}"
                     if {"bn", "gn"} <= set(args.norms) else "-" for c in ("ours", "keras")]
            print(f"{norm:<5}{n:>4}{args.workers:>3}{o:>12.0f}{k:>13.0f}{o / k:>12.2f}"
                  f"{gn_bn[0]:>7}{gn_bn[1]:>13}{o / rate[norm, top, 'ours']:>7.2f}"
                  f"{k / rate[norm, top, 'keras']:>14.2f}")
    print("evaluation (train.evaluate's inference, batch 1000): "
          + ", ".join(f"{norm} {r:.0f} img/s" for norm, r in evals.items()))


def print_sweep(args, rate, evals):
    """Wall time of train.py's grid at these rates: EPOCHS epochs of the official set."""
    import cifar10
    import train
    if set(args.batch_sizes) != set(train.BATCH_SIZES) or set(args.norms) != set(train.NORMS):
        print(f"sweep estimate: needs every norm {train.NORMS} and batch size {train.BATCH_SIZES}")
        return
    n_train, n_test = cifar10.OFFICIAL_COUNTS
    hours = {}
    for kind in ("ours", "keras"):
        seconds = 0.0
        for norm in train.NORMS:
            for n in train.BATCH_SIZES:
                step = n * args.workers
                trained = cifar10.steps_per_epoch(n_train, step) * step
                seconds += train.EPOCHS * (trained / rate[norm, n, kind] + n_test / evals[norm])
        hours[kind] = seconds / 3600
    runs = len(train.NORMS) * len(train.BATCH_SIZES)
    seeds = len(train.SEEDS)
    print(f"sweep at these rates ({runs} runs = {len(train.NORMS)} norms x {len(train.BATCH_SIZES)} "
          f"batch sizes, W = {args.workers}, {train.EPOCHS} epochs of {n_train:,} training + "
          f"{n_test:,} test images, one process at a time on this machine): "
          f"ours {hours['ours']:.1f} h, keras baseline {hours['keras']:.1f} h; "
          f"x {seeds} seeds: ours {seeds * hours['ours']:.1f} h")


# ---------------------------------------------------------------- bench.py loop (JAX)

def loop_rate(norm, batch_size, workers, mixed, loop, x, y, calls=2):
    """Images per second of one run's training, as train.py trains it on JAX: its model and
    compile_model, fed by backends.ScanLoop (`scan`) or model.fit (`fit`); compilation and
    the first call excluded, then the median of `calls` timed calls (scan: IMAGES_PER_SCAN
    images each; fit: one epoch of x each)."""
    import backends
    import cifar10
    import train
    cfg = train.Config(norm=norm, batch_size=batch_size, workers=workers, mixed_precision=mixed)
    step = batch_size * workers
    total = cifar10.steps_per_epoch(len(y), step)
    model = train.build_model(cfg)
    train.compile_model(model, cfg, total)
    padded = cifar10.padded(x, cifar10.pixel_mean(x))
    draws = cifar10.epoch_draws(len(y), cfg.seed, 0)
    if loop == "scan":
        steps = max(1, min(total, train.IMAGES_PER_SCAN // step))
        runner = backends.ScanLoop(model, padded, y, step, steps)

        def one():
            runner.run(draws, 0, steps)
        images = steps * step
    else:
        batches = train.Batches(cifar10.TrainBatches(padded, y, step, cfg.seed, 0))

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
    import backends
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("layer", help="GroupNorm layers vs BatchNorm, forward + backward")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[2, 32, 128])
    p.add_argument("--repeats", type=int, default=7, help="interleaved repeats (median)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per repeat")
    p.set_defaults(run=bench_layer)
    t = sub.add_parser("train", help="ResNet-20 training throughput, ours vs plain Keras")
    t.add_argument("--norms", nargs="+", choices=("bn", "gn"), default=["bn", "gn"])
    t.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 16, 8, 4, 2],
                   help="images per worker N (the largest is the reference of the N/max column)")
    t.add_argument("--workers", type=int, default=1, help="W workers of N images per step")
    t.add_argument("--repeats", type=int, default=3, help="interleaved repeats (median)")
    t.add_argument("--warmup", type=float, default=1.0, help="seconds of each fit not timed")
    t.add_argument("--seconds", type=float, default=2.0, help="timed seconds of each fit")
    t.add_argument("--images", type=int, default=4096, help="synthetic training images")
    t.add_argument("--quick", action="store_true", help="batch sizes 32 and 2, 2 repeats")
    t.add_argument("--threads", type=int, help="TensorFlow intra-op threads, 0 = one per core "
                                               "(default: train.py's THREADS)")
    t.add_argument("--jit-compile", action="store_true", help="ours with XLA (train.py --jit-compile)")
    t.add_argument("--mixed-precision", action="store_true",
                   help="ours in mixed_float16 (train.py --mixed-precision)")
    t.set_defaults(run=bench_train)
    s = sub.add_parser("loop", help="JAX: training img/s of the scan loop (train.py --loop scan) "
                                    "and of fit, as a GPU runs the sweep")
    s.add_argument("--norms", nargs="+", choices=("bn", "gn"), default=["bn", "gn"])
    s.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 2])
    s.add_argument("--workers", type=int, default=8)
    s.add_argument("--loops", nargs="+", choices=("scan", "fit"), default=["scan"])
    s.add_argument("--precisions", nargs="+", choices=("float32", "mixed"), default=["float32"])
    s.add_argument("--images", type=int, default=8192, help="synthetic training images")
    s.set_defaults(run=bench_loop)
    args = parser.parse_args(argv)
    if args.command == "loop":
        args.precisions = [p == "mixed" for p in args.precisions]
    if args.command == "train":
        for name in ("workers", "repeats", "images"):
            if getattr(args, name) < 1:
                parser.error(f"--{name} must be a positive integer, got {getattr(args, name)}")
        if min(args.batch_sizes) < 1:
            parser.error(f"--batch-sizes must be positive integers, got {args.batch_sizes}")
        if args.images < 2 * max(args.batch_sizes) * args.workers:
            parser.error(f"--images {args.images} should hold at least 2 steps of "
                         f"{max(args.batch_sizes) * args.workers} images")
        if args.threads is None:
            import train
            args.threads = train.THREADS
        if args.quick:
            args.batch_sizes, args.repeats = [32, 2], 2
    print(f"backend={keras.backend.backend()} keras={keras.__version__} "
          f"python={sys.version.split()[0]} cpus={os.cpu_count()} "
          f"load average={os.getloadavg()[0]:.2f}")
    args.run(args)
    print(f"load average at the end={os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
