"""Faults a run meets, each on its own (the chaos sweep that meets them together is in
test_slurm.py), and first contact: a new user's commands without CIFAR-10 on disk.

- a checkpoint truncated, corrupted, emptied, not a zip, without its state, or of another
  shape: the run names the file, sets it aside as NAME.npz.bad and starts over, the model
  untouched (as built); a checkpoint of another configuration is still refused;
- two runs' checkpoints, one bad: the other restores (what a pack of runs, each reading its
  own checkpoint, relies on; the pack-level test belongs with the packs);
- a full disk while a checkpoint is written (a write that raises half-way): the previous
  checkpoint is intact and loads, no temporary is left;
- two processes given the same run: one holds the run's lock, the other says who does and
  exits with status 73 (runfiles.BUSY); a killed holder's lock and temporaries go;
- without data, every runner (make quick, train.sh, sweep.py, train.py) says so once, with
  no traceback, non-zero; --grid and --help start no backend; no command prints TensorFlow's
  start-up lines (read from the captured output); --help's first screen shows the options a
  user runs (--norm, --batch-size, --seed, --profile, --time-limit).
"""
import contextlib
import errno
import logging
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import CHATTER, REPO, user_env

import keras  # noqa: E402
from gnrepro import runfiles  # noqa: E402
from gnrepro import startup  # noqa: E402

CONFIG = {"norm": "gn", "seed": 1}


def tiny_model(seed=0, units=3):
    """A compiled model with optimizer variables (SGD with momentum), seeded."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(units), keras.layers.Dense(2)])
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss="mse")
    model.optimizer.build(model.trainable_variables)
    return model


def checkpointed(tmp_path, name="gn_b4_s1", seed=0):
    """A run's Paths with a checkpoint of a tiny model saved at epoch 2; (paths, model)."""
    paths = runfiles.Paths(tmp_path / "models", tmp_path / "logs", name)
    model = tiny_model(seed)
    for v in model.optimizer.variables:   # momenta that are not all zeros
        v.assign(np.full(v.shape, 0.5, v.dtype))
    runfiles.save_checkpoint(paths, model, {"config": CONFIG, "epoch": 2, "step": 0})
    return paths, model


def same(a, b):
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def flip_a_byte_in_the_weights(path):
    with np.load(path) as z:
        payload = z["w0"].tobytes()   # stored as is (np.savez does not compress)
    data = bytearray(path.read_bytes())
    data[data.index(payload) + len(payload) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def without_the_state(path):
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files if k != "state"}
    with open(path, "wb") as f:
        np.savez(f, **arrays)


BREAKS = {
    "truncated": lambda p: p.write_bytes(p.read_bytes()[:p.stat().st_size // 2]),
    "a flipped byte": flip_a_byte_in_the_weights,
    "empty": lambda p: p.write_bytes(b""),
    "not a zip": lambda p: p.write_bytes(b"garbage" * 100),
    "without its state": without_the_state,
}


# --- checkpoints ---------------------------------------------------------------------------

@pytest.mark.parametrize("how", BREAKS)
def test_a_bad_checkpoint_is_named_set_aside_and_the_run_starts_over(how, tmp_path, capsys):
    paths, _ = checkpointed(tmp_path)
    BREAKS[how](paths.checkpoint)
    broken = paths.checkpoint.read_bytes()
    fresh = tiny_model(seed=7)
    built = [w.copy() for w in fresh.get_weights()]
    momenta = [keras.ops.convert_to_numpy(v) for v in fresh.optimizer.variables]
    assert runfiles.load_checkpoint(paths, fresh, CONFIG) is None   # the run starts over
    assert same(fresh.get_weights(), built), "nothing of the bad checkpoint was assigned"
    assert same([np.asarray(v) for v in fresh.optimizer.variables], momenta)
    bad = paths.checkpoint.with_name("gn_b4_s1.npz.bad")
    assert not paths.checkpoint.exists() and bad.read_bytes() == broken   # kept, not deleted
    err = capsys.readouterr().err
    assert f"gn_b4_s1: checkpoint {paths.checkpoint} cannot be read" in err
    assert f"moved to {bad}, the run starts over" in err


def test_a_checkpoint_that_does_not_fit_the_model_is_set_aside_untouched(tmp_path, capsys):
    paths, _ = checkpointed(tmp_path)
    other = tiny_model(seed=3, units=5)   # same run, other shapes (say, other code)
    built = [w.copy() for w in other.get_weights()]
    assert runfiles.load_checkpoint(paths, other, CONFIG) is None
    assert same(other.get_weights(), built)
    assert "does not fit the model (weights 0 has shape (4, 3), the model's (4, 5))" in \
        capsys.readouterr().err
    assert paths.checkpoint.with_name("gn_b4_s1.npz.bad").exists()


def test_a_checkpoint_of_another_configuration_is_still_refused(tmp_path):
    paths, _ = checkpointed(tmp_path)
    with pytest.raises(SystemExit, match="belongs to another configuration"):
        runfiles.load_checkpoint(paths, tiny_model(), {**CONFIG, "seed": 2})
    assert paths.checkpoint.exists(), "a refused checkpoint stays where it is"


def test_one_runs_bad_checkpoint_loses_no_other_run(tmp_path):
    """Two runs (as two members of a pack would be), each restored from its own checkpoint."""
    good, saved = checkpointed(tmp_path, "gn_b4_s1", seed=1)
    bad, _ = checkpointed(tmp_path, "gn_b4_s2", seed=2)
    BREAKS["a flipped byte"](bad.checkpoint)
    models = {p.name: tiny_model(seed=9) for p in (good, bad)}
    states = {p.name: runfiles.load_checkpoint(p, models[p.name], CONFIG) for p in (good, bad)}
    assert states["gn_b4_s1"]["epoch"] == 2 and states["gn_b4_s2"] is None
    assert same(models["gn_b4_s1"].get_weights(), saved.get_weights())
    assert same([np.asarray(v) for v in models["gn_b4_s1"].optimizer.variables],
                [np.asarray(v) for v in saved.optimizer.variables])
    assert good.checkpoint.exists() and not bad.checkpoint.exists()


def test_a_full_disk_while_checkpointing_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    paths, saved = checkpointed(tmp_path)
    before = paths.checkpoint.read_bytes()

    def half_then_full(f, **arrays):
        f.write(b"PK\x03\x04" + b"\0" * 1000)   # the start of a zip, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(runfiles.np, "savez", half_then_full)
    later = tiny_model(seed=5)
    with pytest.raises(OSError, match="No space left"):
        runfiles.save_checkpoint(paths, later, {"config": CONFIG, "epoch": 3, "step": 0})
    monkeypatch.undo()
    assert paths.checkpoint.read_bytes() == before
    assert paths.temporaries() == [] and not list(tmp_path.rglob("*.tmp*"))
    restored = tiny_model(seed=9)
    assert runfiles.load_checkpoint(paths, restored, CONFIG)["epoch"] == 2
    assert same(restored.get_weights(), saved.get_weights())


def test_a_full_disk_while_saving_a_model_or_record_leaves_the_previous_one(tmp_path):
    model = tmp_path / "gn_b4_s1.keras"
    tiny_model(seed=1).save(model)
    before = model.read_bytes()

    def full(tmp):
        tiny_model(seed=2).save(tmp)
        with open(tmp, "r+b") as f:
            f.truncate(100)   # as far as the disk had room
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(OSError):
        runfiles.atomic_write(model, full)
    assert model.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == [model.name]


# --- one run, one process ------------------------------------------------------------------

def hold_lock(paths, then="sleep"):
    """A process that takes the run's lock, leaves a temporary of the run's as a killed writer
    would, prints 'held', then sleeps (until killed)."""
    script = (f"import sys, time; sys.path.insert(0, {str(REPO)!r})\n"
              f"from gnrepro import runfiles\n"
              f"paths = runfiles.Paths({str(paths.models)!r}, 'logs', {paths.name!r})\n"
              f"lock = runfiles.RunLock(paths).__enter__()\n"
              f"assert lock.held\n"
              f"(paths.models / f'.{{paths.name}}.999.tmp.keras').write_bytes(b'half')\n"
              f"print('held', flush=True)\n"
              f"time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "held\n"
    return proc


def train_py(paths, cifar_dir):
    """The command line of paths' run (gn_b4_s1, one tiny epoch), in its folders."""
    return [sys.executable, "train.py", "--norm", "gn", "--batch-size", "4", "--workers", "1",
            "--epochs", "1", "--data-dir", cifar_dir, "--models-dir", paths.models,
            "--logs-dir", paths.logs.parent]


def test_two_processes_given_the_same_run_one_trains_the_other_says_so(cifar_dir, tmp_path):
    paths = runfiles.Paths(tmp_path / "models", tmp_path / "logs", "gn_b4_s1")
    holder = hold_lock(paths)
    try:
        env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
        second = subprocess.run(train_py(paths, cifar_dir), cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=300)
        assert second.returncode == runfiles.BUSY == 73, second.stderr[-3000:]
        assert (f"gn_b4_s1: pid {holder.pid} on " in second.stderr
                and f"is training this run (it holds {paths.lock}); exiting with status 73"
                in second.stderr)
        assert " epoch " not in second.stdout and not paths.model.exists()
    finally:
        holder.kill()
        holder.wait()


def test_signals_while_train_py_shuts_down_do_not_change_its_exit_status(cifar_dir, tmp_path):
    """SIGUSR1 sent again and again from the moment train.py has decided its status (73: the
    run is busy) until it has exited: Python's shutdown restores the signal's default action
    (death, status 138) unless train.py ignores it by then. (Found by the chaos test: a
    twice-sent SIGUSR1 reached a task that was shutting down.)"""
    paths = runfiles.Paths(tmp_path / "models", tmp_path / "logs", "gn_b4_s1")
    holder = hold_lock(paths)
    err = tmp_path / "stderr"
    try:
        with open(err, "w") as f:
            proc = subprocess.Popen(train_py(paths, cifar_dir), cwd=REPO,
                                    stdout=subprocess.DEVNULL, stderr=f)
        while proc.poll() is None and "exiting with status 73" not in err.read_text():
            time.sleep(0.005)
        sent = 0
        while proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGUSR1)
                sent += 1
            time.sleep(0.0005)
        assert proc.wait() == runfiles.BUSY, (sent, err.read_text()[-3000:])
        assert sent > 0
    finally:
        holder.kill()
        holder.wait()


def test_a_killed_holders_lock_goes_and_so_do_its_temporaries(tmp_path):
    paths = runfiles.Paths(tmp_path / "models", tmp_path / "logs", "gn_b4_s1")
    holder = hold_lock(paths)
    with runfiles.RunLock(paths) as busy:
        assert not busy.held and busy.holder.startswith(f"pid {holder.pid} on ")
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert len(paths.temporaries()) == 1
    with runfiles.RunLock(paths) as lock:
        assert lock.held and paths.temporaries() == []
        assert paths.lock.read_text().startswith(f"pid {os.getpid()} on ")
    assert not paths.lock.exists(), "released: no file is left in checkpoints/"


# --- first contact ---------------------------------------------------------------------------

@pytest.mark.parametrize("args", [["train.py", "--grid"], ["train.py", "--grid", "--profile", "quick"],
                                  ["train.py", "--help"], ["-m", "gnrepro.sweep", "--help"],
                                  ["reproduce.py", "--help"]])
def test_grid_and_help_start_no_backend_and_print_no_library_line(args):
    result = subprocess.run([sys.executable, "-X", "importtime", *args], cwd=REPO,
                            env=user_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    imported = {line.rsplit("|", 1)[1].strip().split(".")[0]
                for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert not imported & {"keras", "tensorflow", "jax", "torch"}, sorted(imported)
    others = "\n".join(l for l in result.stderr.splitlines() if not l.startswith("import time:"))
    assert not CHATTER.search(result.stdout + others) and others == ""
    if "--grid" in args:
        assert result.stdout.startswith("# ") and " bn_b32" in result.stdout


def test_the_help_leads_with_what_a_user_runs():
    """train.py --help in an 80-column terminal: a short usage, then, in its first screen (25
    lines), the options a user runs, --norm first; how it runs (--devices, --threads, -h) after.
    It speaks in the user's terms: no module, constant or class of the code."""
    result = subprocess.run([sys.executable, "train.py", "--help"], cwd=REPO,
                            env=user_env(COLUMNS=80), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    usage = lines[:lines.index("")]
    assert usage[0].startswith("usage: train.py --norm ") and len(usage) <= 5, usage
    options = [line.split()[0] for line in lines if line.startswith("  -")]
    assert options[:5] == ["--norm", "--batch-size", "--seed", "--profile", "--time-limit"]
    first_screen = [line.split()[0] for line in lines[:25] if line.startswith("  -")]
    assert options[:5] == first_screen[:5], "\n".join(lines[:25])
    assert options.index("--time-limit") < options.index("--devices") < options.index("-h,")
    internal = ["gnrepro", "sweep.py", "PROFILES", "THREADS", "profile_paths", "ScanLoop"]
    assert [name for name in internal if name in result.stdout] == [], result.stdout


def test_a_grid_read_only_in_part_ends_without_a_traceback():
    """python train.py --grid | head -1: the reader goes before the grid is written (here at
    once); train.py exits with status 0 and prints nothing on stderr."""
    proc = subprocess.Popen([sys.executable, "train.py", "--grid"], cwd=REPO, env=user_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    assert proc.wait(timeout=120) == 0
    assert proc.stderr.read() == ""


def fake_venv(tmp_path):
    """A virtualenv for the Makefile whose python is this one, stamped newer than the
    requirements (so `make` builds nothing)."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    (venv / "bin" / "python").chmod(0o755)
    for stamp in (".stamp-run", ".stamp"):
        (venv / stamp).touch()
    return venv


RUNNERS = {
    "make quick": lambda venv: ["make", "-s", "-C", str(REPO), "quick", f"VENV={venv}"],
    "bash train.sh": lambda venv: ["bash", str(REPO / "train.sh"), "--profile", "quick"],
    "python -m gnrepro.sweep": lambda venv: [sys.executable, "-m", "gnrepro.sweep", "--profile",
                                            "norms-quick"],
    "train.py --profile": lambda venv: [sys.executable, str(REPO / "train.py"), "--profile", "quick"],
    "train.py (one run)": lambda venv: [sys.executable, str(REPO / "train.py"), "--task", "3"],
}


@pytest.mark.parametrize("runner", RUNNERS)
def test_without_data_each_runner_says_so_once_without_a_traceback(runner, tmp_path):
    empty = tmp_path / "no-data"
    empty.mkdir()
    result = subprocess.run(RUNNERS[runner](fake_venv(tmp_path)), cwd=tmp_path,
                            env=user_env(CIFAR10_DIR=empty, PYTHON=sys.executable, PYTHONPATH=REPO),
                            capture_output=True, text=True, timeout=300)
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    assert out.count("CIFAR-10 not found") == 1, out
    assert f"in {empty} ($CIFAR10_DIR)" in out and "python -m gnrepro.cifar10 --download" in out
    assert "--data-dir DIR or CIFAR10_DIR=DIR" in out
    assert "Traceback" not in out and not CHATTER.search(out), out
    assert " epoch " not in out and "train.py --task" not in out


def test_tensorflow_starts_without_its_start_up_lines():
    """Keras imported through startup.quiet on TensorFlow, its devices listed (where a CPU
    machine's cuInit 'error' comes from): nothing on stderr."""
    script = ("from gnrepro import startup\n"
              "with startup.quiet():\n"
              "    import keras\n"
              "import tensorflow as tf\n"
              "tf.config.list_physical_devices()\n"
              "print(keras.ops.sum(keras.ops.ones(3)))\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO,
                            env=user_env(KERAS_BACKEND="tensorflow"), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and "3.0" in result.stdout, result.stderr[-3000:]
    assert result.stderr == "", result.stderr


@pytest.mark.parametrize("users, shown", [(None, ["kept"]), ("0", ["I0000", "kept"])])
def test_absls_lines_are_dropped_unless_the_user_set_the_level(users, shown):
    script = ("import os\nfrom gnrepro import startup\n"
              "with startup.quiet():\n"
              "    os.write(2, b'WARNING: All log messages before absl::InitializeLog() is called"
              " are written to STDERR\\n')\n"
              "    os.write(2, b'I0000 00:00:1796161653.199293    3008 port.cc:153] chatter\\n')\n"
              "    os.write(2, b'kept\\n')\n"
              "print(os.environ['TF_CPP_MIN_LOG_LEVEL'])\n")
    env = user_env(**({"TF_CPP_MIN_LOG_LEVEL": users} if users else {}))
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == (users or startup.DEFAULTS["TF_CPP_MIN_LOG_LEVEL"])
    assert [line.split()[0] for line in result.stderr.splitlines() if "WARNING" not in line] \
        == shown


def test_only_tensorflows_retracing_warning_is_dropped():
    """startup.no_retracing_warning (reproduce.py's) drops that message of TensorFlow's logger,
    once however often it is installed; another warning of the same logger passes."""
    logger, seen = logging.getLogger("tensorflow"), []
    handler = logging.Handler()
    handler.emit = seen.append
    logger.addHandler(handler)
    try:
        startup.no_retracing_warning()
        startup.no_retracing_warning()
        logger.warning("5 out of the last 5 calls to <function %s at 0x1> triggered tf.function "
                       "retracing. Tracing is expensive ...", "one_step_on_data_distributed")
        logger.warning("another warning")
    finally:
        logger.removeHandler(handler)
        logger.removeFilter(startup._not_retracing)
    assert [r.getMessage() for r in seen] == ["another warning"]
    assert startup._not_retracing not in logger.filters


def test_a_default_inherited_from_a_parent_process_is_not_the_users():
    """A sweep's children inherit quiet()'s TF_CPP_MIN_LOG_LEVEL with its mark: still ours, so
    they drop absl's lines too; a value the user set (no mark, or another value) is theirs."""
    key, mark = "TF_CPP_MIN_LOG_LEVEL", startup.MARK + "TF_CPP_MIN_LOG_LEVEL"
    assert not startup.users_setting(key, {})
    assert not startup.users_setting(key, {key: "3", mark: "3"})
    assert startup.users_setting(key, {key: "3"})
    assert startup.users_setting(key, {key: "0", mark: "3"})


@pytest.mark.parametrize("norm, missing", [("gn", "GroupNormalization"),
                                           ("bn", "WorkerBatchNormalization")])
def test_a_saved_model_loads_after_import_layer_only(tmp_path, norm, missing):
    """As the README says: a saved model loads after `import layer`; without it Keras fails
    with its model's message first and the missing layer's name later (Keras wraps it, so the
    project cannot put `import layer` first). Should Keras change that, this test says so."""
    import keras
    import train
    path = tmp_path / f"{norm}.keras"
    train.build_resnet(8, norm=norm, groups=4, workers=2, input_shape=(8, 8, 3)).save(path)
    load = f"import keras; keras.models.load_model({str(path)!r}); print('loaded')"
    without = subprocess.run([sys.executable, "-c", load], cwd=tmp_path, env=user_env(),
                             capture_output=True, text=True, timeout=300)
    assert without.returncode != 0
    error = without.stderr[without.stderr.rindex("\nTypeError: ") + 1:]   # the last exception
    assert error.startswith("TypeError: <class 'keras.src.models.functional.Functional'> could "
                            "not be deserialized properly"), error[:300]
    assert f"Could not locate class '{missing}'" in error
    with_import = subprocess.run([sys.executable, "-c", f"import layer; {load}"], cwd=tmp_path,
                                 env=user_env(PYTHONPATH=REPO), capture_output=True, text=True,
                                 timeout=300)
    assert with_import.stdout.strip() == "loaded", with_import.stderr[-3000:]
