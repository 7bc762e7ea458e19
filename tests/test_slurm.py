"""train.sh: its #SBATCH header against train.py's grids, shellcheck, the run without SLURM
(handed to sweep.py),
and the array job on a real one-node SLURM cluster that this module starts and stops
(tests/slurm/cluster.py): four tasks complete; a task signalled mid-training checkpoints,
requeues itself, resumes and ends with the weights of an uninterrupted run.

Needs Debian's slurm-wlm, munge and shellcheck (bash .ci/install-slurm.sh) and root; the
tests that need them are skipped without them, except in CI (CI=true), where they fail.
"""
import contextlib
import functools
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
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
    from gnrepro import recipe
    first, last = map(int, sbatch_options()["--array"].split("-"))
    sizes = {p: len(grid_names("--profile", p)) for p in recipe.PROFILES}
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
    from gnrepro import signals
    assert re.search(r"^PREEMPTED=(\d+)", TRAIN_SH.read_text(), re.M)[1] == str(signals.PREEMPTED)


def test_shellcheck_is_clean():
    need(shutil.which("shellcheck"), "shellcheck is not installed (bash .ci/install-slurm.sh)")
    scripts = [TRAIN_SH, REPO / "gpu.sh", REPO / ".ci" / "install-slurm.sh",
               *sorted((REPO / "dev").glob("*.sh"))]
    result = subprocess.run(["shellcheck", *map(str, scripts)],
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
    assert result.stdout.splitlines() == ["ran -m gnrepro.sweep --profile quick --epochs 1"]


def test_without_slurm_tasks_reach_sweep_py(fake_python):
    result = subprocess.run(["bash", str(TRAIN_SH), "--epochs", "1"], capture_output=True,
                            text=True, env=run_env(PYTHON=fake_python, TASKS="3 5 7"))
    assert result.stdout.splitlines() == ["ran -m gnrepro.sweep --tasks 3 5 7 --epochs 1"]


def test_array_task_outside_a_smaller_grid_does_nothing(fake_python):
    env = run_env(PYTHON=fake_python, SLURM_ARRAY_TASK_ID=12, SLURM_ARRAY_JOB_ID=7, SLURM_JOB_ID=19)
    args = ["bash", str(TRAIN_SH), "--profile", "quick"]
    idle = subprocess.run(args, env=env, capture_output=True, text=True)
    assert idle.returncode == 0 and "has no entry 12; nothing to do" in idle.stdout
    assert "ran " not in idle.stdout
    busy = subprocess.run(args, env={**env, "SLURM_ARRAY_TASK_ID": "4"}, capture_output=True, text=True)
    assert busy.returncode == 0 and "ran train.py --task 4 --profile quick" in busy.stdout


@pytest.mark.parametrize("name, requeued, status", [("USR1", True, 0), ("TERM", False, 75)])
def test_a_train_py_killed_by_the_signal_passed_on_counts_as_stopped(tmp_path, name, requeued,
                                                                      status):
    """A signal that reaches train.py before its handler is installed kills it (status 128 +
    the signal): the task's files are whole, so train.sh treats it as a checkpointed stop,
    requeueing the task on SIGUSR1 as after train.py's own checkpoint (status 75)."""
    fake = tmp_path / "python"   # --task: a train.py still starting, with no handler yet
    fake.write_text(f"""#!/bin/bash
if [[ $2 == --grid ]]; then exec {sys.executable} "$@"; fi
echo "started $*"
exec sleep 60
""")
    scontrol = tmp_path / "bin" / "scontrol"   # records its requeue
    scontrol.parent.mkdir()
    scontrol.write_text(f'#!/bin/bash\necho "$*" >> {tmp_path / "scontrol.calls"}\n')
    fake.chmod(0o755)
    scontrol.chmod(0o755)
    env = run_env(PYTHON=fake, SLURM_ARRAY_TASK_ID=4, SLURM_ARRAY_JOB_ID=7, SLURM_JOB_ID=19,
                  PATH=f"{scontrol.parent}:{os.environ['PATH']}")
    proc = subprocess.Popen(["bash", str(TRAIN_SH), "--profile", "quick"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.startswith("started train.py --task 4"):
            proc.send_signal(getattr(signal, f"SIG{name}"))   # to train.sh, as SLURM's B:USR1
            break
    output = proc.stdout.read()
    assert proc.wait(timeout=60) == status, output
    assert f"train.py was ended by SIG{name} before its handler was installed" in output
    calls = tmp_path / "scontrol.calls"
    assert (calls.read_text() if calls.exists() else "") == ("requeue 7_4\n" if requeued else "")


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


# --- chaos: the same array, disturbed ------------------------------------------------------

CHAOS_SEED = int(os.environ.get("CHAOS_SEED", 20))   # another seed: another arrangement
# Each task meets two disturbances, the second after the first, each once the task has printed
# a drawn number of epochs and a drawn delay later; which task meets which pair is drawn too.
CHAOS_PAIRS = [("usr1 twice", "kill"), ("term twice", "requeue"),
               ("usr1", "kill in checkpoint write"), ("term", "kill in model write")]
WRITE_SECONDS = 1.0   # a slowed write stays this long between its temporary and its rename
# Held in the tasks that are to be killed mid-write: their fsync of a temporary sleeps first.
SLOW_WRITES = f"""\
import os, time
if os.environ.get("SLURM_ARRAY_TASK_ID", "-") in os.environ.get("CHAOS_SLOW_WRITES", "").split():
    _fsync = os.fsync

    def fsync(fd):
        try:
            name = os.readlink(f"/proc/self/fd/{{fd}}")
        except OSError:
            name = ""
        if ".tmp." in name:
            time.sleep({WRITE_SECONDS})
        _fsync(fd)
    os.fsync = fsync
"""


def chaos_plan(seed, tasks):
    """[{kind, task, epochs, delay}] per task, and the slurmd restart's (task, epochs, delay)."""
    rng = random.Random(seed)
    pairs = rng.sample(CHAOS_PAIRS, len(tasks))
    plan = {}
    for task, pair in zip(tasks, pairs):
        first = rng.randint(1, EPOCHS - 2)
        plan[task] = [dict(kind=pair[0], task=task, epochs=first, delay=rng.uniform(0, 0.5)),
                      dict(kind=pair[1], task=task, epochs=rng.randint(first + 1, EPOCHS - 1),
                           delay=rng.uniform(0, 0.5))]
    restart = dict(kind="slurmd restart", task=rng.choice(tasks), epochs=rng.randint(1, 2),
                   delay=rng.uniform(0, 2))
    return plan, restart


def task_processes(root, job, task):
    """pids of array task job_task's processes (train.sh and train.py) on the test cluster."""
    marks = {f"SLURM_ARRAY_JOB_ID={job}".encode(), f"SLURM_ARRAY_TASK_ID={task}".encode()}
    pids = []
    for pid in cluster.processes(root):
        with contextlib.suppress(OSError):   # (one that has just ended)
            if marks <= set(Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")) \
                    and b"slurmstepd" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.append(pid)
    return pids


class Chaos:
    """Fires the plan at an array job: each disturbance once its task has printed enough
    epochs and runs (its processes exist), after its delay; records what it did."""

    def __init__(self, slurm, job, root, names, plan, restart):
        (self.cluster, self.env), self.job, self.root, self.names = slurm, job, root, names
        self.queues, self.restart, self.done = {t: list(p) for t, p in plan.items()}, restart, []

    def epochs(self, task):
        log = self.root / "logs" / f"slurm-{self.job}_{task}.out"
        return len(epochs_printed(log.read_text(), self.names[task])) if log.exists() else 0

    def state(self, task):
        return task_states(self.job, self.env)[task][0]

    def requeue(self, task):
        """scontrol requeue, retried while the task is still completing (refused then)."""
        deadline = time.time() + 60
        while time.time() < deadline:
            done = subprocess.run(["scontrol", "requeue", f"{self.job}_{task}"], env=self.env,
                                  capture_output=True, text=True)
            if done.returncode == 0 or self.state(task) == "PENDING":
                return
            time.sleep(0.2)
        pytest.fail(f"task {task} could not be requeued: {done.stderr}")

    def signal(self, task, name, twice, everything):
        for _ in range(2 if twice else 1):
            subprocess.run(["scancel", f"--signal={name}", "--full" if everything else "--batch",
                            f"{self.job}_{task}"], env=self.env, capture_output=True)

    def kill(self, task):
        """SIGKILL every process of the task, then requeue it."""
        for pid in task_processes(self.cluster, self.job, task):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.requeue(task)

    def requeue_when_stopped(self, task):
        """After a SIGTERM train.sh does not requeue: the scheduler's requeue, done here."""
        deadline = time.time() + 120
        while self.state(task) in ("RUNNING", "COMPLETING") and time.time() < deadline:
            time.sleep(0.2)
        self.requeue(task)

    def writing(self, d):
        """Whether d's task is writing the file that d is to kill it in (its temporary is there)."""
        suffix = {"kill in checkpoint write": ".npz", "kill in model write": ".keras"}.get(d["kind"])
        return suffix is None or any((self.root / "models").rglob(
            f".{self.names[d['task']]}.*.tmp{suffix}"))

    def fire(self, d):
        task, kind = d["task"], d["kind"]
        if "write" not in kind:   # (a write is killed in at once: it lasts WRITE_SECONDS)
            time.sleep(d["delay"])
        if kind in ("usr1", "usr1 twice"):   # SLURM's warning before the time limit
            self.signal(task, "USR1", twice=kind.endswith("twice"), everything=False)
        elif kind in ("term", "term twice"):   # preemption: every process of the task
            self.signal(task, "TERM", twice=kind.endswith("twice"), everything=True)
            self.requeue_when_stopped(task)
        elif kind == "requeue":   # an operator's scontrol requeue
            self.requeue(task)
        elif kind.startswith("kill"):
            self.kill(task)
        elif kind == "slurmd restart":
            cluster.kill_and_wait(cluster.pid_of(self.cluster / "slurmd.pid"))
            subprocess.run(["slurmd"], env=self.env, check=True)
        self.done.append(d)

    def ready(self, d):
        return (self.epochs(d["task"]) >= d["epochs"] and self.writing(d)
                and task_processes(self.cluster, self.job, d["task"]))

    def gone(self, task):
        """Whether the task has left the queue for good (finished): it can meet nothing more."""
        for _ in range(5):   # (a second apart: not a task between a kill and its requeue)
            if subprocess.run(["squeue", "-h", "-j", f"{self.job}_{task}"], env=self.env,
                              capture_output=True, text=True).stdout.strip():
                return False
            time.sleep(1)
        return True

    def follow(self, queue, deadline, errors):
        """Fire queue's disturbances in turn, each once ready; give up when its task is gone."""
        try:
            for d in queue:
                polls = 0
                while not self.ready(d):
                    polls += 1
                    if time.time() > deadline or (polls % 50 == 0 and self.gone(d["task"])):
                        return
                    time.sleep(0.02)
                self.fire(d)
        except BaseException as e:   # (pytest.fail too): reported by run(), in the test's thread
            errors.append(e)

    def run(self, timeout):
        """Each task's disturbances in a thread of their own, the slurmd restart in one more:
        one task's wait (for its task to stop, for a requeue to be taken) must not hold back
        another's disturbance, which would then find its task finished."""
        deadline = time.time() + timeout
        errors = []
        threads = [threading.Thread(target=self.follow, args=(q, deadline, errors), daemon=True)
                   for q in [*self.queues.values(), [self.restart]]]
        for t in threads:
            t.start()
        for t in threads:
            t.join(max(0.0, deadline - time.time()))
        if errors:
            raise errors[0]
        queued = "?"
        while time.time() < deadline:
            queued = subprocess.run(["squeue", "-h", "-j", self.job], env=self.env,
                                    capture_output=True, text=True).stdout.strip()
            if not queued:
                break
            time.sleep(0.2)
        planned = [d for q in self.queues.values() for d in q] + [self.restart]
        left = [d for d in planned if d not in self.done]
        if queued or left:
            pytest.fail(f"chaos seed {CHAOS_SEED}: after {timeout} s, still queued: {queued!r}; "
                        f"disturbances that could not land (their task had finished): {left}; "
                        f"done {self.done}\n{slurm_log(self.cluster)}")


def comparable(record):
    """A run record less what a disturbance may change: its timing, host and restarts. Its
    segments (one per start) still chain from the first step to the last, with no gap."""
    drop = {"wall_seconds", "images_per_second", "finished_at", "host", "resumed", "segments"}
    out = {k: v for k, v in record.items() if k not in drop}
    segments = record["segments"]
    assert len(segments) == record["resumed"] + 1, segments
    assert [s["start"] for s in segments] == [[0, 0]] + [s["end"] for s in segments[:-1]]
    assert segments[-1]["end"] == [record["config"]["epochs"], 0], segments
    out["history"] = [{k: v for k, v in e.items() if k not in ("seconds", "images_per_second")}
                      for e in record["history"]]
    return out


def results_table(root, cifar_dir):
    """reproduce.py over root/models: results.csv less its model path and date columns."""
    import pandas as pd
    subprocess.run([sys.executable, str(REPO / "reproduce.py"), "--models-dir", root / "models",
                    "--out", root / "results.csv", "--data-dir", cifar_dir],
                   check=True, capture_output=True)
    return pd.read_csv(root / "results.csv").drop(columns=["model", "date"])


def assert_same_model(a, b):
    """Weights and optimizer variables, bit for bit."""
    import keras
    import layer  # noqa: F401  (registers the custom layers)
    ma, mb = keras.models.load_model(a), keras.models.load_model(b)
    for x, y in zip(ma.get_weights() + [np.asarray(v) for v in ma.optimizer.variables],
                    mb.get_weights() + [np.asarray(v) for v in mb.optimizer.variables]):
        np.testing.assert_array_equal(x, y)


def test_chaos_sweep_ends_bit_for_bit_as_the_undisturbed_one(slurm, array_run, cifar_dir,
                                                              tmp_path):
    """The 4-task array of array_run again, its tasks disturbed at drawn (CHAOS_SEED) times:
    - SIGKILL of every process of a task, then scontrol requeue;
    - SIGUSR1 to train.sh (SLURM's time-limit warning), once and twice in a row: it
      checkpoints and requeues itself;
    - SIGTERM to every process of a task (preemption), once and twice in a row, then
      scontrol requeue (as a preempting scheduler would);
    - scontrol requeue while it runs (an operator);
    - SIGKILL while a checkpoint, and while the final model, is being written (between the
      temporary's creation and its rename: those tasks' writes are slowed to be hit), then
      scontrol requeue;
    - a restart of slurmd while the tasks run.
    At the end every task has COMPLETED; every model (weights and optimizer state), run
    record (less timing, host and restarts) and reproduce.py's results.csv (less the model
    path and date) equal the undisturbed array's, bit for bit; no temporary, checkpoint,
    lock or set-aside file is left. Packs (several seeds in one process) are not in this
    grid: TensorFlow does not pack."""
    ref, _ = array_run
    _, env = slurm
    (tmp_path / "logs").mkdir()
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(SLOW_WRITES)
    names = {t: n for t, n in grid_names("--profile", "quick").items() if t < 4}
    plan, restart = chaos_plan(CHAOS_SEED, sorted(names))
    slow = [str(t) for t, p in plan.items() if any("write" in d["kind"] for d in p)]
    chaos_env = {**env, "PYTHONPATH": str(tmp_path / "site"), "CHAOS_SLOW_WRITES": " ".join(slow)}
    job = sbatch(chaos_env, tmp_path, "--array=0-3", TRAIN_SH, *tiny_args(cifar_dir, tmp_path))
    chaos = Chaos(slurm, job, tmp_path, names, plan, restart)
    chaos.run(timeout=420)
    print(f"chaos seed {CHAOS_SEED}: {chaos.done}")

    states = task_states(job, env)
    assert {t: s[:2] for t, s in states.items()} == {t: ("COMPLETED", "0:0") for t in names}
    # Each task restarted once or more (twice, unless its second disturbance came while it
    # was stopping after its first: a SIGKILL during the checkpoint after a SIGUSR1, say).
    assert len(chaos.done) == 2 * len(names) + 1 and all(s[2] >= 1 for s in states.values())
    for task, name in names.items():
        assert_same_model(ref / "models" / f"{name}.keras", tmp_path / "models" / f"{name}.keras")
        records = [json.loads((r / "models" / f"{name}.json").read_text()) for r in (ref, tmp_path)]
        assert comparable(records[0]) == comparable(records[1]), name
        assert records[1]["resumed"] >= 1
    leftovers = [p for p in (tmp_path / "models").rglob("*")
                 if ".tmp" in p.name or p.suffix in (".bad", ".lock", ".npz")]
    assert leftovers == []
    assert results_table(tmp_path, cifar_dir).equals(results_table(ref, cifar_dir))


def test_cluster_stops_and_leaves_nothing_running(slurm):
    root, _ = slurm
    assert cluster.processes(root), "the cluster is running before it is stopped"
    assert cluster.stop(root) == [], "processes were left after the daemons stopped"
    assert cluster.processes(root) == []
