"""Performance measurements, printed side by side (timing is not a test).

    python bench.py layer [--batch-sizes 2 32 128] [--repeats 7] [--steps 20]

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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("layer", help="GroupNorm layers vs BatchNorm, forward + backward")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[2, 32, 128])
    p.add_argument("--repeats", type=int, default=7, help="interleaved repeats (median)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per repeat")
    p.set_defaults(run=bench_layer)
    args = parser.parse_args(argv)
    print(f"backend={keras.backend.backend()} keras={keras.__version__} "
          f"python={sys.version.split()[0]} cpus={os.cpu_count()}")
    args.run(args)


if __name__ == "__main__":
    main()
