"""Every Keras backend, end to end: the same program on TensorFlow, JAX and PyTorch.

    KERAS_BACKEND=jax .venv-backends/bin/python -m pytest -q tests/test_backends.py     # and torch
    .venv/bin/python -m pytest -q tests/test_backends.py                               # TensorFlow

`make test-backends` runs this file under JAX and under PyTorch in .venv-backends, which has
no TensorFlow; `make test-tf` runs it under TensorFlow. Each test skips under the backends it
is not about:

- JAX and PyTorch: the whole pipeline on the tiny fixture (train.py, a SIGUSR1 mid-epoch and
  the resume giving the weights of an uninterrupted run, reproduce.py, plot.py, TensorBoard
  scalars), and that TensorFlow cannot even be imported there;
- JAX: backends.ScanLoop against model.fit (same weights, same batches), a scan run stopped
  mid-epoch and resumed bit for bit, and two CPU devices (keras.distribution.DataParallel)
  against one;
- PyTorch: what it cannot do (several devices, several steps per call) said in one line;
- TensorFlow: a JAX-trained model evaluated under TensorFlow, and the first training step's
  loss from the same weights on the same batch on all three backends (.venv-backends/bin/python
  in subprocesses; skipped where that venv is missing).
"""
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import types
import zipfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from conftest import (REPO, assert_same_arrays, backends_python, loop_acting_in_call,
                      saved_arrays)

import keras  # noqa: E402
from gnrepro import backends  # noqa: E402
from gnrepro import cifar10  # noqa: E402
import train  # noqa: E402
from gnrepro import loops, recipe, signals  # noqa: E402

BACKEND = keras.backend.backend()

jax_or_torch = pytest.mark.skipif(BACKEND == "tensorflow",
                                  reason="JAX and PyTorch only (make test-backends runs them)")
jax_only = pytest.mark.skipif(BACKEND != "jax", reason="JAX only")
torch_only = pytest.mark.skipif(BACKEND != "torch", reason="PyTorch only")
tensorflow_only = pytest.mark.skipif(
    BACKEND != "tensorflow", reason="cross-backend tests run under TensorFlow (make test-tf)")


def record(path):
    return json.loads(path.with_suffix(".json").read_text())


# --- JAX and PyTorch: the whole pipeline, without TensorFlow ----------------------------

# Two runs of two epochs: BN with W = 2 workers of N = 2 on 300 images (stopped by SIGUSR1 in
# epoch 2 and resumed, beside an uninterrupted copy), and GN at N = 4 on 200 images.
BN = ["--norm", "bn", "--batch-size", "2", "--workers", "2", "--seed", "1", "--epochs", "2",
      "--train-images", "300"]
GN = ["--norm", "gn", "--batch-size", "4", "--workers", "1", "--seed", "2", "--epochs", "2",
      "--train-images", "200"]
BN_NAME, GN_NAME = "bn_b2_w2_s1", "gn_b4_s2"
BN_STEPS = 300 // 4   # steps per epoch
ONE_STEP_NOTE = "note: PyTorch runs one training step per compiled call"


@pytest.fixture(scope="session")
def env(tmp_path_factory):
    """The subprocesses' environment: JAX's persistent compilation cache in a folder of this
    session's, so that a process after the first reuses what an earlier one compiled (the
    same executables; on 2 CPU cores it halves a tiny run's time). Ignored by PyTorch."""
    return {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax_cache")),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def train_command(args, cifar_dir, root):
    return [sys.executable, "-u", "train.py", *args, "--data-dir", str(cifar_dir),
            "--models-dir", str(root / "models"), "--logs-dir", str(root / "logs")]


def start(command, log, env):
    with open(log, "w") as out, open(log.with_suffix(".err"), "w") as err:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=err)


def outputs(log):
    return log.read_text(), log.with_suffix(".err").read_text()


def start_and_interrupt(command, log, env):
    """Start a run on a terminal (so that it shows its progress bar) and send SIGUSR1 when the
    bar first moves in epoch 2: mid-epoch whatever the machine's speed (the run stops at the
    end of the compiled call it is in). Returns (exit status, output)."""
    import pty
    terminal, child_end = pty.openpty()
    with open(log.with_suffix(".err"), "w") as err:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                                stdout=child_end, stderr=err)
    os.close(child_end)
    output, sent = b"", False
    while True:
        try:
            chunk = os.read(terminal, 4096)
        except OSError:   # EIO: the run has ended and closed its terminal
            break
        if not chunk:
            break
        output += chunk
        epoch2 = output.decode(errors="replace").partition(" epoch 1/2 ")[2]
        if not sent and re.search(rf"(?<!\d)[1-9]\d*/{BN_STEPS}\b", epoch2):
            proc.send_signal(signal.SIGUSR1)
            sent = True
    os.close(terminal)
    text = output.decode(errors="replace").replace("\r\n", "\n")
    log.write_text(text)
    return proc.wait(timeout=300), text


def finish(proc, log):
    assert proc.wait(timeout=600) == 0, outputs(log)


@pytest.fixture(scope="module")
def pipeline(cifar_dir, tmp_path_factory, env):
    """The runs, then reproduce.py and plot.py on root/models; two processes at a time
    (2 cores): the reference beside the stopped run, GN beside the resumed one."""
    root = tmp_path_factory.mktemp("pipeline")
    logs = {name: root / f"{name}.log" for name in ("reference", "stopped", "gn", "resumed")}
    reference = start(train_command(BN, cifar_dir, root / "reference"), logs["reference"], env)
    code, out = start_and_interrupt(train_command(BN, cifar_dir, root), logs["stopped"], env)
    finish(reference, logs["reference"])
    gn = start(train_command(GN, cifar_dir, root), logs["gn"], env)
    finish(start(train_command(BN, cifar_dir, root), logs["resumed"], env), logs["resumed"])
    finish(gn, logs["gn"])
    results = root / "results.csv"
    finish(start([sys.executable, "reproduce.py", "--models-dir", str(root / "models"), "--out",
                  str(results), "--data-dir", str(cifar_dir)], root / "reproduce.log", env),
           root / "reproduce.log")
    figure = start([sys.executable, "plot.py", "--results", str(results), "--out",
                    str(root / "plot.png")], root / "plot.log", env)
    curves = start([sys.executable, "plot.py", "--curves", "--models-dir", str(root / "models"),
                    "--out", str(root / "curves.png")], root / "curves.log", env)
    finish(curves, root / "curves.log")
    finish(figure, root / "plot.log")
    return types.SimpleNamespace(root=root, stopped_code=code, stopped=out,
                                 resumed=outputs(logs["resumed"])[0])


@jax_or_torch
def test_tensorflow_cannot_be_imported():
    """What the pipeline test proves: none of it needs TensorFlow."""
    assert importlib.util.find_spec("tensorflow") is None
    result = subprocess.run([sys.executable, "-c", "import tensorflow"], capture_output=True,
                            text=True)
    assert result.returncode == 1 and "No module named 'tensorflow'" in result.stderr
    assert "tensorflow" not in sys.modules


@jax_or_torch
def test_runs_write_models_and_records(pipeline):
    models = pipeline.root / "models"
    for name, workers in ((BN_NAME, 2), (GN_NAME, 1)):
        rec = record(models / f"{name}.keras")
        assert rec["versions"]["backend"] == BACKEND and "tensorflow" not in rec["versions"]
        assert [e["epoch"] for e in rec["history"]] == [1, 2]
        assert rec["config"]["workers"] == workers and len(rec["devices"]) == 1
        assert rec["loop"] == "fit" and rec["test_error"] == rec["history"][-1]["test_error"]
    assert record(models / f"{GN_NAME}.keras")["data"]["train_images"] == 200
    assert not list(models.glob("checkpoints/*")), "the checkpoints are removed at the end"


@jax_or_torch
def test_sigusr1_mid_epoch_then_resume_gives_the_uninterrupted_weights(pipeline):
    out = pipeline.stopped
    assert pipeline.stopped_code == signals.PREEMPTED, out[-3000:]
    assert "received SIGUSR1" in out and "checkpointed at epoch 2, step " in out
    step = int(out.split("checkpointed at epoch 2, step ")[1].split()[0])
    assert 0 < step < BN_STEPS, "stopped mid-epoch"
    assert f"resuming at epoch 2, step {step}" in pipeline.resumed
    ours, reference = (pipeline.root / "models" / f"{BN_NAME}.keras",
                       pipeline.root / "reference" / "models" / f"{BN_NAME}.keras")
    assert_same_arrays(reference, ours)   # moving statistics and optimizer state too
    assert record(ours)["resumed"] == 1
    for a, b in zip(record(reference)["history"], record(ours)["history"]):
        assert a["test_error"] == b["test_error"] and a["test_loss"] == b["test_loss"]
        # the interrupted epoch's training metrics too (fit restores their state)
        assert (a["train_loss"], a["train_error"]) == (b["train_loss"], b["train_error"])


@jax_or_torch
def test_reproduce_and_plot(pipeline):
    import pandas as pd
    root = pipeline.root
    table = pd.read_csv(root / "results.csv")
    assert list(table["norm"]) == ["bn", "gn"] and list(table["workers"]) == [2, 1]
    assert list(table["batch_size"]) == [2, 4] and set(table["epochs"]) == {2}
    for row in table.itertuples():
        rec = record(Path(row.model))
        # evaluated again, by reproduce.py in its own process: the run's own test error
        assert row.test_error == round(rec["test_error"], 2)
        assert row.median_last5_error == round(rec["median_last5_error"], 2)
    for png in ("plot.png", "curves.png"):
        data = (root / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


@jax_or_torch
def test_tensorboard_scalars_of_a_resumed_run_are_readable(pipeline):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util
    events = EventAccumulator(str(pipeline.root / "logs" / BN_NAME), size_guidance={"tensors": 0})
    events.Reload()
    history = record(pipeline.root / "models" / f"{BN_NAME}.keras")["history"]
    assert {"train/loss", "train/error", "test/loss", "test/error", "lr",
            "images_per_second"} <= set(events.Tags()["tensors"])
    for tag, key in (("test/error", "test_error"), ("train/loss", "train_loss"), ("lr", "lr")):
        scalars = events.Tensors(tag)   # epoch 1 from the stopped process, 2 from the resumed
        assert [e.step for e in scalars] == [1, 2]
        values = [float(tensor_util.make_ndarray(e.tensor_proto)) for e in scalars]
        assert values == pytest.approx([h[key] for h in history], rel=1e-6)


@jax_or_torch
def test_one_step_per_call_is_said_once_on_torch_only(pipeline):
    for name in ("reference", "gn", "stopped", "resumed"):
        err = (pipeline.root / f"{name}.err").read_text()
        assert err.count(ONE_STEP_NOTE) == (1 if BACKEND == "torch" else 0), err[-2000:]


# --- PyTorch: what it cannot do, in one line ---------------------------------------------

@torch_only
def test_torch_steps_per_execution_is_one_with_a_note_once(monkeypatch, capsys):
    monkeypatch.setattr(backends, "_said_one_step", [])
    assert backends.steps_per_execution(1, 1) == 1
    assert capsys.readouterr().err == ""   # nothing asked, nothing refused
    assert [backends.steps_per_execution(16, 1) for _ in range(2)] == [1, 1]
    assert capsys.readouterr().err == (f"{ONE_STEP_NOTE} (steps_per_execution 1, not 16)\n")
    cfg = recipe.Config(norm="bn", batch_size=2, workers=2)
    model = train.build_model(cfg)
    train.compile_model(model, cfg, steps_per_epoch=10)
    assert model.steps_per_execution == 1 and capsys.readouterr().err == ""


@torch_only
def test_torch_two_devices_is_one_clear_error(cifar_dir, tmp_path):
    message = (f"error: --devices 2: Keras {keras.__version__} has no multi-device training for "
               f"the torch backend; use --devices 1, or KERAS_BACKEND=jax or tensorflow")
    with pytest.raises(SystemExit, match="^" + message.replace(".", r"\.") + "$"):
        backends.pick_devices(2, 2)
    result = subprocess.run(train_command([*BN, "--devices", "2"], cifar_dir, tmp_path), cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert (result.returncode, result.stderr) == (1, message + "\n")   # that line and nothing else
    assert not (tmp_path / "models").exists(), "it fails before reading data or training"


# --- JAX: the scan loop against fit --------------------------------------------------------

SCAN_IMAGES = 40   # 10 steps of 4 images, in compiled calls of 3 (the last one masked)


def scan_setup(cifar_dir, norm, batch_size, workers, train_images=SCAN_IMAGES, seed=1):
    cfg = recipe.Config(norm=norm, batch_size=batch_size, workers=workers, seed=seed, epochs=1,
                       train_images=train_images)
    data = cifar10.prepare_data(cifar_dir, train_images)
    return cfg, data, cifar10.steps_per_epoch(len(data.y_train), batch_size * workers)


def compiled(cfg, steps, start=None):
    model = train.build_model(cfg)
    train.compile_model(model, cfg, steps)
    if start is not None:
        model.set_weights(start)
    return model


@jax_only
def test_scan_batches_are_the_fit_batches_byte_for_byte(cifar_dir):
    import jax
    import jax.numpy as jnp
    cfg, data, steps = scan_setup(cifar_dir, "gn", 4, 1)
    loop = backends.ScanLoop(compiled(cfg, steps), data.padded, data.y_train, 4, 3)
    images = jax.jit(loop._images)
    for epoch in (0, 1):
        draws = cifar10.epoch_draws(len(data.y_train), cfg.seed, epoch)
        assert set(draws[3]) == {0, 1} and len(set(draws[1])) > 1   # flips and shifts both drawn
        batches = cifar10.TrainBatches(data.padded, data.y_train, 4, cfg.seed, epoch)
        for i in range(len(batches)):
            index, rows, cols, flips = (jnp.asarray(a[4 * i:4 * i + 4].astype(np.int32))
                                        for a in draws)   # as ScanLoop.run cuts them
            x, y = np.asarray(images(index, rows, cols, flips)), np.asarray(loop.labels[index])
            want_x, want_y = batches[i]
            assert x.dtype == want_x.dtype and x.shape == want_x.shape
            assert x.tobytes() == want_x.tobytes() and np.array_equal(y, want_y)


@jax_only
@pytest.mark.parametrize("norm, batch_size, workers, rule", [
    ("bn", 2, 2, "first"), ("bn", 2, 2, "mean"), ("gn", 4, 1, "first")])
def test_scan_loop_equals_fit(cifar_dir, norm, batch_size, workers, rule):
    """Both of BN's moving-statistics rules: the scan loop runs the same layer as fit."""
    cfg, data, steps = scan_setup(cifar_dir, norm, batch_size, workers)
    cfg = recipe.Config(**{**asdict(cfg), "moving_statistics": rule})
    assert cfg.moving_statistics == rule
    keras.utils.set_random_seed(cfg.seed)
    fitted = compiled(cfg, steps)
    start = fitted.get_weights()
    scanned = compiled(cfg, steps, start)
    batch = batch_size * workers
    batches = cifar10.TrainBatches(data.padded, data.y_train, batch, cfg.seed, 0)
    history = fitted.fit(loops.Batches(batches), epochs=1, verbose=0, shuffle=False).history
    loop = backends.ScanLoop(scanned, data.padded, data.y_train, batch, 3)
    done, logs = loop.run(cifar10.epoch_draws(len(data.y_train), cfg.seed, 0), 0, steps)
    assert done == steps == 10
    assert int(scanned.optimizer.iterations.numpy()) == int(fitted.optimizer.iterations.numpy())
    for ref, got in zip(fitted.weights, scanned.weights):   # moving statistics too
        np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=0, atol=1e-6, err_msg=ref.path)
    assert max(np.abs(w - b).max() for w, b in zip(fitted.get_weights(), start)) > 1e-3, "it trained"
    for ref, got in zip(fitted.optimizer.variables, scanned.optimizer.variables):
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=0, atol=1e-6)
    assert logs == pytest.approx({k: v[-1] for k, v in history.items()}, rel=1e-5)


def stopping_loop(stop, at_call):
    """backends.ScanLoop whose at_call-th compiled call raises the stop flag while it runs
    (as a signal would: the loop notices between calls)."""
    return loop_acting_in_call(at_call, lambda: setattr(stop, "requested", "SIGUSR1 (test)"))


@jax_only
def test_scan_run_stopped_mid_epoch_resumes_bit_for_bit(cifar_dir, tmp_path, monkeypatch):
    # 20 images, W = 2 workers of N = 2: 5 steps an epoch, 3 per compiled call.
    cfg = recipe.Config(norm="bn", batch_size=2, workers=2, seed=1, epochs=2, train_images=20,
                       test_images=20)
    monkeypatch.setattr(loops, "IMAGES_PER_SCAN", 12)

    def run(folder, stop):
        return train.train(cfg, cifar_dir, tmp_path / folder, tmp_path / folder / "logs",
                           stop=stop, loop="scan")
    assert run("reference", types.SimpleNamespace(requested=None)) == 0
    stop = types.SimpleNamespace(requested=None)
    with monkeypatch.context() as patch:
        patch.setattr(backends, "ScanLoop", stopping_loop(stop, at_call=1))
        assert run("resumed", stop) == signals.PREEMPTED
    with np.load(tmp_path / "resumed" / "checkpoints" / f"{cfg.name}.npz") as z:
        state = json.loads(str(z["state"]))
    assert (state["epoch"], state["step"]) == (0, 3), "stopped after the first call of epoch 1"
    assert run("resumed", types.SimpleNamespace(requested=None)) == 0
    reference, resumed = (tmp_path / f / f"{cfg.name}.keras" for f in ("reference", "resumed"))
    assert_same_arrays(reference, resumed)
    assert record(resumed)["loop"] == "scan" and record(resumed)["resumed"] == 1
    for a, b in zip(record(reference)["history"], record(resumed)["history"]):
        assert a["test_error"] == b["test_error"] and a["test_loss"] == b["test_loss"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)


# --- JAX: two devices (keras.distribution.DataParallel on the CPU split in two) ----------

# XLA's devices are made when JAX starts: a process of its own, with XLA_FLAGS set. W = 4
# workers of N = 2, 40 images (5 steps an epoch), two epochs: on one device, and on two.
DEVICES_SCRIPT = """
import sys
import train
cifar, root = sys.argv[1:]
run = ["--norm", "bn", "--batch-size", "2", "--workers", "4", "--epochs", "2", "--train-images",
       "40", "--test-images", "20", "--data-dir", cifar, "--loop", "fit"]
models, compile_model = [], train.compile_model
train.compile_model = lambda model, *a, **k: models.append(model) or compile_model(model, *a, **k)
for k in ("1", "2"):
    code = train.main([*run, "--devices", k, "--models-dir", f"{root}/{k}",
                       "--logs-dir", f"{root}/logs{k}"])
    assert code == 0, code
    weight = models[-1].trainable_variables[0].value
    print(f"--devices {k}: weights on", len(weight.sharding.device_set), "device(s)")
"""


@jax_only
def test_two_jax_devices_give_the_weights_of_one(cifar_dir, tmp_path, env):
    env = {**env, "XLA_FLAGS": (env.get("XLA_FLAGS", "") +
                                " --xla_force_host_platform_device_count=2").strip()}
    result = subprocess.run([sys.executable, "-c", DEVICES_SCRIPT, str(cifar_dir), str(tmp_path)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "keras.distribution.DataParallel over cpu:0, cpu:1, 2 worker(s) of 2 images" in result.stdout
    assert "--devices 1: weights on 1 device(s)" in result.stdout
    assert "--devices 2: weights on 2 device(s)" in result.stdout   # replicated: DataParallel is on
    one, two = (tmp_path / k / "bn_b2_w4_s1.keras" for k in ("1", "2"))
    assert len(record(one)["devices"]) == 1 and len(record(two)["devices"]) == 2
    assert record(one)["config"]["run"] == record(two)["config"]["run"]
    a1, a2 = saved_arrays(one), saved_arrays(two)
    assert a1.keys() == a2.keys()
    for name, value in a1.items():   # moving statistics and optimizer state included
        np.testing.assert_allclose(a2[name], value, rtol=0, atol=1e-6, err_msg=name)
    assert not np.allclose(a1["layers/worker_batch_normalization/vars/2"], 0), "moving mean moved"
    with zipfile.ZipFile(two) as z:   # the model sees all W slices of the global batch
        layers = json.loads(z.read("config.json"))["config"]["layers"]
    assert {l["config"]["workers"] for l in layers
            if l["class_name"] == "WorkerBatchNormalization"} == {4}
    assert [e["test_error"] for e in record(one)["history"]] == \
        [e["test_error"] for e in record(two)["history"]]


# --- TensorFlow against the others (.venv-backends in subprocesses) ----------------------

def other_backend(backend, *args):
    """Run .venv-backends/bin/python *args under KERAS_BACKEND=backend; skip without that venv."""
    python = backends_python()
    env = {**os.environ, "KERAS_BACKEND": backend}
    result = subprocess.run([str(python), *map(str, args)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


JAX_RUNS_SCRIPT = """
import sys
import train
cifar, root = sys.argv[1:]
for run in (["--norm", "bn", "--batch-size", "2", "--workers", "2"],
            ["--norm", "gn", "--batch-size", "4", "--workers", "1"]):
    assert train.main([*run, "--epochs", "1", "--train-images", "100", "--data-dir", cifar,
                       "--models-dir", root + "/models", "--logs-dir", root + "/logs"]) == 0
"""


@pytest.fixture(scope="module")
def jax_runs(cifar_dir, tmp_path_factory):
    """Two tiny runs trained by train.py under JAX (one process for both)."""
    root = tmp_path_factory.mktemp("jax_runs")
    other_backend("jax", "-c", JAX_RUNS_SCRIPT, cifar_dir, root)
    return root


@tensorflow_only
@pytest.mark.parametrize("name", ["bn_b2_w2_s1", "gn_b4_s1"])
def test_jax_trained_model_evaluates_the_same_under_tensorflow(jax_runs, cifar_dir, name):
    path = jax_runs / "models" / f"{name}.keras"
    rec = record(path)
    assert rec["versions"]["backend"] == "jax" and "tensorflow" not in rec["versions"]
    model = keras.models.load_model(path, safe_mode=True)
    run = rec["config"]["run"]
    loss, error = train.evaluate(model, cifar10.prepare_data(cifar_dir, run["train_images"],
                                                           run["test_images"]))
    assert error == rec["test_error"] and loss == pytest.approx(rec["test_loss"], abs=1e-5)


# The first training step from the same weights on the same batch: BN with W = 2 workers of
# N = 2 (training-mode statistics per worker), and GN at N = 4.
FIRST_STEP = {"bn": dict(norm="bn", batch_size=2, workers=2), "gn": dict(norm="gn", batch_size=4)}
FIRST_STEP_SCRIPT = """
import json
import sys
import numpy as np
import train
from gnrepro import recipe
folder, backend = sys.argv[1:]
out = {}
for norm in ("bn", "gn"):
    z = np.load(f"{folder}/{norm}.npz")
    cfg = recipe.Config(**json.loads(str(z["config"])))
    model = train.build_model(cfg)
    train.compile_model(model, cfg, steps_per_epoch=10)
    model.set_weights([z[f"w{i}"] for i in range(len(model.weights))])
    logs = model.train_on_batch(z["x"], z["y"], return_dict=True)
    out[norm] = {k: float(v) for k, v in logs.items()}
    np.savez(f"{folder}/{norm}_{backend}.npz", *model.get_weights())
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def tensorflow_first_step(cifar_dir, tmp_path_factory):
    """TensorFlow's initial weights and first batch, saved; its first step's logs and weights."""
    import dataclasses
    folder = tmp_path_factory.mktemp("first_step")
    data = cifar10.prepare_data(cifar_dir, train_images=40)
    out = {}
    for norm, kwargs in FIRST_STEP.items():
        cfg = recipe.Config(seed=1, **kwargs)
        keras.utils.set_random_seed(cfg.seed)
        model = train.build_model(cfg)
        train.compile_model(model, cfg, steps_per_epoch=10)
        batch = cfg.batch_size * cfg.workers
        x, y = cifar10.TrainBatches(data.padded, data.y_train, batch, cfg.seed, 0)[0]
        np.savez(folder / f"{norm}.npz", x=x, y=y, config=json.dumps(dataclasses.asdict(cfg)),
                 **{f"w{i}": w for i, w in enumerate(model.get_weights())})
        logs = model.train_on_batch(x, y, return_dict=True)
        out[norm] = {k: float(v) for k, v in logs.items()}, model.get_weights()
    return folder, out


@tensorflow_only
@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_first_step_agrees_with_tensorflow(tensorflow_first_step, backend):
    folder, tf_steps = tensorflow_first_step
    result = other_backend(backend, "-c", FIRST_STEP_SCRIPT, folder, backend)
    theirs = json.loads(result.stdout.strip().splitlines()[-1])
    for norm, (logs, after) in tf_steps.items():
        assert theirs[norm]["loss"] == pytest.approx(logs["loss"], rel=1e-5), norm
        assert theirs[norm]["ce"] == pytest.approx(logs["ce"], rel=1e-5), norm
        assert theirs[norm]["acc"] == logs["acc"], norm
        with np.load(folder / f"{norm}_{backend}.npz") as z:   # measured: within 1.2e-7
            for i, want in enumerate(after):
                np.testing.assert_allclose(z[f"arr_{i}"], want, rtol=0, atol=1e-6,
                                           err_msg=f"{norm} weight {i}")
