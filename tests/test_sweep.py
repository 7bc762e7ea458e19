"""sweep.py, the one local runner of a grid: every entry as its own process, JOBS at a time,
a failure does not stop the rest, a signal checkpoints every running entry, arguments reach
each entry, a signal that comes while train.py hands over is kept; the whole main job end to
end is test_train.py's and test_slurm.py's (and the missing data's, test_faults.py's)."""
import subprocess
import sys
import threading
import time

import pytest

from conftest import REPO

from gnrepro import sweep  # noqa: E402
import train  # noqa: E402,F401
from gnrepro import launch, recipe, signals  # noqa: E402


class Stop:
    requested = None


def fake(task, code=0, seconds=0.0):
    """A command that prints 'ran TASK', takes `seconds`, exits with `code`; SIGUSR1 makes it
    exit with signals.PREEMPTED, as train.py does after its checkpoint."""
    script = (f"import signal, sys, time\n"
              f"def checkpoint(*a):\n"
              f"    print('{task} got SIGUSR1', flush=True)\n"
              f"    sys.exit({signals.PREEMPTED})\n"
              f"signal.signal(signal.SIGUSR1, checkpoint)\n"
              f"print('ran {task}', flush=True)\n"
              f"time.sleep({seconds})\n"
              f"sys.exit({code})")
    return [sys.executable, "-c", script]


@pytest.fixture
def data_found(monkeypatch):
    """The sweep's one look for CIFAR-10 answered yes (these tests fake the runs too)."""
    monkeypatch.setattr(sweep.cifar10, "require", lambda data_dir=None: data_dir)


def ran(capsys):
    return [line for line in capsys.readouterr().out.splitlines() if line.startswith("ran ")]


def test_every_entry_runs_in_order_one_at_a_time(capsys):
    commands = {t: fake(t) for t in (4, 9, 0)}
    assert sweep.run_entries(commands, jobs=1, stop=Stop()) == 0
    assert ran(capsys) == ["ran 4", "ran 9", "ran 0"]


def test_a_failure_does_not_stop_the_rest_and_is_named(capsys):
    commands = {3: fake(3), 5: fake(5, code=3), 7: fake(7)}
    assert sweep.run_entries(commands, jobs=2, stop=Stop(), label="profile x") == 1
    out = capsys.readouterr()
    assert sorted(line for line in out.out.splitlines() if line.startswith("ran ")) == \
        ["ran 3", "ran 5", "ran 7"]
    assert "profile x: grid entry 5 failed (exit status 3" in out.err


def test_jobs_run_at_once():
    # Two entries of 1.5 s each, 2 at a time: both have started before either ends.
    stop, starts = Stop(), []
    commands = {t: fake(t, seconds=1.5) for t in (1, 2)}
    real = subprocess.Popen

    def popen(*args, **kwargs):
        starts.append(time.monotonic())
        return real(*args, **kwargs)
    sweep.subprocess.Popen = popen
    try:
        assert sweep.run_entries(commands, jobs=2, stop=stop) == 0
    finally:
        sweep.subprocess.Popen = real
    assert len(starts) == 2 and starts[1] - starts[0] < 1.0


def test_a_stop_signals_the_running_entries_and_starts_no_more(capsys):
    stop = Stop()
    commands = {t: fake(t, seconds=60) for t in (1, 2, 3)}
    threading.Timer(1.5, lambda: setattr(stop, "requested", "SIGINT")).start()
    assert sweep.run_entries(commands, jobs=2, stop=stop, label="profile x") == signals.PREEMPTED
    out = capsys.readouterr().out
    assert "ran 3" not in out and sorted(l for l in out.splitlines() if l.startswith("ran ")) == \
        ["ran 1", "ran 2"]
    # each running entry was asked once for its checkpoint (not left to sleep its 60 s)
    assert sorted(l for l in out.splitlines() if "got SIGUSR1" in l) == \
        ["1 got SIGUSR1", "2 got SIGUSR1"]
    assert "profile x: stopped by SIGINT; run the same command again to resume" in out


def test_each_entry_gets_the_sweeps_arguments_in_the_order_of_its_batch_size(monkeypatch,
                                                                              data_found):
    seen = {}
    monkeypatch.setattr(sweep, "run_entries",
                        lambda commands, jobs, stop, label: seen.update(commands=commands,
                                                                        jobs=jobs) or 1)
    assert sweep.main(["--profile", "quick", "--tasks", "0 4 9", "--epochs", "2", "--jobs", "3",
                       "--data-dir", "/d", "--force", "--models-dir", "m", "--results", "r.csv",
                       "--plot", "p.png"], stop=Stop()) == 1
    assert list(seen["commands"]) == [4, 9, 0]   # N = 2 first: the longest runs
    assert seen["jobs"] == 3
    assert seen["commands"][4][2:] == [str(REPO / "train.py"), "--task", "4", "--profile", "quick",
                                       "--epochs", "2", "--data-dir", "/d", "--models-dir", "m",
                                       "--threads", "1", "--loop", "auto", "--force"]


@pytest.mark.parametrize("args, message", [
    (["--profile", "quick", "--tasks", "3 10"], "--tasks 10: outside the quick grid (0-9)"),
    (["--profile", "norms-quick", "--norm", "bn"], "--norm: a sweep runs every entry"),
    (["--groups", "4"], "--groups: a sweep runs every entry"),
    (["--channels-per-group", "4"], "--channels-per-group: a sweep runs every entry"),
    (["--profile", "quick", "--epochs", "2"], "--epochs changes the quick profile's scale: give "
     "--models-dir --results --plot of your own too, so that its files (models/quick, "
     "results/quick/results.csv, results/quick/plot.png) are not replaced"),
    (["--train-images", "9", "--models-dir", "m"], "give --results --plot of your own too"),
])
def test_errors_name_the_argument(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        sweep.main(args, stop=Stop())
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_train_py_hands_a_whole_profile_to_sweep_py():
    grouped = subprocess.run([sys.executable, "train.py", "--profile", "quick", "--groups", "4"],
                             cwd=REPO, capture_output=True, text=True)
    assert grouped.returncode == 2 and "--groups: a sweep runs every entry" in grouped.stderr
    result = subprocess.run([sys.executable, "train.py", "--profile", "quick", "--tasks", "12"],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2 and "--tasks 12: outside the quick grid" in result.stderr
    single = subprocess.run([sys.executable, "train.py", "--task", "1", "--tasks", "2"],
                            cwd=REPO, capture_output=True, text=True)
    assert single.returncode == 2 and "--tasks selects entries of a whole profile" in single.stderr


@pytest.mark.parametrize("profile, expected", [
    ("default", ["models", "logs", "results.csv", "plot.png", "curves.png"]),
    ("groups-quick", ["models/groups-quick", "logs/groups-quick",
                      "results/groups-quick/results.csv", "results/groups-quick/plot.png",
                      "results/groups-quick/curves.png"]),
])
def test_each_profile_has_its_own_files(profile, expected):
    paths = recipe.profile_paths(profile)
    assert [paths[k] for k in ("models_dir", "logs_dir", "results", "plot", "curves")] == expected
    _, args = recipe.parse_args(["--profile", profile, "--plot", "out/plot-x.png"])
    assert recipe.profile_paths(profile, args)["curves"] == "out/curves-x.png"


def test_seeds_renumber_the_grid_and_reach_every_entry(monkeypatch, data_found):
    assert [c.name for c in recipe.grid("norms-quick", seeds=[2, 3])][3:5] == ["in_b32_s2", "bn_b32_s3"]
    cfg = recipe.resolve(*recipe.parse_args(["--profile", "quick", "--seeds", "2 3", "--task", "12"]))
    assert cfg.name == "bn_b8_s3"
    seen = {}
    monkeypatch.setattr(sweep, "run_entries",
                        lambda commands, jobs, stop, label: seen.update(commands) or 1)
    assert sweep.main(["--profile", "norms-quick", "--seeds", "2,3"], stop=Stop()) == 1   # fake
    assert sorted(seen) == list(range(8))
    assert seen[7][5:9] == ["--profile", "norms-quick", "--seeds", "2 3"]


@pytest.mark.parametrize("seeds", ["2 2", "-1", ""])
def test_bad_seeds_are_refused(seeds, capsys):
    with pytest.raises(SystemExit):
        recipe.parse_args(["--profile", "quick", "--seeds", seeds])
    assert "--seeds should be distinct non-negative integers" in capsys.readouterr().err


def test_a_stop_before_the_hand_over_starts_nothing(capsys):
    """A signal during train.py's imports (its StopOnSignal saw it): no sweep.py at all."""
    stop = Stop()
    stop.requested = "SIGTERM"
    with pytest.raises(SystemExit) as e:
        launch.hand_over(["--profile", "quick"], stop)
    assert e.value.code == signals.PREEMPTED and "stopped by SIGTERM" in capsys.readouterr().out


def test_a_signal_during_the_hand_over_is_kept_and_starts_nothing(cifar_dir):
    """train.py execs sweep.py with its signals blocked: one sent in between stays pending and
    reaches sweep.py's handler once installed (not SIGTERM's default, which would kill it)."""
    script = ("import os, signal, sys\n"
              "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})\n"
              "os.kill(os.getpid(), signal.SIGTERM)   # pending, as if sent during the exec\n"
              f"os.execv(sys.executable, [sys.executable, '-m', 'gnrepro.sweep', "
              f"'--profile', 'quick', '--data-dir', {str(cifar_dir)!r}])")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == signals.PREEMPTED, result.stderr
    assert "stopped by SIGTERM" in result.stdout and "train.py --task" not in result.stdout


def test_no_gpu_is_seen_without_nvidia_smi(monkeypatch):
    monkeypatch.setattr(sweep.shutil, "which", lambda name: None)
    assert not sweep.has_gpu() and sweep.default_jobs(1) == (sweep.os.cpu_count() or 1)
    assert sweep.default_jobs(0) == 1
