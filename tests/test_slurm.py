"""train.sh: its #SBATCH header against train.py's grids, shellcheck, the run without SLURM
(handed to sweep.py),
and the array job on a real one-node SLURM cluster that this module starts and stops
(tests/slurm/cluster.py): four tasks complete; a task signalled mid-training checkpoints,
requeues itself, resumes and ends with the weights of an uninterrupted run.

Needs Debian's slurm-wlm, munge and shellcheck (bash .ci/install-slurm.sh) and root; the
tests that need them are skipped without them, except in CI (CI=true), where they fail.
"""
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO

sys.path.insert(0, str(Path(__file__).resolve().parent / "slurm"))
import cluster  # noqa: E402

TRAIN_SH = REPO / "train.sh"
EPOCHS = 4
# The quick profile's grid (one seed, W = 1) at a tenth of its scale.
TINY = ["--profile", "quick", "--epochs", EPOCHS, "--train-images", 200, "--test-images", 100]


def need(ok, reason):
    """Skip without what a test needs; in CI, fail instead."""
    if not ok:
        (pytest.fail if os.environ.get("CI") else pytest.skip)(reason)


def run_env(**extra):
    """The environment of a run: no SLURM_* variables of an enclosing job, this Python."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return {**env, "PYTHON": sys.executable, **{k: str(v) for k, v in extra.items()}}


def tiny_args(cifar_dir, root):
    return [*map(str, TINY), "--data-dir", str(cifar_dir),
            "--models-dir", str(root / "models"), "--logs-dir", str(root / "logs"),
            "--results", str(root / "results.csv"), "--plot", str(root / "plot.png")]


@functools.cache
def grid_names(*args):
    """{index: run name} of python train.py --grid args."""
    out = subprocess.run([sys.executable, "train.py", "--grid", *args], cwd=REPO, check=True,
                         capture_output=True, text=True).stdout
    return {int(line.split()[0]): line.split()[1] for line in out.splitlines()
            if line.strip() and not line.startswith("#")}


def epochs_printed(text, name):
    return [line.split()[2] for line in text.splitlines() if line.startswith(f"{name} epoch ")]


def history(root, name):
    record = json.loads((root / "models" / f"{name}.json").read_text())
    return [e["epoch"] for e in record["history"]], record


def assert_same_weights(a, b):
    import keras
    import layer  # noqa: F401  (registers the custom layers)
    wa, wb = (keras.models.load_model(p).get_weights() for p in (a, b))
    assert len(wa) == len(wb)
    for x, y in zip(wa, wb):
        np.testing.assert_array_equal(x, y)


# --- the script itself -----------------------------------------------------------------

def sbatch_options():
    options = {}
    for line in TRAIN_SH.read_text().splitlines():
        if line.startswith("#SBATCH "):
            key, _, value = line.removeprefix("#SBATCH ").strip().partition("=")
            options[key] = value
    return options


def test_array_covers_the_largest_grid_of_train_py():
    import train
    first, last = map(int, sbatch_options()["--array"].split("-"))
    sizes = {p: len(grid_names("--profile", p)) for p in train.PROFILES}
    assert (first, last + 1) == (0, max(sizes.values())), sizes
    assert sorted(grid_names()) == list(range(sizes["default"]))


def test_header_requests_a_gpu_requeue_and_a_warning_signal():
    o = sbatch_options()
    assert o["--gres"] == "gpu:1" and int(o["--cpus-per-task"]) >= 1 and o["--mem"]
    assert "--requeue" in o and o["--open-mode"] == "append"
    assert o["--output"] == "logs/slurm-%A_%a.out"
    h, m, s = map(int, o["--time"].split(":"))
    signal_name, seconds = o["--signal"].split("@")
    assert signal_name == "B:USR1" and 60 <= int(seconds) < (h * 3600 + m * 60 + s) / 2
    import train
    assert re.search(r"^PREEMPTED=(\d+)", TRAIN_SH.read_text(), re.M)[1] == str(train.PREEMPTED)


def test_shellcheck_is_clean():
    need(shutil.which("shellcheck"), "shellcheck is not installed (bash .ci/install-slurm.sh)")
    result = subprocess.run(["shellcheck", str(TRAIN_SH), str(REPO / ".ci" / "install-slurm.sh")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


# --- without SLURM ---------------------------------------------------------------------

@pytest.fixture
def fake_python(tmp_path):
    """A python that answers --grid truly and only reports the other commands it is given."""
    fake = tmp_path / "python"
    fake.write_text(f"""#!/bin/bash
if [[ $2 == --grid ]]; then exec {sys.executable} "$@"; fi
echo "ran $*"
exit 0
""")
    fake.chmod(0o755)
    return fake


def test_without_slurm_the_grid_goes_to_sweep_py(fake_python):
    result = subprocess.run(["bash", str(TRAIN_SH), "--profile", "quick", "--epochs", "1"],
                            env=run_env(PYTHON=fake_python), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["ran sweep.py --profile quick --epochs 1"]


def test_without_slurm_tasks_reach_sweep_py(fake_python):
    result = subprocess.run(["bash", str(TRAIN_SH), "--epochs", "1"], capture_output=True,
                            text=True, env=run_env(PYTHON=fake_python, TASKS="3 5 7"))
    assert result.stdout.splitlines() == ["ran sweep.py --tasks 3 5 7 --epochs 1"]


def test_array_task_outside_a_smaller_grid_does_nothing(fake_python):
    env = run_env(PYTHON=fake_python, SLURM_ARRAY_TASK_ID=12, SLURM_ARRAY_JOB_ID=7, SLURM_JOB_ID=19)
    args = ["bash", str(TRAIN_SH), "--profile", "quick"]
    idle = subprocess.run(args, env=env, capture_output=True, text=True)
    assert idle.returncode == 0 and "has no entry 12; nothing to do" in idle.stdout
    assert "ran " not in idle.stdout
    busy = subprocess.run(args, env={**env, "SLURM_ARRAY_TASK_ID": "4"}, capture_output=True, text=True)
    assert busy.returncode == 0 and "ran train.py --task 4 --profile quick" in busy.stdout


def test_without_slurm_ctrl_c_checkpoints_and_the_same_command_resumes(cifar_dir, tmp_path):
    name = grid_names("--profile", "quick")[3]
    command = ["bash", str(TRAIN_SH), *tiny_args(cifar_dir, tmp_path)]
    # As from a terminal: a shell started in the background without job control (CI may be)
    # inherits SIGINT ignored, and bash cannot trap a signal ignored when it starts.
    proc = subprocess.Popen(command, env=run_env(TASKS="3"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    output = []
    for line in proc.stdout:
        output.append(line)
        if line.startswith(f"{name} epoch 1/"):
            proc.send_signal(signal.SIGINT)   # to train.sh alone, as Ctrl-C reaches it
            break
    output.append(proc.stdout.read())
    first = "".join(output)
    assert proc.wait(timeout=120) == 75, first[-3000:]
    assert "profile quick: stopped by SIGINT; run the same command again to resume" in first
    assert (tmp_path / "models" / "checkpoints" / f"{name}.npz").exists()

    again = subprocess.run(command, env=run_env(TASKS="3"), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming at epoch " in again.stdout
    printed = epochs_printed(first + again.stdout, name)
    assert printed == [f"{e}/{EPOCHS}" for e in range(1, EPOCHS + 1)]
    epochs, record = history(tmp_path, name)
    assert epochs == list(range(1, EPOCHS + 1)) and record["resumed"] == 1

    assert (tmp_path / "results.csv").exists() and (tmp_path / "plot.png").exists()
    third = subprocess.run(command, env=run_env(TASKS="3"), capture_output=True, text=True)
    assert third.returncode == 0 and f"{name}: already finished" in third.stdout


# --- on a real SLURM -------------------------------------------------------------------

@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A one-node cluster for this module: (its folder, the environment that reaches it)."""
    gone = cluster.missing()
    need(not gone, f"SLURM is not installed ({', '.join(gone)} missing): bash .ci/install-slurm.sh")
    need(os.geteuid() == 0, "the test cluster's daemons run as root")
    root = tmp_path_factory.mktemp("slurm")
    environment = cluster.start(root)
    yield root, {**run_env(), "SLURM_CONF": environment["SLURM_CONF"], "PATH": environment["PATH"]}
    cluster.stop(root)


def sbatch(env, workdir, *args):
    """Submit train.sh from workdir (which has logs/ for the header's --output); the job id."""
    result = subprocess.run(["sbatch", "--parsable", *map(str, args)], cwd=workdir, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def slurm_log(root):
    return "\n".join((root / f).read_text()[-2000:] for f in ("slurmctld.log", "slurmd.log"))


def wait_for(job, slurm, timeout, until=None):
    """Wait until the job has left the queue (or until() is true); fail with the logs if not."""
    root, env = slurm
    deadline = time.time() + timeout
    while time.time() < deadline:
        if until and until():
            return True
        queue = subprocess.run(["squeue", "-h", "-j", job], env=env, capture_output=True,
                               text=True).stdout.strip()
        if not queue:
            return False
        time.sleep(0.2)
    pytest.fail(f"job {job} still queued after {timeout} s:\n{queue}\n{slurm_log(root)}")


def task_states(job, env):
    """{array task id: (JobState, ExitCode, Restarts)} of the job's tasks."""
    out = subprocess.run(["scontrol", "-o", "show", "job", job], env=env, capture_output=True,
                         text=True, check=True).stdout
    states = {}
    for line in out.splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        states[int(fields["ArrayTaskId"])] = (fields["JobState"], fields["ExitCode"],
                                              int(fields["Restarts"]))
    return states


@pytest.fixture(scope="module")
def array_run(slurm, cifar_dir, tmp_path_factory):
    """sbatch --array=0-3 train.sh <tiny settings>, submitted from another folder, waited for."""
    root = tmp_path_factory.mktemp("array")
    (root / "logs").mkdir()
    job = sbatch(slurm[1], root, "--array=0-3", TRAIN_SH, *tiny_args(cifar_dir, root))
    wait_for(job, slurm, timeout=240)
    return root, job


def test_array_tasks_complete_with_models_records_and_logs(slurm, array_run):
    root, job = array_run
    assert task_states(job, slurm[1]) == {i: ("COMPLETED", "0:0", 0) for i in range(4)}
    for task, name in list(grid_names("--profile", "quick").items())[:4]:
        log = (root / "logs" / f"slurm-{job}_{task}.out").read_text()
        assert f"array task {job}_{task} " in log
        assert epochs_printed(log, name) == [f"{e}/{EPOCHS}" for e in range(1, EPOCHS + 1)], log
        assert (root / "models" / f"{name}.keras").exists() and (root / "logs" / name).is_dir()
        epochs, record = history(root, name)
        assert epochs == list(range(1, EPOCHS + 1)) and record["resumed"] == 0
        assert record["config"]["train_images"] == 200   # sbatch's arguments reached train.py


def test_signalled_task_checkpoints_requeues_itself_and_resumes(slurm, array_run, cifar_dir,
                                                                 tmp_path):
    _, env = slurm
    name = grid_names("--profile", "quick")[3]
    (tmp_path / "logs").mkdir()
    job = sbatch(env, tmp_path, "--array=3", TRAIN_SH, *tiny_args(cifar_dir, tmp_path))
    log = tmp_path / "logs" / f"slurm-{job}_3.out"
    in_epoch_2 = wait_for(job, slurm, timeout=120, until=lambda: log.exists()
                          and f"{name} epoch 1/" in log.read_text())
    assert in_epoch_2, f"the task ended before it could be signalled:\n{log.read_text()}"
    # What SLURM does ahead of the time limit (--signal=B:USR1@...): USR1 to train.sh alone.
    subprocess.run(["scancel", "--signal=USR1", "--batch", f"{job}_3"], env=env, check=True)
    wait_for(job, slurm, timeout=180)

    text = log.read_text()
    assert f"requeued {job}_3;" in text and "restart 1," in text, text
    assert re.search(rf"{name}: checkpointed at epoch \d+, step \d+", text), text
    assert re.search(rf"{name}: resuming at epoch \d+, step \d+", text), text
    # No epoch trained twice: each is printed once, across both runs of the task.
    assert epochs_printed(text, name) == [f"{e}/{EPOCHS}" for e in range(1, EPOCHS + 1)], text
    assert task_states(job, env) == {3: ("COMPLETED", "0:0", 1)}
    epochs, record = history(tmp_path, name)
    assert epochs == list(range(1, EPOCHS + 1)) and record["resumed"] == 1
    assert_same_weights(array_run[0] / "models" / f"{name}.keras",
                        tmp_path / "models" / f"{name}.keras")


def test_array_of_another_profiles_grid(slurm, cifar_dir, tmp_path):
    """sbatch train.sh --profile norms-quick: its tasks 2 and 3 (LN, IN) train; 4 and 5 lie
    beyond its 4 entries and do nothing."""
    _, env = slurm
    (tmp_path / "logs").mkdir()
    args = [a if a != "quick" else "norms-quick" for a in tiny_args(cifar_dir, tmp_path)]
    job = sbatch(env, tmp_path, "--array=2-5", TRAIN_SH, *args)
    wait_for(job, slurm, timeout=240)
    assert task_states(job, env) == {i: ("COMPLETED", "0:0", 0) for i in range(2, 6)}
    names = grid_names("--profile", "norms-quick")
    assert [names[2], names[3]] == ["ln_b32_s1", "in_b32_s1"] and len(names) == 4
    for task in (2, 3):
        epochs, record = history(tmp_path, names[task])
        assert epochs == list(range(1, EPOCHS + 1))
        assert record["config"]["norm"] == names[task][:2] and record["config"]["profile"] == \
            "norms-quick"
    for task in (4, 5):
        log = (tmp_path / "logs" / f"slurm-{job}_{task}.out").read_text()
        assert f"has no entry {task}; nothing to do" in log


def test_cluster_stops_and_leaves_nothing_running(slurm):
    root, _ = slurm
    assert cluster.processes(root), "the cluster is running before it is stopped"
    assert cluster.stop(root) == [], "processes were left after the daemons stopped"
    assert cluster.processes(root) == []
