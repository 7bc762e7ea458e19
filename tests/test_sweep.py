"""sweep.py, the one local runner of a grid: every entry as its own process, JOBS at a time,
a failure does not stop the rest, a signal checkpoints every running entry, arguments reach
each entry, a signal that comes while train.py hands over is kept; the whole main job end to
end is test_train.py's and test_slurm.py's (and the missing data's, test_faults.py's)."""
import json
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from conftest import REPO

from gnrepro import sweep  # noqa: E402
import train  # noqa: E402,F401
from gnrepro import launch, recipe, signals  # noqa: E402


class Stop:
    requested = None


def fake(task, code=0, seconds=0.0, start=0.0):
    """A command that takes `start` seconds to start (train.py's imports), prints 'ran TASK',
    takes `seconds`, exits with `code`; SIGUSR1 makes it exit with signals.PREEMPTED, as
    train.py does after its checkpoint, and is unblocked once its handler is in, as
    signals.StopOnSignal does."""
    script = (f"import signal, sys, time\n"
              f"time.sleep({start})\n"
              f"def checkpoint(*a):\n"
              f"    print('{task} got SIGUSR1', flush=True)\n"
              f"    sys.exit({signals.PREEMPTED})\n"
              f"signal.signal(signal.SIGUSR1, checkpoint)\n"
              f"signal.pthread_sigmask(signal.SIG_UNBLOCK, {{signal.SIGUSR1}})\n"
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


def test_a_stop_before_a_run_has_its_handler_waits_for_it(capsys):
    """Stopped at once, while each run still starts (2 s before its handler is in): SIGUSR1
    waits, blocked, and each run checkpoints instead of dying of it."""
    stop = Stop()
    commands = {t: fake(t, seconds=60, start=2) for t in (1, 2)}
    threading.Timer(0.3, lambda: setattr(stop, "requested", "SIGUSR1")).start()
    assert sweep.run_entries(commands, jobs=2, stop=stop) == signals.PREEMPTED
    out = capsys.readouterr()
    assert sorted(l for l in out.out.splitlines() if "got SIGUSR1" in l) == \
        ["1 got SIGUSR1", "2 got SIGUSR1"]
    assert "failed" not in out.err


def test_a_stop_signal_is_unblocked_once_the_handler_is_in():
    """StopOnSignal delivers a SIGUSR1 that came while it was blocked, to its own handler."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    try:
        signal.pthread_kill(threading.get_ident(), signal.SIGUSR1)   # pending on this thread
        with signals.StopOnSignal() as stop:
            assert stop.requested == "SIGUSR1"
            assert signal.SIGUSR1 not in signal.pthread_sigmask(signal.SIG_BLOCK, set())
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})


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


# --- The time limit, and the order a local sweep runs its entries in -------------------------

@pytest.mark.parametrize("text, seconds", [
    ("2h30m", 9000), ("90m", 5400), ("45s", 45), ("1d12h", 129600), ("2:30:00", 9000),
    ("0:00:05", 5), (" 2H ", 7200)])
def test_durations(text, seconds):
    assert recipe.duration(text) == seconds


@pytest.mark.parametrize("text, message", [
    ("150", "'150' is not a duration: give one with units, e.g. 2h30m, 90m, 5400s, or H:MM:SS"),
    ("2x", "'2x' is not a duration"), ("h", "'h' is not a duration"),
    ("1:75:00", "'1:75:00' is not a duration"), ("0m", "'0m': the time limit must be longer")])
def test_a_bad_time_limit_names_the_option(text, message, capsys):
    with pytest.raises(SystemExit) as e:
        recipe.parse_args(["--profile", "quick", "--time-limit", text])
    assert e.value.code == 2
    assert f"argument --time-limit: {message}" in capsys.readouterr().err


def test_the_time_limit_is_a_sweeps(capsys):
    with pytest.raises(SystemExit) as e:
        launch.before_backend(["--task", "1", "--time-limit", "1h"])
    assert e.value.code == 2
    assert "--time-limit stops a whole profile's sweep (--profile alone)" in capsys.readouterr().err
    assert recipe.format_duration(9000) == "2h30m" and recipe.format_duration(61) == "1m1s"


def write_checkpoint(models, name, epoch, epochs=100, step=0):
    (models / "checkpoints").mkdir(parents=True, exist_ok=True)
    state = {"epoch": epoch, "step": step, "config": {"epochs": epochs}}
    with open(models / "checkpoints" / f"{name}.npz", "wb") as f:
        np.savez(f, state=np.array(json.dumps(state)))


def test_begun_runs_first_the_nearest_to_their_end_then_seed_by_seed_smallest_n_first(tmp_path):
    _, args = recipe.parse_args(["--profile", "default", "--models-dir", str(tmp_path)])
    entries = recipe.grid("default")
    write_checkpoint(tmp_path, "bn_b32_w8_s3", 42)   # 20: 58 epochs left
    write_checkpoint(tmp_path, "gn_b32_w8_s2", 91)   # 15: 9 left
    write_checkpoint(tmp_path, "gn_b2_w8_s1", 7, step=1256)   # 9: 93 left
    (tmp_path / "bn_b16_w8_s1.keras").write_text("")   # 1: finished
    (tmp_path / "bn_b16_w8_s1.json").write_text("{}")
    order = sweep.queue_order(args, entries, range(30))
    assert order[:3] == [15, 20, 9]
    assert [entries[i].name for i in order[3:12]] == [
        "bn_b2_w8_s1", "bn_b4_w8_s1", "gn_b4_w8_s1", "bn_b8_w8_s1", "gn_b8_w8_s1",
        "bn_b16_w8_s1", "gn_b16_w8_s1", "bn_b32_w8_s1", "gn_b32_w8_s1"]
    assert [entries[i].seed for i in order[12:]] == [2] * 9 + [3] * 9
    assert sweep.run_state(args, entries[1]) == ("finished", None)
    assert sweep.run_state(args, entries[9]) == ("checkpointed", (7, 100, 1256))
    assert sweep.run_state(args, entries[0]) == ("new", None)


FAKE_TRAIN = """\
import json, signal, sys, time
from pathlib import Path
sys.path.insert(0, {repo!r})
import numpy as np
from gnrepro import recipe
argv = sys.argv[1:]
task, models = int(argv[argv.index("--task") + 1]), Path(argv[argv.index("--models-dir") + 1])
name = recipe.grid("quick")[task].name
def checkpoint(*a):
    (models / "checkpoints").mkdir(parents=True, exist_ok=True)
    state = {{"epoch": 3, "step": 7, "config": {{"epochs": 5}}}}
    with open(models / "checkpoints" / (name + ".npz"), "wb") as f:
        np.savez(f, state=np.array(json.dumps(state)))
    print(name, "checkpointed", flush=True)
    sys.exit(75)
signal.signal(signal.SIGUSR1, checkpoint)
signal.pthread_sigmask(signal.SIG_UNBLOCK, {{signal.SIGUSR1}})   # as signals.StopOnSignal
if task == 9:   # the short one: finishes before the limit
    (models / (name + ".keras")).write_text("")
    (models / (name + ".json")).write_text("{{}}")
    sys.exit(0)
time.sleep(60)
"""


def test_at_its_time_limit_the_sweep_checkpoints_every_run_and_exits_0_with_a_summary(
        tmp_path, monkeypatch, capsys, data_found):
    """train.py stands in for itself: a run that sleeps until SIGUSR1, then writes its
    checkpoint and exits 75; grid entry 9 finishes at once."""
    (tmp_path / "train.py").write_text(FAKE_TRAIN.format(repo=str(REPO)))
    monkeypatch.setattr(sweep, "HERE", tmp_path)
    models = tmp_path / "models"
    write_checkpoint(models, "gn_b4_s1", 1, epochs=5)   # 8: begun before, so it starts first
    start = time.monotonic()
    code = sweep.main(["--profile", "quick", "--tasks", "0 8 9 4 5", "--jobs", "3",
                       "--time-limit", "3s", "--models-dir", str(models), "--results",
                       str(tmp_path / "r.csv"), "--plot", str(tmp_path / "p.png")], stop=Stop())
    assert code == 0 and time.monotonic() - start < 50   # not the runs' 60 s
    out = capsys.readouterr().out
    assert "profile quick: time limit 3s reached: every running run checkpoints" in out
    assert sorted(l for l in out.splitlines() if l.endswith(" checkpointed")) == \
        ["bn_b2_s1 checkpointed", "bn_b32_s1 checkpointed", "gn_b4_s1 checkpointed"]
    assert out.splitlines()[-1] == (   # (gn_b32_s1, the fifth, never started)
        "profile quick: time limit 3s reached: finished gn_b2_s1; checkpointed gn_b4_s1 "
        "1->3/5 epochs (+7 steps), bn_b2_s1 0->3/5 epochs (+7 steps), bn_b32_s1 0->3/5 epochs "
        "(+7 steps); 1 of 5 not trained in this call; the same command resumes")
    assert not (tmp_path / "r.csv").exists()   # no report until every run has finished


def test_a_signal_before_the_time_limit_keeps_its_exit_status(tmp_path, monkeypatch, data_found):
    (tmp_path / "train.py").write_text(FAKE_TRAIN.format(repo=str(REPO)))
    monkeypatch.setattr(sweep, "HERE", tmp_path)
    stop = Stop()
    threading.Timer(2, lambda: setattr(stop, "requested", "SIGTERM")).start()
    code = sweep.main(["--profile", "quick", "--tasks", "0", "--time-limit", "1h",
                       "--models-dir", str(tmp_path / "models"), "--results",
                       str(tmp_path / "r.csv"), "--plot", str(tmp_path / "p.png")], stop=stop)
    assert code == signals.PREEMPTED
