"""bench.py's machinery (train, backends, pack, plan) and train.py's speed options
(--mixed-precision, --threads): correctness on the CPU and the tables' structure, never
timing (the timings are bench.py's)."""
import importlib.util
import json
import math
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
from gnrepro import recipe  # noqa: E402

# bench.py on TensorFlow with this Python (.venv's; .venv-backends has none): skipped elsewhere
tensorflow_here = pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None,
                                     reason="needs TensorFlow in this Python (.venv)")


@pytest.mark.parametrize("norm, ours, theirs", [
    ("bn", layer.WorkerBatchNormalization, keras.layers.BatchNormalization),
    ("gn", layer.GroupNormalization, keras.layers.GroupNormalization)])
def test_baseline_is_the_same_resnet_with_keras_norm_layers(norm, ours, theirs):
    model = train.build_resnet20(norm, recipe.GROUPS, workers=2)
    base = keras.models.clone_model(model, clone_function=bench.keras_norm)
    assert [l.name for l in base.layers] == [l.name for l in model.layers]
    assert base.count_params() == model.count_params()
    norms = [l for l in base.layers if "norm" in l.name]
    assert len(norms) == 21 and all(type(l) is theirs for l in norms)
    assert any(isinstance(l, ours) for l in model.layers)
    assert norms[1].epsilon == recipe.EPSILON and norms[1].gamma_regularizer is not None


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
    (["train", "--workers", "0"], "--workers must be a positive integer, got 0"),
    (["train", "--batch-sizes", "32", "0"], "--batch-sizes must be a positive integer, got 0"),
    (["train", "--repeats", "0"], "--repeats must be a positive integer, got 0"),
    (["train", "--jit-compile"], "unrecognized arguments: --jit-compile"),   # removed
    (["layer", "--steps", "0"], "--steps must be a positive integer, got 0"),
    (["loop", "--batch-sizes", "2", "-1"], "--batch-sizes must be a positive integer, got -1"),
    (["pack", "--pack", "0"], "--pack must be a positive integer, got 0"),
    (["pack", "--images", "100"], "--images 100 should hold a step of 256 images"),
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


def within_rounding(ratio, num, den, unit, slack):
    """ratio, printed with `slack`, is num / den for some values within `unit` of the printed
    num and den (a ratio of unrounded numbers whose rounded values the table shows)."""
    low = (num - unit) / (den + unit) - slack
    return low <= ratio <= (num + unit) / max(den - unit, 1e-9) + slack


TINY = ["--batch-sizes", "2", "--images", "16", "--repeats", "1", "--warmup", "0",
        "--seconds", "0.05"]


@tensorflow_here
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
    assert f"intra-op threads {recipe.THREADS} (--threads {recipe.THREADS};" in out
    assert "; ours: tf.function without XLA (TensorFlow's op determinism rules it out), " in out
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


@tensorflow_here
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
                         rf"{recipe.THREADS}, may run on 1 core\(s\) \d+$", out, re.M), out
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


@tensorflow_here
def test_bench_malloc_table():
    """Two TensorFlow workers, train.py's mmap threshold and tf.data's; a row per (norm, N, W)."""
    result = subprocess.run([sys.executable, "bench.py", "malloc", "--norms", "gn", "--workers",
                             "2", *TINY], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert re.search(rf"^{re.escape(sys.executable)}: python \S+, tensorflow \S+, keras \S+, "
                     rf"glibc \S+, intra-op threads {recipe.THREADS}$", out, re.M), out
    header, rows = table(out, "norm")
    assert header == ["norm", "N", "W", "train.py img/s", "tf.data's img/s", "ratio",
                      "train.py kernel", "tf.data's kernel"]
    assert len(rows) == 1 and rows[0][:3] == ["gn", "2", "2"]
    ours, theirs = map(float, rows[0][3:5])
    assert min(ours, theirs) > 0
    # The ratio is of the medians; the printed rates are rounded to 1 img/s.
    assert float(rows[0][5]) == pytest.approx(ours / theirs,
                                              abs=0.01 + (ours + theirs) / theirs ** 2)
    assert all(0 <= float(c.rstrip("%")) <= 100 for c in rows[0][6:])
    assert "mmap threshold: train.py's 32 MiB, heaps kept, against tf.data's 128 KiB" in out


def test_bench_malloc_worker_that_fails_is_named():
    with pytest.raises(SystemExit,
                       match=r"the train.py worker \(/bin/false\) exited with status 1"):
        bench.main(["malloc", "--python-tensorflow", "/bin/false", "--workers", "1", *TINY])


@tensorflow_here
def test_bench_input_table():
    """fit and predict, each fed as train.py feeds it and as Keras feeds itself: four rows,
    every fit at least as long as its batches take to make, the ratios of the medians."""
    result = subprocess.run([sys.executable, "bench.py", "input", "--epoch-seconds", "0.4",
                             "--steps", "2", "--repeats", "2", "--test-images", "20"],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    header, rows = table(result.stdout, "call")
    assert header == ["call", "feeding", "median s", "longest s", "ratio"]
    assert [r[:2] for r in rows] == [["fit", "train.py"], ["fit", "Keras"],
                                     ["predict", "train.py"], ["predict", "Keras"]]
    median = {tuple(r[:2]): float(r[2]) for r in rows}
    for call, feeding, med, longest, ratio in rows:
        assert float(longest) >= float(med) >= (0.4 if call == "fit" else 0)
        # The ratio is of the unrounded medians; the table prints each to 0.005 s, which
        # for a call of a few hundredths of a second bounds the ratio only loosely.
        assert within_rounding(float(ratio), median[call, "Keras"], float(med), 0.005, 0.005)
        if feeding == "Keras":
            assert ratio == "1.00"
    assert "fit: one epoch of 2 batches made in 0.4 s" in result.stdout


@tensorflow_here
@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps, --repeats and --test-images 1 or more, got 6, 0, 5 and 10000"),
    (["--epoch-seconds", "-1"], "--epoch-seconds should be 0 or more"),
    (["--threads", "-2"], "--threads must be 0 (one per core) or a positive integer, got -2")])
def test_bench_input_bad_arguments_are_named(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench.main(["input", *argv])
    assert message in capsys.readouterr().err


def test_speed_options_reach_the_config_and_default_off(capsys):
    p, args = recipe.parse_args(["--norm", "gn", "--batch-size", "2"])
    cfg = recipe.resolve(p, args)
    assert (cfg.mixed_precision, args.threads) == (False, recipe.THREADS)
    p, args = recipe.parse_args(["--norm", "gn", "--batch-size", "2", "--mixed-precision",
                                "--threads", "0"])
    cfg = recipe.resolve(p, args)
    assert (cfg.mixed_precision, args.threads) == (True, 0)
    with pytest.raises(SystemExit):   # removed: Keras never used XLA for these runs
        recipe.parse_args(["--norm", "gn", "--batch-size", "2", "--jit-compile"])
    assert "unrecognized arguments: --jit-compile" in capsys.readouterr().err


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


def test_training_step_is_compiled_as_each_backend_compiles_it():
    """compile_model's jit_compile (backends.jit_compile): no XLA under TensorFlow (its op
    determinism, which every run turns on, rules XLA out), jitted under JAX, eager on torch."""
    cfg = recipe.Config(norm="gn", batch_size=8)
    model = train.build_model(cfg)
    train.compile_model(model, cfg, 4)
    expected = {"tensorflow": False, "jax": True, "torch": False}[keras.backend.backend()]
    assert model.jit_compile is expected


@pytest.mark.parametrize("norm", ["bn", "gn"])
def test_mixed_precision_trains_saves_and_loads(norm, tiny, tmp_path):
    x, y = tiny
    keras.utils.set_random_seed(1)
    cfg = recipe.Config(norm=norm, batch_size=8, mixed_precision=True)
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
         "--epochs", "1", "--train-images", "200", "--test-images", "100",
         "--data-dir", cifar_dir, "--models-dir", tmp_path / "m", "--logs-dir", tmp_path / "l"],
        cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((tmp_path / "m" / "gn_b8_s1.json").read_text())
    assert record["config"]["run"]["mixed_precision"] is False
    assert record["intra_op_threads"] == recipe.THREADS
    # --jit-compile is gone (Keras never used XLA for these runs): nothing records it.
    assert "jit_compile" not in record["config"]["run"] and "jit_compile_used" not in record
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
        assert within_rounding(ratio, pack, solo, 0.5, 0.01)


PLAN_HEADER = ["profile", "runs left", "GPU min", "longest", "sessions", "packs", "pack min",
               "sessions"]


def test_bench_plan_table(capsys, tmp_path):
    """The GPU minutes of the paper-scale work left: a row per paper-scale profile, runs left
    counted from the run records in models/ (here: none, so every entry); no sessions asked."""
    bench.main(["plan", "--models-dir", str(tmp_path), "--step-ms", "16=2.5", "256=6"])
    header, rows = table(capsys.readouterr().out, "profile")
    assert header == PLAN_HEADER
    assert [r[0] for r in rows] == [*bench.PAPER_PROFILES, "all"]
    # each configuration once, in the profile that provides it: 72 runs, not the grids' 102
    assert bench.PAPER_PROFILES == tuple(p for p, (_, s) in recipe.PROFILES.items() if s == "paper")
    assert [int(r[1]) for r in rows] == [30, 3, 6, 12, 21, 72]
    default = rows[0]
    # N = 2 at W = 8: 312,500 steps of 16 images at 2.5 ms, and 100 evaluations of 10,000
    # images at 3 x 256 images / 6 ms
    assert default[3] == f"{(312_500 * 2.5 + 100 * 10_000 / 128) / 60_000:.1f}" == "13.2"
    assert int(default[5]) == len(recipe.STUDIES["figure1"])   # a pack per configuration
    assert float(default[6]) < float(default[2])
    assert all(r[4] == r[7] == "-" for r in rows)   # no --session-minutes: no sessions


def test_bench_plan_exact_table(capsys, tmp_path):
    """A hand-made case: every paper-scale run finished but four of the default grid's and
    one of He's, at step times chosen to make the arithmetic easy."""
    left = {"default": {"gn_b2_w8_s1", "gn_b2_w8_s2", "gn_b2_w8_s3", "bn_b32_w8_s1"},
            "he": {"bn_b64_w2_lr0.1_he_s1"}}
    runs = recipe.paper_runs()
    assert set().union(*left.values()) <= {c.name for c in runs}
    for c in runs:
        if c.name not in left.get(c.profile, ()):
            record = tmp_path / recipe.profile_paths(c.profile)["models_dir"] / f"{c.name}.json"
            record.parent.mkdir(parents=True, exist_ok=True)
            record.write_text("{}")
    bench.main(["plan", "--models-dir", str(tmp_path), "--step-ms-gn", "16=2", "256=7.68",
                "--step-ms-bn", "256=7.68", "16=4", "128=6", "--processes", "4", "--speedup", "2",
                "--session-minutes", "10", "--pack-cost", "1.5"])
    out = capsys.readouterr().out
    header, rows = table(out, "profile")
    # Minutes by hand: steps (50,000 // step images, times the epochs) at the measured ms,
    # plus the evaluations at 3 x 256 / 7.68 = 100 images a ms (BN and GN alike).
    gn_b2 = (100 * 3125 * 2 + 100 * 10_000 / 100) / 60_000   # 10.583
    bn_b32 = (100 * 195 * 7.68 + 100 * 10_000 / 100) / 60_000   # 2.663
    he = (164 * 390 * 6 + 164 * 10_000 / 100) / 60_000   # 6.669: 128 images at W = 2, 164 epochs
    runs_min, packs_min = 3 * gn_b2 + bn_b32, 1.5 * gn_b2 + bn_b32   # 34.41, 18.54
    assert [round(m, 1) for m in (runs_min, packs_min, he)] == [34.4, 18.5, 6.7]
    # Sessions of 10 min at 2x: at least the work over 20, and the longest run over 10
    # (packs: the 15.9-minute pack of the three N = 2 seeds takes two sessions by itself).
    assert (math.ceil(runs_min / 20), math.ceil(packs_min / 20), math.ceil(1.5 * gn_b2 / 10)) \
        == (2, 1, 2)
    assert header == PLAN_HEADER
    assert rows == [["default", "4", "34", "10.6", "2", "2", "19", "2"],
                    ["he", "1", "7", "6.7", "1", "1", "7", "1"],
                    ["norms", "0", "0", "0.0", "0", "0", "0", "0"],
                    ["workers", "0", "0", "0.0", "0", "0", "0", "0"],
                    ["groups", "0", "0", "0.0", "0", "0", "0", "0"],
                    ["all", "5", "41", "-", "3", "3", "25", "3"]]
    assert ("at the step ms bn 16=4 128=6 256=7.68, gn 16=2 256=7.68; sessions of 10 min of "
            "training, 4 processes at once at 2x one;") in out


def test_ms_per_step_is_linear_between_and_beyond_the_measured_sizes():
    two, three = [(16, 2.0), (256, 8.0)], [(16, 2.0), (128, 6.0), (256, 7.68)]
    assert bench.ms_per_step(two, 64) == pytest.approx(3.2)      # 2 + 48 * 6 / 240
    assert bench.ms_per_step(two, 512) == pytest.approx(14.4)    # beyond: 2 + 496 / 40
    assert bench.ms_per_step(three, 64) == pytest.approx(2 + 48 * 4 / 112)
    assert bench.ms_per_step(three, 192) == pytest.approx(6 + 64 * 1.68 / 128)
    assert bench.ms_per_step(three, 128) == 6.0
    with pytest.raises(SystemExit, match=r"extrapolate to -2.17 ms a step of 32 images"):
        bench.ms_per_step([(64, 1.0), (256, 20.0)], 32)   # 1 - 32 * 19 / 192


MEASURE = "measure them on your card with `bench.py pack` (solo ms) or `bench.py loop`"


@pytest.mark.parametrize("argv, message", [
    ([], "--step-ms IMAGES=MS ... is required (or both --step-ms-bn and --step-ms-gn)"),
    ([], MEASURE),
    (["--step-ms-bn", "16=2", "256=6"], "--step-ms IMAGES=MS ... is required"),   # GN's missing
    (["--step-ms", "16=2.5"], "--step-ms needs two step sizes or more, each once (IMAGES=MS "
                              "with distinct IMAGES), got 16=2.5"),
    (["--step-ms", "16=2", "256=6", "--step-ms-gn", "16=2", "16=3"],
     "--step-ms-gn needs two step sizes or more"),
    (["--step-ms", "16=2.5", "256"], "argument --step-ms: expected IMAGES=MS, a step of IMAGES "
                                     "images (a positive integer) in MS milliseconds (positive), "
                                     "e.g. 16=2.56; got '256'"),
    (["--step-ms", "16=2.5", "256=0"], "got '256=0'"),
    (["--step-ms", "16=2", "256=6", "--processes", "4"], "--processes K and --speedup X go "
                                                         "together"),
    (["--step-ms", "16=2", "256=6", "--speedup", "1.8"], "--processes K and --speedup X go "
                                                         "together"),
    (["--step-ms", "16=2", "256=6", "--processes", "0", "--speedup", "1"],
     "--processes must be a positive integer, got 0"),
    (["--step-ms", "16=2", "256=6", "--processes", "2", "--speedup", "3"],
     "--speedup should be more than 0 and at most --processes (2), got 3"),
    (["--step-ms", "16=2", "256=6", "--session-minutes", "0"],
     "--session-minutes must be positive, got 0"),
    (["--step-ms", "16=2", "256=6", "--pack-cost", "-1"], "--pack-cost must be positive, got -1")])
def test_bench_plan_argument_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as error:
        bench.main(["plan", *argv])
    assert error.value.code == 2 and message in capsys.readouterr().err
