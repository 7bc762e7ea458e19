"""bench.py train's and bench.py backends' machinery and train.py's speed options
(--jit-compile, --mixed-precision, --threads): correctness on the CPU and the tables'
structure, never timing (the timings are bench.py's)."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import BACKENDS_PYTHON, REPO, backends_python

import keras  # noqa: E402
import bench  # noqa: E402
import layer  # noqa: E402
import train  # noqa: E402


@pytest.mark.parametrize("norm, ours, theirs", [
    ("bn", layer.WorkerBatchNormalization, keras.layers.BatchNormalization),
    ("gn", layer.GroupNormalization, keras.layers.GroupNormalization)])
def test_baseline_is_the_same_resnet_with_keras_norm_layers(norm, ours, theirs):
    model = train.build_resnet20(norm, train.GROUPS, workers=2)
    base = keras.models.clone_model(model, clone_function=bench.keras_norm)
    assert [l.name for l in base.layers] == [l.name for l in model.layers]
    assert base.count_params() == model.count_params()
    norms = [l for l in base.layers if "norm" in l.name]
    assert len(norms) == 21 and all(type(l) is theirs for l in norms)
    assert any(isinstance(l, ours) for l in model.layers)
    assert norms[1].epsilon == train.EPSILON and norms[1].gamma_regularizer is not None


def test_throughput_counts_steps_across_calls_and_epochs():
    timer = bench.Throughput(images_per_step=4, warmup=0.0, seconds=1e9)
    timer.set_model(keras.Sequential())
    timer.on_train_begin()
    timer.on_epoch_begin(0)
    for batch in (7, 15, 23):      # steps_per_execution = 8: one call ends at 7, 15, 23
        timer.on_train_batch_end(batch)
    timer.on_epoch_begin(1)
    timer.on_train_batch_end(7)
    assert timer.start[1] == 8 and timer.steps == 32
    timer.seconds = 0.0
    timer.on_train_batch_end(15)
    assert timer.end[1] == 40 and timer.model.stop_training
    assert timer.rate > 0 and timer.cores >= 0


@pytest.mark.parametrize("argv, message", [
    (["train", "--workers", "0"], "--workers must be positive integers"),
    (["train", "--batch-sizes", "32", "0"], "--batch-sizes must be positive"),
    (["train", "--images", "50"], "should hold at least 2 steps"),
    (["train", "--seconds", "0"], "--seconds must be positive"),
    (["train", "--threads", "-1"], "--threads must be 0"),
    (["backends", "--images", "300"], "should hold at least 2 steps of 256 images"),
    (["backends", "--backends", "jax", "jax"], "should not repeat a backend"),
    (["backends", "--cpus", "0"], "--cpus should be in 1.."),
    (["backends", "--python-jax", "/nonexistent/python"], "--python-jax /nonexistent/python: "
                                                           "not an executable file")])
def test_bench_argument_errors(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench.main(argv)
    assert message in capsys.readouterr().err


def table(out, first):
    """The table under the header line that starts with `first`: (column names, rows of
    cells); a row's cells are split on blanks, the header's on runs of 2 or more."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(first + " "))
    header = re.split(r"\s{2,}", lines[start].strip())
    rows = []
    for line in lines[start + 1:]:
        cells = line.split()
        if len(cells) != len(header):
            break
        rows.append(cells)
    return header, rows


TINY = ["--batch-sizes", "2", "--images", "16", "--repeats", "1", "--warmup", "0",
        "--seconds", "0.05"]


def test_bench_train_table():
    """ours and the baseline on TensorFlow, one configuration (in its own process: bench.py
    sets threads and TensorFlow's op determinism for the whole process, as train.py does)."""
    result = subprocess.run(
        [sys.executable, "bench.py", "train", "--norms", "gn", "--workers", "2", *TINY],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"})
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert out.startswith("backend=tensorflow ")
    header, rows = table(out, "norm")
    assert header == ["norm", "N", "W", "ours img/s", "keras img/s", "ours/keras", "GN/BN",
                      "keras GN/BN", "N/2", "keras N/2", "ours cores", "keras cores"]
    assert len(rows) == 1 and rows[0][:3] == ["gn", "2", "2"]
    ours, theirs = map(float, rows[0][3:5])
    assert ours > 0 and theirs > 0 and rows[0][6:8] == ["-", "-"] and rows[0][8] == "1.00"
    assert re.search(r"evaluation .*batch 1000\): gn \d+ img/s", out)
    assert f"intra-op threads {train.THREADS} (--threads {train.THREADS};" in out
    assert "--jit-compile False, XLA used False" in out
    assert "sweep estimate: needs every norm" in out


@pytest.fixture
def needs_backends_venv():
    backends_python()




@pytest.mark.usefixtures("needs_backends_venv")
def test_bench_train_runs_without_tensorflow():
    """bench.py train on torch in the venv that has no TensorFlow: ours and the baseline."""
    result = subprocess.run(
        [str(BACKENDS_PYTHON), "bench.py", "train", "--norms", "bn", "--workers", "2", *TINY],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, KERAS_BACKEND="torch"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("backend=torch ")
    header, rows = table(result.stdout, "norm")
    assert len(header) == 12 and [r[:3] for r in rows] == [["bn", "2", "2"]]
    assert float(rows[0][3]) > 0 and float(rows[0][4]) > 0


@pytest.mark.usefixtures("needs_backends_venv")
def test_bench_backends_table():
    """One worker per backend, each with its own Python; one table, a row per (norm, N, W).
    The parent runs in the venv without TensorFlow (so Keras there defaults to JAX) and names
    TensorFlow's Python; the workers are pinned to one core."""
    result = subprocess.run(
        [str(BACKENDS_PYTHON), "bench.py", "backends", "--python-tensorflow", sys.executable,
         "--norms", "gn", "--workers", "1", "2", "--cpus", "1", *TINY],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"})
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    for name, python in (("tf", sys.executable), ("jax", BACKENDS_PYTHON)):
        library = {"tf": "tensorflow"}.get(name, name)
        assert re.search(rf"^{name}: {re.escape(str(python))} .*{library} \S+,.* intra-op threads "
                         rf"{train.THREADS}, may run on 1 core\(s\) \d+$", out, re.M), out
    header, rows = table(out, "norm")
    assert header == ["norm", "N", "W", "tf img/s", "jax img/s", "jax/tf", "tf cores", "jax cores"]
    assert [r[:3] for r in rows] == [["gn", "2", "1"], ["gn", "2", "2"]]
    for row in rows:
        tf, jax = map(float, row[3:5])
        assert min(tf, jax) > 0
        # The ratio is of the medians; the printed rates are rounded to 1 img/s.
        assert float(row[5]) == pytest.approx(jax / tf, abs=0.01 + (jax + tf) / tf ** 2)
        assert all(float(c) >= 0 for c in row[6:])
    header, rows = table(out, "eval")
    assert header == ["eval", "tf img/s", "jax img/s", "jax/tf"]
    assert [r[0] for r in rows] == ["gn"] and all(float(c) > 0 for c in rows[0][1:])


def test_bench_backends_worker_that_fails_is_named(capsys):
    with pytest.raises(SystemExit, match=r"the jax worker \(/bin/false\) exited with status 1"):
        bench.main(["backends", "--backends", "jax", "--python-jax", "/bin/false", "--workers", "1",
                    *TINY])


def test_speed_options_reach_the_config_and_default_off():
    p, args = train.parse_args(["--norm", "gn", "--batch-size", "2"])
    cfg = train.resolve(p, args)
    assert (cfg.jit_compile, cfg.mixed_precision, args.threads) == (False, False, train.THREADS)
    p, args = train.parse_args(["--norm", "gn", "--batch-size", "2", "--jit-compile",
                                "--mixed-precision", "--threads", "0"])
    cfg = train.resolve(p, args)
    assert (cfg.jit_compile, cfg.mixed_precision, args.threads) == (True, True, 0)


def test_threads_must_not_be_negative():
    result = subprocess.run([sys.executable, "train.py", "--grid", "--threads", "-1"], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 2 and "--threads must be 0" in result.stderr


def _fit(cfg, x, y):
    model = train.build_model(cfg)
    train.compile_model(model, cfg, len(y) // cfg.batch_size)
    keras.utils.set_random_seed(0)
    history = model.fit(x, y, batch_size=cfg.batch_size, epochs=1, shuffle=False, verbose=0)
    return model, history.history["loss"][-1]


@pytest.fixture(scope="module")
def tiny():
    rng = np.random.default_rng(0)
    return rng.normal(size=(32, 32, 32, 3)).astype("float32"), rng.integers(0, 10, 32)


@pytest.mark.parametrize("norm", ["bn", "gn"])
def test_xla_trains_like_the_default(norm, tiny):
    x, y = tiny
    results = {}
    for jit in (False, True):
        keras.utils.set_random_seed(1)
        cfg = train.Config(norm=norm, batch_size=8, workers=2 if norm == "bn" else 1,
                           jit_compile=jit)
        model, loss = _fit(cfg, x, y)
        assert model.jit_compile is jit
        results[jit] = loss, model.predict(x, verbose=0)
    assert np.isclose(results[True][0], results[False][0], rtol=1e-4)
    np.testing.assert_allclose(results[True][1], results[False][1], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("norm", ["bn", "gn"])
def test_mixed_precision_trains_saves_and_loads(norm, tiny, tmp_path):
    x, y = tiny
    keras.utils.set_random_seed(1)
    cfg = train.Config(norm=norm, batch_size=8, mixed_precision=True)
    model, loss = _fit(cfg, x, y)
    assert keras.config.dtype_policy().name == "float32"   # the global policy is restored
    assert model.get_layer("stem_conv").compute_dtype == "float16"
    assert model.get_layer("logits").compute_dtype == "float32"
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert np.isfinite(loss)
    logits = model.predict(x, verbose=0)
    assert logits.dtype == np.float32 and np.isfinite(logits).all()
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(loaded.predict(x, verbose=0), logits, rtol=1e-3, atol=1e-3)


def test_options_and_threads_are_recorded(cifar_dir, tmp_path):
    result = subprocess.run(
        [sys.executable, "train.py", "--norm", "gn", "--batch-size", "8", "--workers", "1",
         "--epochs", "1", "--train-images", "200", "--test-images", "100", "--jit-compile",
         "--data-dir", cifar_dir, "--models-dir", tmp_path / "m", "--logs-dir", tmp_path / "l"],
        cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((tmp_path / "m" / "gn_b8_s1.json").read_text())
    assert record["config"]["run"]["jit_compile"] is True
    assert record["config"]["run"]["mixed_precision"] is False
    assert record["intra_op_threads"] == train.THREADS
    # A run turns TensorFlow's op determinism on, under which Keras trains without XLA:
    # the record and one line say so, rather than claiming XLA.
    assert record["jit_compile_used"] is False
    assert result.stderr.count("note: --jit-compile: Keras trains without XLA") == 1
    assert np.isfinite(record["test_loss"])


@pytest.mark.usefixtures("needs_backends_venv")
def test_bench_pack_table():
    """bench.py pack on JAX (the venv without TensorFlow): one run alone and a pack side by
    side, a row per (norm, N, variant); on this CPU it only runs (its numbers are a GPU's)."""
    result = subprocess.run(
        [str(BACKENDS_PYTHON), "bench.py", "pack", "--norms", "gn", "--batch-sizes", "2",
         "--workers", "2", "--pack", "2", "--steps", "2", "--calls", "1", "--images", "16",
         "--variants", "float32", "bf16"],
        cwd=REPO, capture_output=True, text=True, timeout=900, env=dict(os.environ, KERAS_BACKEND="jax"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("backend=jax ")
    header, rows = table(result.stdout, "norm")
    assert header == ["norm", "N", "W", "variant", "solo img/s", "solo ms", "pack2 img/s",
                      "pack2 ms", "pack/solo", "compile s"]
    assert [r[:4] for r in rows] == [["gn", "2", "2", "float32"], ["gn", "2", "2", "bf16"]]
    for row in rows:
        solo, solo_ms, pack, pack_ms, ratio = map(float, row[4:9])
        assert min(solo, solo_ms, pack, pack_ms) > 0
        # (img/s printed to the unit: the ratio within that rounding)
        assert (pack - 0.5) / (solo + 0.5) - 0.01 <= ratio <= (pack + 0.5) / max(solo - 0.5, 1e-9) + 0.01


def test_bench_plan_table(capsys):
    """The GPU minutes of the paper-scale work left: a row per paper-scale profile, runs left
    counted from the run records in models/ (here: none, so every entry)."""
    import tempfile
    with tempfile.TemporaryDirectory() as empty:
        bench.main(["plan", "--models-dir", empty])
    header, rows = table(capsys.readouterr().out, "profile")
    assert header == ["profile", "runs left", "GPU min", "longest", "loans", "packs", "pack min",
                      "loans"]
    assert [r[0] for r in rows] == [*bench.PAPER_PROFILES, "all"]
    # each configuration once, in the profile that provides it: 72 runs, not the grids' 102
    assert bench.PAPER_PROFILES == tuple(p for p, (_, s) in train.PROFILES.items() if s == "paper")
    assert [int(r[1]) for r in rows] == [30, 3, 6, 12, 21, 72]
    default = rows[0]
    # N = 2 at W = 8: 312,500 steps of 16 images at the measured 2.5 ms, and its evaluation
    assert float(default[3]) == pytest.approx(312_500 * 16 / 6325 / 60, rel=0.05)
    assert int(default[5]) == len(train.STUDIES["figure1"])   # a pack per configuration
    assert float(default[6]) < float(default[2])


def test_bench_pack_and_plan_argument_errors(capsys):
    with pytest.raises(SystemExit):
        bench.main(["pack", "--pack", "0"])
    assert "--pack must be a positive integer, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["plan", "--pack-cost", "-1"])
    assert "--pack-cost and --step-ms must be positive" in capsys.readouterr().err
