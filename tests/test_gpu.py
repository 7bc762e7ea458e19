"""gpu.sh, the sweep's next runs on a GPU machine held for a limited time, rehearsed on this
CPU as that machine runs it: Keras on JAX without TensorFlow (the .venv-backends interpreter as
`python3`). Two loans: the first call queues two seeds of an entry as one process (a pack)
and is stopped at its deadline; its checkpoint comes back (gpu.sh unpack, as it would be
committed) into a fresh copy of the repository, where the second call resumes it and
finishes both; the finished models come back too, and reproduce.py evaluates them.

The rehearsal trains on `fit` (its benchmark says fit is faster, as XLA's scan is on a
CPU), so the pack's seeds train one after another in its process; the one compiled program
of a pack on the scan loop, stopped and resumed, is tests/test_packs.py's."""
import os
import shutil
import signal
import subprocess
import tarfile
import time

import pytest

from conftest import REPO, backends_python, write_cifar_fixture

FILES = ["gpu.sh", *sorted(str(p.relative_to(REPO)) for p in [*REPO.glob("*.py"),
                                                                 *REPO.glob("gnrepro/*.py")])]
# (what the machine gets: the tree)
PACK = ("bn_b4_w2_s1", "bn_b4_w2_s2")   # grid entries 0 and 10 (seeds 1, 2), made small
LABEL = "bn_b32_w8_s1+bn_b32_w8_s2"     # the process's, named by the grid's entries


def fresh_tree(root, python):
    """A copy of the repository as a GPU machine gets it, with .gpu/ already holding the data
    and a benchmark (so the calls skip both), and `python3` = JAX without TensorFlow."""
    root.mkdir()
    (root / "gnrepro").mkdir()
    for name in FILES:
        shutil.copy(REPO / name, root / name)
    for folder in ("models", "logs"):
        (root / folder).mkdir()
    write_cifar_fixture(root / ".gpu" / "data", n_train=500, n_test=100)
    # fit faster than scan at N = 2 (as on a CPU): the sweep must pick fit
    (root / ".gpu" / "bench.txt").write_text(
        "loop  norm    N  W  precision     img/s  first call s\n"
        "fit   gn      2  8    float32       900           1.0\n"
        "scan  gn      2  8    float32       100           1.0\n")
    bin_dir = root / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(f'#!/bin/sh\nexec "{python}" "$@"\n')
    (bin_dir / "python3").chmod(0o755)
    return root


def environment(root, out, **extra):
    return {**os.environ, "PATH": f"{root / 'bin'}:{os.environ['PATH']}", "OUT": str(out),
            "PACK_SECONDS": "10", "START_SECONDS": "5", "TRAIN_GIT_COMMIT": "abc1234",
            "DATA_DIR": ".gpu/data",
            "PACK_MAX_N": "32",   # entries 0 and 10 are N = 32 in the grid: packed all the same
            # grid entries 0 and 10 (bn, seeds 1 and 2) made small: W = 2 workers of 4,
            # 40 epochs of 200 images
            "TRAIN_ARGS": "--batch-size 4 --workers 2 --epochs 40 --train-images 200 "
                          "--test-images 100", **extra}


def call(root, budget, out, deadline_after=None):
    """gpu.sh BUDGET 0 10 on root; deadline_after: a console line after which the test brings
    the deadline forward (SIGUSR1 to gpu.sh, as its clock would: mid-run whatever this
    machine's speed). (stdout, the names in what it packed)."""
    out.mkdir()
    proc = subprocess.Popen(["bash", str(root / "gpu.sh"), str(budget), "0", "10"],
                            env=environment(root, out), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    if deadline_after:
        console = root / ".gpu" / "console" / f"{LABEL}.txt"
        start = time.monotonic()
        while not (console.exists() and deadline_after in console.read_text()):
            assert proc.poll() is None and time.monotonic() - start < 600, proc.stdout.read()
            time.sleep(0.5)
        proc.send_signal(signal.SIGUSR1)
    stdout = proc.communicate(timeout=900)[0]
    assert proc.returncode == 0, stdout[-3000:]
    with tarfile.open(out / "runs.tgz.part-00") as tar:
        return stdout, set(tar.getnames())


def unpack(root, out):
    result = subprocess.run(["bash", str(root / "gpu.sh"), "unpack", str(out)], cwd=root,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def loans(tmp_path_factory):
    """Two calls of gpu.sh on two machines, each given the repository as committed; what
    each brought back, unpacked into the repository (`repo`)."""
    python = backends_python()
    root = tmp_path_factory.mktemp("loans")
    first = fresh_tree(root / "first", python)
    log1, packed1 = call(first, 900, root / "out1", deadline_after=f"{PACK[0]} epoch 2/40")
    repo = fresh_tree(root / "repo", python)
    unpacked1 = unpack(repo, root / "out1")
    checkpoints = sorted(p.name for p in (repo / "models" / "checkpoints").iterdir())
    second = fresh_tree(root / "second", python)     # a fresh machine: the committed tree
    for folder in ("models", "logs"):
        shutil.rmtree(second / folder)
        shutil.copytree(repo / folder, second / folder)
    log2, packed2 = call(second, 400, root / "out2")
    unpacked2 = unpack(repo, root / "out2")
    return dict(root=root, repo=repo, second=second, log1=log1, packed1=packed1,
                unpacked1=unpacked1, checkpoints=checkpoints, log2=log2, packed2=packed2,
                unpacked2=unpacked2)


def test_the_first_loan_packs_the_seeds_and_checkpoints_at_its_deadline(loans):
    log, packed = loans["log1"], loans["packed1"]
    assert "sweep loop fit" in log and "queued bn_b32_w8_s1 bn_b32_w8_s2" in log
    assert "gpu.sh: SIGUSR1: the deadline is now" in log
    assert f"deadline: SIGUSR1 to {LABEL}" in log and f"{LABEL} exited with status 75" in log
    assert "no CUDA MPS here" in log   # this CPU machine: said, and gone on without
    first, second = PACK
    assert f"models/checkpoints/{first}.npz" in packed   # in flight at the deadline
    assert not any(f"models/{name}.json" in packed for name in PACK)
    console = (loans["root"] / "first" / ".gpu" / "console" / f"{LABEL}.txt").read_text()
    assert f"2 runs ({first}, {second}): one after another (packs need JAX's scan loop" in console


def test_the_checkpoints_come_back_and_the_next_loan_resumes_them(loans):
    assert f"{PACK[0]}.npz" in loans["checkpoints"]   # (the second seed's, if it had started)
    assert f"{LABEL} exited with status 0" in loans["log2"]
    console = (loans["second"] / ".gpu" / "console" / f"{LABEL}.txt").read_text()
    assert f"{PACK[0]}: resuming at epoch" in console
    for name in PACK:
        assert f"{name} epoch 40/40" in console
        assert {f"models/{name}.json", f"models/{name}.keras"} <= loans["packed2"]
        assert f"models/checkpoints/{name}.npz" not in loans["packed2"]
        record = (loans["repo"] / "models" / f"{name}.json").read_text()
        assert '"backend": "jax"' in record and '"git_commit": "abc1234"' in record
        assert '"tensorflow"' not in record   # no TensorFlow on that machine
    assert f"{PACK[0]} finished; removed models/checkpoints/{PACK[0]}.npz" in loans["unpacked2"]
    assert '"resumed": 1' in (loans["repo"] / "models" / f"{PACK[0]}.json").read_text()
    assert not list((loans["repo"] / "models" / "checkpoints").iterdir())


def test_the_finished_models_are_what_reproduce_py_evaluates(loans):
    clone = loans["repo"]
    out = clone / "results.csv"
    result = subprocess.run([str(backends_python()), "reproduce.py", "--models-dir", "models",
                             "--data-dir", ".gpu/data", "--out", str(out)], cwd=clone,
                            env={**os.environ, "KERAS_BACKEND": "jax"}, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    import csv
    rows = list(csv.DictReader(out.open()))
    assert sorted(r["seed"] for r in rows) == ["1", "2"] and {r["norm"] for r in rows} == {"bn"}


def test_an_unknown_profile_stops_before_any_gpu_time_is_spent(tmp_path):
    tree = fresh_tree(tmp_path / "tree", backends_python())
    env = {**os.environ, "PATH": f"{tree / 'bin'}:{os.environ['PATH']}", "OUT": str(tmp_path),
           "PROFILE": "norm"}
    result = subprocess.run(["bash", str(tree / "gpu.sh"), "60"], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert "gpu.sh: no profile 'norm': one of ['default', 'quick', 'he', 'he-quick'" in result.stdout
    assert "sweep loop" not in result.stdout
