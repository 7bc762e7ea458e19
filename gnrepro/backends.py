"""What differs between Keras backends (TensorFlow, JAX, PyTorch), in one place.

Everything else (the model, the recipe, the data, the run) is written with `keras` and
`keras.ops` and runs unchanged on all three; this module holds what cannot be:

- threads and determinism (each library has its own switches, set before it starts);
- TensorFlow's setting of the C library's allocator, which tf.data changes (undo_malloc_patch);
- what fit and predict are fed on TensorFlow: tf.data without its autotuning, whose thread
  often holds the end of a call until it next wakes (fit_input, predict);
- devices: TensorFlow's MirroredStrategy (each replica sees its own W / K worker slices),
  JAX's keras.distribution.DataParallel (one global batch, sharded: the model sees all W
  slices), none on PyTorch (Keras 3.15 has no keras.distribution for it);
- the library versions that a run record names;
- the JAX training loop: K steps fused into one compiled call (`ScanLoop`), since Keras'
  JAX trainer runs steps_per_execution as a Python loop of one-step calls, which bounds
  small batches on a GPU by dispatch rather than by the GPU; and several runs that differ
  only in seed in that one call (a pack: Keras' train_step under jax.vmap over their
  stacked states; one run is a pack of one).

Nothing here imports TensorFlow, JAX or PyTorch unless that is the backend in use.
"""
import contextlib
import os
import sys

import keras
import numpy as np


def name():
    return keras.backend.backend()


def _note(message):
    print(f"note: {message}", file=sys.stderr, flush=True)


def _jax_started():
    """Whether JAX has created its devices (after which XLA_FLAGS are read no more)."""
    try:
        from jax._src import xla_bridge
        return bool(xla_bridge._backends)
    except (ImportError, AttributeError):   # a JAX without these internals: assume started
        return True


def _add_xla_flags(*flags):
    current = os.environ.get("XLA_FLAGS", "").split()
    os.environ["XLA_FLAGS"] = " ".join(current + [f for f in flags if f not in current])


def set_threads(threads):
    """Intra-op threads of the backend's CPU work (0: the library's default, one per core).
    Only before the backend starts computing; after that it keeps its setting and says so.
    JAX: passed to XLA's CPU flags, but JAX 0.10's CPU runtime was measured using 2 cores
    at 1 thread (bench.py backends): pin the process (taskset) where it matters."""
    backend = name()
    if backend == "tensorflow":
        import tensorflow as tf
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
        except RuntimeError:
            _note(f"TensorFlow already runs in this process with "
                  f"{tf.config.threading.get_intra_op_parallelism_threads()} intra-op threads "
                  f"(0: one per core), not --threads {threads}")
    elif backend == "jax":
        if threads and threads != intra_op_threads():
            if _jax_started():
                _note(f"JAX already runs in this process; --threads {threads} is not applied")
            else:
                _add_xla_flags("--xla_cpu_multi_thread_eigen=false",
                               f"intra_op_parallelism_threads={threads}")
                os.environ["TRAIN_THREADS"] = str(threads)
    elif backend == "torch":
        import torch
        torch.set_num_threads(threads or os.cpu_count() or 1)


def intra_op_threads():
    """The backend's intra-op threads as set (0: one per core), for the run record."""
    backend = name()
    if backend == "tensorflow":
        import tensorflow as tf
        return tf.config.threading.get_intra_op_parallelism_threads()
    if backend == "jax":
        return int(os.environ.get("TRAIN_THREADS", 0))
    import torch
    return torch.get_num_threads()


def enable_determinism():
    """Same inputs, same machine and library build: the same weights, bit for bit."""
    backend = name()
    if backend == "tensorflow":
        import tensorflow as tf
        tf.config.experimental.enable_op_determinism()
    elif backend == "jax":
        if not _jax_started():
            _add_xla_flags("--xla_gpu_deterministic_ops=true")
        elif gpus():
            _note("JAX already runs on a GPU in this process: XLA's deterministic GPU ops are off")
    elif backend == "torch":
        import torch
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3   # glibc's mallopt (malloc.h)
TF_MMAP_THRESHOLD = 128 << 10  # bytes: where TensorFlow's tf.data patch puts it
MMAP_THRESHOLD = 32 << 20      # bytes: glibc's ceiling on 64-bit, where train.py puts it back


def keep_heap(size=MMAP_THRESHOLD):
    """Set glibc's allocator to keep its heaps rather than hand memory back and forth with the
    kernel: allocations under `size` bytes come from a heap (M_MMAP_THRESHOLD); a heap keeps up
    to twice that free at its top (M_TRIM_THRESHOLD, as glibc sets it itself when it raises the
    mmap threshold); and a heap grows twice `size` at a time, so that at 32 MiB a thread's heap
    (64 MiB at most) is never deleted once made (M_TOP_PAD). Reserved address space grows, not
    memory in use. False where the C library has no such settings."""
    import ctypes
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):   # not glibc (macOS, Windows)
        return False
    settings = {M_MMAP_THRESHOLD: size, M_TRIM_THRESHOLD: 2 * size, M_TOP_PAD: 2 * size}
    # all of them: musl's mallopt does nothing and says 0
    return all([mallopt(param, value) == 1 for param, value in settings.items()])


def undo_malloc_patch():
    """Keep tensors on the heap under TensorFlow. The first tf.data GeneratorDataset of a process
    (fit_input makes one of each epoch's batches) sets glibc's mmap threshold to 128 KiB for
    the life of the process (tensorflow::data::ApplyPython311MemoryPatch), which also ends
    glibc's own raising of it. Every tensor of 128 KiB or more is then mapped, page-faulted
    in and unmapped, every step: on a 2-core VM half of a run's CPU time went to the kernel
    (bench.py malloc). Nor does glibc's raising of its trim threshold go on: each thread's heap
    gives its free top back to the kernel, or is deleted and made again, and faults it all in
    afresh, step after step (14-28 % of a paper-scale run's CPU time, in the kernel). So spend
    the patch now, on an empty dataset, then have glibc keep its heaps (keep_heap). Only where
    tensors live changes, not what is computed. Returns whether glibc took the settings
    (TensorFlow on glibc)."""
    if name() != "tensorflow":
        return False
    import tensorflow as tf
    spent = tf.data.Dataset.from_generator(lambda: iter(()),
                                           output_signature=tf.TensorSpec((), tf.int32))
    for _ in spent:
        pass
    return keep_heap()


def _untuned(dataset):
    import tensorflow as tf
    options = tf.data.Options()
    options.autotune.enabled = False
    return dataset.with_options(options)


def fit_input(sequence):
    """What model.fit trains on: the batches of `sequence` (a keras.utils.PyDataset of
    (inputs, labels) tuples of equal shapes, in order). On TensorFlow, the pipeline Keras makes
    of one (a generator of its batches, specs from the first with the batch axis None,
    prefetched), with tf.data's autotuning off. Its tuning thread wakes at intervals that
    double from 10 ms to 60 s, and a call often ended only at its next wake-up: many epochs of
    the paper-scale queue lasted exactly 322.0 or 382.0 s (bench.py input measures the wait).
    The same batches in the same order feed the same step; the prefetch buffer sizes itself."""
    if name() != "tensorflow" or len(sequence) == 0:
        return sequence
    import tensorflow as tf
    spec = tuple(tf.TensorSpec((None, *np.shape(a)[1:]), np.asarray(a).dtype)
                 for a in sequence[0])
    batches = tf.data.Dataset.from_generator(
        lambda: (tuple(sequence[i]) for i in range(len(sequence))), output_signature=spec)
    batches = batches.apply(tf.data.experimental.assert_cardinality(len(sequence)))
    return _untuned(batches.prefetch(tf.data.AUTOTUNE))


def predict(model, x, batch_size):
    """model.predict of the rows of x in order, in batches of batch_size: a NumPy array. On
    TensorFlow fed through tf.data without its autotuning (fit_input says why), the batch axis
    static where the batches are all full, as Keras feeds an array."""
    if name() == "tensorflow":
        import tensorflow as tf
        full = len(x) % batch_size == 0
        x = _untuned(tf.data.Dataset.from_tensor_slices(x).batch(batch_size, drop_remainder=full)
                     .prefetch(tf.data.AUTOTUNE))
        batch_size = None
    return model.predict(x, batch_size=batch_size, verbose=0)


def versions():
    """Library versions that decide a run's numbers."""
    import platform
    out = {"python": platform.python_version(), "keras": keras.__version__,
           "backend": name(), "numpy": np.__version__}
    backend = name()
    if backend == "tensorflow":
        import tensorflow as tf
        out["tensorflow"] = tf.__version__
    elif backend == "jax":
        import jax
        import jaxlib
        out |= {"jax": jax.__version__, "jaxlib": jaxlib.__version__}
    elif backend == "torch":
        import torch
        out["torch"] = torch.__version__
    return out


def gpus():
    """Names of the GPUs the backend sees."""
    backend = name()
    if backend == "tensorflow":
        import tensorflow as tf
        return [d.name for d in tf.config.list_logical_devices("GPU")]
    if backend == "jax":
        import jax
        return [str(d) for d in jax.devices() if d.platform == "gpu"]
    import torch
    return [f"cuda:{i}" for i in range(torch.cuda.device_count())]


def gpu_cards():
    """The models of the GPUs the backend sees (e.g. 'NVIDIA H200'), for the run record."""
    backend = name()
    if backend == "tensorflow":
        import tensorflow as tf
        return [tf.config.experimental.get_device_details(d).get("device_name", d.name)
                for d in tf.config.list_physical_devices("GPU")]
    if backend == "jax":
        import jax
        return [d.device_kind for d in jax.devices() if d.platform == "gpu"]
    import torch
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def _visible():
    backend = name()
    if backend == "tensorflow":
        import tensorflow as tf
        return gpus() or [d.name for d in tf.config.list_logical_devices("CPU")]
    if backend == "jax":
        import jax
        return [str(d) for d in jax.devices()]
    return gpus() or ["cpu"]


def pick_devices(workers, devices=None):
    """Names of the run's K devices: `devices` of them, else the most visible GPUs dividing W.

    Each holds W / K of a step's worker slices. Without GPUs they are the CPU's devices: one,
    unless the process split the CPU before the backend started (the tests do).
    """
    found = gpus()
    visible = _visible()
    if devices is None and name() == "torch":
        devices = 1   # no multi-device training for torch in Keras 3.15 (see below)
        if len(found) > 1:
            _note(f"{len(found)} GPUs visible; the torch backend trains on one")
    if devices is None:
        devices = max(k for k in range(1, len(found) + 1) if workers % k == 0) if found else 1
        if devices < len(found):
            _note(f"{len(found)} GPUs visible; W = {workers} workers use {devices} "
                  f"(K devices must divide W)")
    if workers % devices:
        raise SystemExit(f"error: --devices {devices} should divide the workers W = {workers}")
    if devices > 1 and name() == "torch":
        raise SystemExit(f"error: --devices {devices}: Keras {keras.__version__} has no "
                         f"multi-device training for the torch backend; use --devices 1, or "
                         f"KERAS_BACKEND=jax or tensorflow")
    if devices > len(visible):
        raise SystemExit(f"error: --devices {devices}, but {len(visible)} device(s) visible: "
                         f"{', '.join(visible)}")
    return visible[:devices]


def slices_per_replica(workers, devices):
    """How many worker slices one model replica's batch holds: W / K under TensorFlow's
    MirroredStrategy (each replica runs the model on its own part of the step), W under
    JAX's DataParallel (the model runs once on the global, sharded batch)."""
    return workers // devices if name() == "tensorflow" else workers


def parallel_name():
    return "MirroredStrategy" if name() == "tensorflow" else "keras.distribution.DataParallel"


@contextlib.contextmanager
def distributed(names):
    """The scope in which a model for these devices is built, compiled and trained."""
    if len(names) == 1:
        yield
        return
    if name() == "tensorflow":
        import tensorflow as tf
        with tf.distribute.MirroredStrategy(names).scope():
            yield
        return
    import jax
    devices = [d for d in jax.devices() if str(d) in names]
    distribution = keras.distribution.DataParallel(devices=devices)
    previous = keras.distribution.distribution()
    keras.distribution.set_distribution(distribution)
    try:
        yield
    finally:
        keras.distribution.set_distribution(previous)


def jit_compile():
    """Keras' jit_compile for the training step. TensorFlow: off. Keras' "auto" would mean XLA
    on a GPU, which TensorFlow's op determinism (enable_determinism) rules out anyway, and on
    2 CPU cores XLA made the step slower. JAX: always jitted ("auto"); PyTorch: eager."""
    return False if name() == "tensorflow" else "auto"


def steps_per_execution(wanted, devices):
    """Keras' steps_per_execution, where the backend can do several steps per call (else 1,
    said once per process in a note)."""
    if name() == "torch" or (name() == "tensorflow" and devices > 1):
        # torch in Keras 3.15: steps_per_execution > 1 is not supported by its trainer;
        # TensorFlow under MirroredStrategy fails with several ("You must feed a value for
        # placeholder tensor").
        if wanted > 1 and not _said_one_step:
            _said_one_step.append(True)
            where = "PyTorch" if name() == "torch" else "TensorFlow on several devices"
            _note(f"{where} runs one training step per compiled call "
                  f"(steps_per_execution 1, not {wanted})")
        return 1
    return wanted


_said_one_step = []   # the note above, once per process


# ---------------------------------------------------------------------------
# JAX: several training steps per compiled call, for one model or a pack of K.

def _stack(states):
    """K states of one architecture (Keras' _get_jax_state tuples) -> one tuple of (K, ...)."""
    import jax
    import jax.numpy as jnp
    return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *states)


def _member(state, k):
    import jax
    return jax.tree_util.tree_map(lambda a: a[k], state)


class ScanLoop:
    """Train K compiled Keras models of one architecture on JAX (a pack; K = 1 is a solo run),
    `steps` steps fused into one jitted call.

    Each call runs Keras' own stateless `model.train_step` (the function `fit` jits: loss,
    regularization, loss scaling, SGD, metrics) under `jax.lax.scan`, with the batches
    built on the device: the training set, normalized and padded once (`padded`, float32
    (n, 40, 40, 3)), is indexed, cropped and mirrored by the integer draws the host makes
    for each member's (seed, epoch) (cifar10.epoch_draws), so only those draws cross to the
    device. The batches are therefore the ones cifar10.TrainBatches gives `fit`, bit for bit.

    A pack is the step transformed, not the model: the K models' states are stacked on a
    leading axis and `jax.vmap` maps train_step over them and over the K members' batches
    (for K = 1 the step runs unmapped, so a solo run compiles to what it always did). A
    call runs exactly the steps asked for (a scan of that length: no per-step lax.cond; a
    new length compiles once more, so callers keep the lengths few: train.scan_loop).
    unroll: lax.scan's, steps per loop iteration (fewer iterations, longer compile).
    """

    def __init__(self, models, padded, labels, batch, steps, unroll=1):
        import jax
        import jax.numpy as jnp
        from gnrepro.cifar10 import SIDE
        self.models = list(models) if isinstance(models, (list, tuple)) else [models]
        self.model = self.models[0]   # whose (stateless) train_step every member runs
        self.batch, self.steps, self.unroll = batch, steps, unroll
        # What fit does before its first step: build the compiled loss and metrics, whose
        # variables are part of the state.
        for model in self.models:
            model._symbolic_build(data_batch=(
                np.zeros((batch, SIDE, SIDE, padded.shape[-1]), np.float32), np.zeros(batch, np.int32)))
        self.padded = jnp.asarray(padded)
        self.labels = jnp.asarray(labels, jnp.int32)
        self._call = jax.jit(self._run)

    def _images(self, index, rows, cols, flips):
        import jax
        import jax.numpy as jnp
        from gnrepro.cifar10 import SIDE

        def crop(image, r, c):
            return jax.lax.dynamic_slice(image, (r, c, 0), (SIDE, SIDE, image.shape[-1]))
        x = jax.vmap(crop)(self.padded[index], rows, cols)
        return jnp.where(flips[:, None, None, None] == 1, x[:, :, ::-1], x)

    def _train(self, state, index, rows, cols, flips):
        """One member's step: its batch, cut from its draws, through Keras' train_step."""
        x = self._images(index, rows, cols, flips)
        return self.model.train_step(state, (x, self.labels[index]))[1]

    def _step(self, state, draws):
        """One step of every member: state (K, ...), draws 4 x (K, batch)."""
        import jax
        if len(self.models) > 1:
            return jax.vmap(self._train)(state, *draws)
        one = self._train(_member(state, 0), *(d[0] for d in draws))
        return jax.tree_util.tree_map(lambda a: a[None], one)

    def _run(self, state, draws):
        import jax
        return jax.lax.scan(lambda s, d: (self._step(s, d), None), state, draws,
                            unroll=self.unroll)[0]

    def state(self):
        """The members' states, stacked: 4 lists (trainable, non-trainable, optimizer,
        metrics variables) of (K, ...) arrays."""
        return _stack([m._get_jax_state(trainable_variables=True, non_trainable_variables=True,
                                        optimizer_variables=True, metrics_variables=True)
                       for m in self.models])

    def sync(self, state):
        """Write each member's slice of the stacked state into its Keras model."""
        for k, m in enumerate(self.models):
            groups = (m.trainable_variables, m.non_trainable_variables, m.optimizer.variables,
                      m.metrics_variables)
            for refs, values in zip(groups, _member(state, k)):
                for ref, value in zip(refs, values):
                    ref.assign(value)

    def chunk(self, draws, done, n):
        """The draws of steps done..done+n-1 of every member, as a call takes them: 4 int32
        arrays (n, K, batch) from each member's (order, rows, cols, flips)."""
        pos = np.arange(done * self.batch, (done + n) * self.batch).reshape(n, self.batch)
        return tuple(np.stack([d[i][pos] for d in draws], axis=1).astype(np.int32)
                     for i in range(4))

    def run(self, draws, start, stop, should_stop=lambda: False):
        """Train steps start..stop-1 of the epoch, in calls of at most self.steps; draws: each
        member's cifar10.epoch_draws (order, rows, cols, flips, each (n,)) in a list (a bare
        tuple for a pack of one); should_stop() is asked between calls whether to stop early.
        Returns the steps done and each member's metrics (a dict for a pack of one)."""
        import jax.numpy as jnp
        single = isinstance(draws, tuple)
        draws = [draws] if single else list(draws)
        if len(draws) != len(self.models):
            raise ValueError(f"{len(draws)} members' draws for a pack of {len(self.models)}")
        done, state = start, self.state()
        while done < stop:
            n = min(self.steps, stop - done)
            state = self._call(state, tuple(map(jnp.asarray, self.chunk(draws, done, n))))
            done += n
            if should_stop():
                break
        self.sync(state)
        logs = [{k: float(v) for k, v in m.get_metrics_result().items()} for m in self.models]
        return done, logs[0] if single else logs
