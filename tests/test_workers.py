"""The paper's batch size per worker: W simulated workers in one model (WorkerBatchNormalization),
and K devices under TensorFlow's MirroredStrategy giving the same experiment."""
import json
import re
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from conftest import REPO

import keras  # noqa: E402
from gnrepro import backends  # noqa: E402
import layer  # noqa: E402
import train  # noqa: E402
from gnrepro import recipe  # noqa: E402


def randomize(model, seed=0):
    """Non-trivial gamma, beta and moving statistics (the builder's zero gammas would hide a
    wrong normalization in half the blocks)."""
    rng = np.random.default_rng(seed)
    values = []
    for v in model.weights:
        w = v.numpy()
        if v.path.endswith(("gamma", "beta", "moving_mean")):
            w = rng.normal(0, 0.5, w.shape)
        elif v.path.endswith("moving_variance"):
            w = rng.uniform(0.5, 2, w.shape)
        values.append(w.astype(np.float32))
    model.set_weights(values)


def images(n, seed=1):
    return np.random.default_rng(seed).normal(size=(n, 32, 32, 3)).astype(np.float32)


def to_np(x):
    return keras.ops.convert_to_numpy(x)   # any backend's tensor


def moving(model):
    return {v.path: v.numpy() for v in model.non_trainable_weights}


# --- the layer -------------------------------------------------------------------------

@pytest.mark.parametrize("rule", ["first", "mean"])
def test_worker_bn_matches_a_float64_reference(rule):
    """Three training steps: each worker's slice normalized with its own statistics; the moving
    mean and variance an exponential average of the first worker's statistics (the default,
    as the paper's code keeps them) or of the mean over the workers ("mean")."""
    workers, momentum, eps = 4, 0.9, 1e-5
    rng = np.random.default_rng(0)
    bn = layer.WorkerBatchNormalization(workers=workers, momentum=momentum, epsilon=eps,
                                        **({} if rule == "first" else dict(moving_statistics=rule)))
    bn.build((8, 3, 3, 5))
    gamma, beta, mean0, var0 = (rng.normal(0, 1, 5), rng.normal(0, 1, 5),
                                rng.normal(0, 1, 5), rng.uniform(0.5, 2, 5))
    bn.set_weights([a.astype(np.float32) for a in (gamma, beta, mean0, var0)])
    want_mean, want_var = mean0.copy(), var0.copy()
    for step in range(3):
        x = rng.normal(2 + step, 3, (8, 3, 3, 5)).astype(np.float32)
        y = to_np(bn(x, training=True))
        s = x.astype(np.float64).reshape(workers, -1, 3, 3, 5)
        mu, var = s.mean(axis=(1, 2, 3), keepdims=True), s.var(axis=(1, 2, 3), keepdims=True)
        want = ((s - mu) / np.sqrt(var + eps) * gamma + beta).reshape(x.shape)
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
        mu, var = mu.reshape(workers, 5), var.reshape(workers, 5)
        mu, var = (mu[0], var[0]) if rule == "first" else (mu.mean(axis=0), var.mean(axis=0))
        want_mean = momentum * want_mean + (1 - momentum) * mu
        want_var = momentum * want_var + (1 - momentum) * var
    np.testing.assert_allclose(bn.moving_mean.numpy(), want_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn.moving_variance.numpy(), want_var, rtol=1e-5, atol=1e-6)
    # Inference: the moving statistics, whatever the batch.
    after_mean, after_var = bn.moving_mean.numpy(), bn.moving_variance.numpy()
    np.testing.assert_allclose(to_np(bn(x[:3], training=False)),
                               (x[:3] - after_mean) / np.sqrt(after_var + eps) * gamma + beta,
                               rtol=1e-5, atol=1e-5)


def test_the_rule_is_saved_and_an_old_model_loads_and_predicts_as_before(tmp_path):
    """moving_statistics is in the layer's config; a model saved before the layer had it (no
    such key) loads, and inference does not depend on the rule."""
    import reproduce
    model = train.build_resnet20("bn", workers=4, moving_statistics="mean")
    randomize(model)
    model.save(tmp_path / "new.keras")
    assert reproduce.load_model(tmp_path / "new.keras").get_layer("stem_norm").moving_statistics \
        == "mean"
    old = tmp_path / "old.keras"   # the same file with the key taken out of every layer's config
    with zipfile.ZipFile(tmp_path / "new.keras") as z, zipfile.ZipFile(old, "w") as out:
        for item in z.infolist():
            data = z.read(item)
            if item.filename == "config.json":
                data = re.sub(rb', "moving_statistics": "mean"', b"", data)
                assert b"moving_statistics" not in data
            out.writestr(item, data)
    loaded = reproduce.load_model(old)
    x = images(6)
    np.testing.assert_array_equal(to_np(loaded(x, training=False)), to_np(model(x, training=False)))
    with pytest.raises(ValueError, match="moving_statistics should be one of"):
        layer.WorkerBatchNormalization(workers=2, moving_statistics="last")


@pytest.mark.parametrize("norm", ["bn", "gn"])
def test_two_workers_on_a_concatenation_equal_one_worker_on_each_half(norm):
    a, b = images(4, seed=1), images(4, seed=2)
    one = train.build_resnet20(norm)
    randomize(one)
    start = one.get_weights()
    out_a = to_np(one(a, training=True))
    moved_a = moving(one)
    one.set_weights(start)
    out_b = to_np(one(b, training=True))
    moved_b = moving(one)

    two = train.build_resnet20(norm, workers=2)
    two.set_weights(start)
    out = to_np(two(np.concatenate([a, b]), training=True))
    # To rounding: Keras' BN on torch is torch's own kernel, whose rounding differs from the
    # worker layer's keras.ops formula; TensorFlow's convolutions round a batch of 8 and two
    # of 4 alike on a CPU with AVX-512 but not on one with AVX2 only (seen: 8e-7)
    np.testing.assert_allclose(out, np.concatenate([out_a, out_b]), rtol=0, atol=5e-6)
    # and the moving statistics move by the first worker's update (the default rule)
    for path, value in moving(two).items():
        np.testing.assert_allclose(value, moved_a[path], atol=1e-6)
    # or, with the other rule, by the mean of the two workers' updates
    mean = train.build_resnet20(norm, workers=2, moving_statistics="mean")
    mean.set_weights(start)
    np.testing.assert_array_equal(to_np(mean(np.concatenate([a, b]), training=True)), out)
    for path, value in moving(mean).items():
        np.testing.assert_allclose(value, (moved_a[path] + moved_b[path]) / 2, atol=1e-6)
    if norm == "bn":
        assert moving(two) and not np.allclose(out, to_np(one(np.concatenate([a, b]), training=True)))


def test_inference_does_not_depend_on_workers_or_devices():
    x = images(6)   # not a multiple of 4: inference never slices
    reference = train.build_resnet20("bn")
    randomize(reference)
    want, want_compiled = to_np(reference(x, training=False)), reference.predict(x, verbose=0)
    for workers, devices in ((2, 1), (4, 1), (4, 2), (8, 8)):
        model = train.build_resnet20("bn", workers=workers, devices=devices)
        model.set_weights(reference.get_weights())
        np.testing.assert_array_equal(to_np(model(x, training=False)), want)
        np.testing.assert_array_equal(model.predict(x, verbose=0), want_compiled)


def test_builder_layers_per_device():
    def kinds(model):
        return {(type(l).__name__, getattr(l, "workers", None)) for l in model.layers
                if isinstance(l, keras.layers.BatchNormalization)}
    assert kinds(train.build_resnet20("bn")) == {("BatchNormalization", None)}
    assert kinds(train.build_resnet20("bn", workers=8)) == {("WorkerBatchNormalization", 8)}
    # TensorFlow's replicas each see W / K slices; JAX's DataParallel model sees all W
    per_replica = 4 if keras.backend.backend() == "tensorflow" else 8
    assert kinds(train.build_resnet20("bn", workers=8, devices=2)) == {("WorkerBatchNormalization",
                                                                        per_replica)}
    # one slice per device is still the worker layer: its moving statistics are the first
    # replica's (whose first slice is the batch's first), or with the other rule averaged
    # over the devices; Keras' BN would keep an arbitrary device's
    assert kinds(train.build_resnet20("bn", workers=2, devices=2)) == {
        ("WorkerBatchNormalization", per_replica // 4)}
    bn = train.build_resnet20("bn", workers=2, devices=2).get_layer("stem_norm")
    assert {v.aggregation for v in bn.non_trainable_weights} == {"only_first_replica"}
    bn = train.build_resnet20("bn", workers=2, devices=2,
                              moving_statistics="mean").get_layer("stem_norm")
    assert {v.aggregation for v in bn.non_trainable_weights} == {"mean"}
    assert sum(int(np.prod(w.shape)) for w in train.build_resnet20("bn", workers=8).trainable_weights) \
        == 272_474


def test_saved_worker_model_loads_in_safe_mode(tmp_path):
    import reproduce
    model = train.build_resnet20("bn", workers=4)
    randomize(model)
    model.save(tmp_path / "m.keras")
    loaded = reproduce.load_model(tmp_path / "m.keras")   # safe_mode=True, as reproduce.py does
    assert loaded.get_layer("stem_norm").workers == 4
    x = images(8)
    np.testing.assert_array_equal(to_np(loaded(x, training=True)), to_np(model(x, training=True)))


@pytest.mark.parametrize("kwargs, message", [
    (dict(workers=0), "workers should be a positive integer"),
    (dict(workers=True), "workers should be a positive integer"),
    (dict(workers="2"), "workers should be a positive integer"),
    (dict(workers=4, devices=3), "devices should be a positive integer that divides workers = 4"),
    (dict(workers=4, devices=0), "devices should be a positive integer that divides"),
])
def test_builder_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        train.build_resnet20("bn", **kwargs)


def test_layer_errors():
    with pytest.raises(ValueError, match="cannot be cut into 3 equal worker slices"):
        layer.WorkerBatchNormalization(workers=3)(np.zeros((4, 2, 2, 3), np.float32), training=True)
    with pytest.raises(ValueError, match="channels last"):
        layer.WorkerBatchNormalization(workers=2, axis=1)


# --- the recipe, the grid and the command line ---------------------------------------

def test_default_sweep_is_the_papers_eight_workers():
    assert recipe.WORKERS == 8 and recipe.SCALES["paper"]["workers"] == recipe.WORKERS
    entries = recipe.grid()
    assert {c.workers for c in entries} == {8}
    assert [c.name for c in entries[:10]] == [f"{n}_b{b}_w8_s1" for n in ("bn", "gn")
                                              for b in (32, 16, 8, 4, 2)]
    quick = recipe.SCALES["quick"]["workers"]
    assert {c.workers for c in recipe.grid("quick")} == {quick}


def test_learning_rate_is_per_worker_whatever_w():
    for workers in (1, 2, 8):
        assert [recipe.Config(batch_size=n, workers=workers).lr for n in (32, 4, 2)] == \
            [0.1, 0.0125, 0.00625]


def test_step_takes_w_times_n_images():
    cfg = recipe.Config(norm="bn", batch_size=4, workers=8)
    model = train.build_resnet20("bn", workers=8)
    train.compile_model(model, cfg, steps_per_epoch=10)
    backend = keras.backend.backend()
    # 64 images per call: 2 steps of 32 (PyTorch: one step per call in Keras 3.15)
    assert model.steps_per_execution == (1 if backend == "torch" else 2)
    train.compile_model(model, cfg, steps_per_epoch=10, devices=2)
    # several devices: one per call under MirroredStrategy; JAX's DataParallel keeps 2
    assert model.steps_per_execution == (2 if backend == "jax" else 1)


def resolve(*argv):
    p, args = recipe.parse_args(list(argv))
    return recipe.resolve(p, args)


def test_cli_workers():
    assert resolve("--task", "3").workers == 8
    assert resolve("--task", "3", "--workers", "2").name == "bn_b4_w2_s1"
    assert resolve("--norm", "gn", "--batch-size", "4").name == "gn_b4_w8_s1"
    assert resolve("--norm", "gn", "--batch-size", "4", "--workers", "1").name == "gn_b4_s1"
    assert resolve("--profile", "quick", "--task", "0").workers == recipe.SCALES["quick"]["workers"]
    assert resolve("--task", "3", "--devices", "4").workers == 8


@pytest.mark.parametrize("argv, message", [
    (["--task", "3", "--workers", "0"], "--workers must be a positive integer"),
    (["--task", "3", "--devices", "0"], "--devices must be a positive integer"),
    (["--task", "3", "--devices", "3"], "--devices 3 should divide the workers W = 8"),
    (["--task", "3", "--workers", "1", "--devices", "2"], "--devices 2 should divide the workers W = 1"),
])
def test_cli_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        resolve(*argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_more_devices_than_visible_is_a_clear_error():
    # Whatever this machine has: its GPUs, else one CPU device (this process does not split it).
    visible = len(backends.gpus()) or 1
    ask = visible + 1
    torch = keras.backend.backend() == "torch"
    message = (fr"--devices {ask}: Keras .* has no multi-device training for the torch backend"
               if torch else fr"--devices {ask}, but {visible} device\(s\) visible")
    with pytest.raises(SystemExit, match=message):
        backends.pick_devices(ask, ask)
    # By default, the most GPUs that divide W = 8, by hand: 1, 2, 4 or 8 of them (torch: 1).
    assert len(backends.pick_devices(8)) == (1 if torch else max(k for k in (1, 2, 4, 8)
                                                                  if k <= visible))


def test_default_devices_are_the_most_gpus_dividing_w(monkeypatch):
    """pick_devices' choice for 0 to 9 GPUs, whatever this machine has (its GPUs faked)."""
    def fake(count):
        names = [f"/device:GPU:{i}" for i in range(count)]
        monkeypatch.setattr(backends, "gpus", lambda: names)
        monkeypatch.setattr(backends, "_visible", lambda: names or ["/device:CPU:0"])
    chosen = {}
    for count in range(10):
        fake(count)
        chosen[count] = [len(backends.pick_devices(w)) for w in (8, 6, 1)]
    if keras.backend.backend() == "torch":   # one device whatever it sees
        assert chosen == {count: [1, 1, 1] for count in range(10)}
        return
    assert chosen == {0: [1, 1, 1], 1: [1, 1, 1], 2: [2, 2, 1], 3: [2, 3, 1], 4: [4, 3, 1],
                      5: [4, 3, 1], 6: [4, 6, 1], 7: [4, 6, 1], 8: [8, 6, 1], 9: [8, 6, 1]}
    fake(2)
    with pytest.raises(SystemExit, match=r"--devices 4, but 2 device\(s\) visible"):
        backends.pick_devices(8, 4)


def test_figure_says_how_many_workers(tmp_path, monkeypatch):
    import pandas as pd
    import plot
    figures = []
    monkeypatch.setattr(plot, "save_atomic", lambda fig, out: figures.append(fig))
    df = pd.DataFrame([dict(norm=n, groups=8, batch_size=b, workers=8, seed=1, epochs=2,
                            test_error=10.0, median_last5_error=10.0)
                       for n in ("bn", "gn") for b in (32, 2)])
    plot.plot_figure1(df, tmp_path / "plot.png")
    assert [ax.get_title() for ax in figures[0].axes] == [
        "CIFAR-10, ResNet-20, 8 workers (this reproduction)",
        "ImageNet, ResNet-50, 8 workers (paper, Table 2)"]


# --- several devices: MirroredStrategy on the CPU split in two -------------------------

# Logical devices must exist before TensorFlow starts: a process of its own. Two runs of
# W = 4 workers of N = 2 images, one step per epoch (10 training images), two epochs: on one
# device; and on two, stopped after epoch 1 and resumed.
SCRIPT = """
import glob
import sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import train
from gnrepro import signals
cifar, root = sys.argv[1:]
run = ["--norm", "bn", "--batch-size", "2", "--workers", "4", "--epochs", "2", "--train-images",
       "10", "--test-images", "10", "--data-dir", cifar, "--logs-dir", root + "/logs"]

class AfterFirstCheckpoint:   # a stop request that arrives with epoch 1's checkpoint
    requested = property(lambda self: bool(glob.glob(root + "/two/checkpoints/*.npz")))

assert train.main([*run, "--devices", "1", "--models-dir", root + "/one"]) == 0
two = [*run, "--devices", "2", "--models-dir", root + "/two"]
assert train.main(two, stop=AfterFirstCheckpoint()) == signals.PREEMPTED
sys.exit(train.main(two))
"""


@pytest.fixture(scope="module")
def mirrored(cifar_dir, tmp_path_factory):
    if keras.backend.backend() != "tensorflow":
        pytest.skip("MirroredStrategy is TensorFlow's (JAX's DataParallel: test_backends.py)")
    root = tmp_path_factory.mktemp("mirrored")
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(cifar_dir), str(root)], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return root, result.stdout


def saved(root, folder):
    path = root / folder / "bn_b2_w4_s1"
    return keras.models.load_model(f"{path}.keras"), json.loads(path.with_suffix(".json").read_text())


@pytest.mark.slow
def test_two_devices_resumed_give_the_weights_of_one(mirrored):
    root, out = mirrored
    assert "MirroredStrategy over /device:CPU:0, /device:CPU:1, 2 worker(s) of 2 images" in out
    assert "checkpointed at epoch 2, step 0" in out and "resuming at epoch 2, step 0" in out
    (one, one_record), (two, two_record) = saved(root, "one"), saved(root, "two")
    assert len(one_record["devices"]) == 1 and len(two_record["devices"]) == 2
    assert one_record["config"]["run"] == two_record["config"]["run"] and two_record["resumed"] == 1
    # Moving statistics included (Keras' own BN would keep one device's: off by ~1e-2), and
    # optimizer state (momentum, step count) restored on two devices (else off by ~1e-3).
    for v1, v2 in zip(one.weights, two.weights):
        np.testing.assert_allclose(v1.numpy(), v2.numpy(), atol=1e-6, err_msg=v1.path)
    assert not np.allclose(one.get_layer("stem_norm").moving_mean.numpy(), 0)
    # saved as one device holds it, whatever the run's devices
    assert two.get_layer("stem_norm").workers == 4


@pytest.mark.slow
def test_results_row_carries_workers(mirrored):
    import reproduce
    root, _ = mirrored
    path = root / "one" / "bn_b2_w4_s1.keras"
    record = reproduce.read_record(path)
    row = reproduce.make_row(record, path, record["test_loss"], record["test_error"], record["params"])
    assert (row["norm"], row["batch_size"], row["workers"]) == ("bn", 2, 4)
