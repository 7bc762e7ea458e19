"""gpu.sh, the paper-scale sweep on a borrowed GPU machine, rehearsed on this CPU as that
machine runs it: Keras on JAX without TensorFlow (the .venv-backends interpreter as
`python3`), a run stopped at the call's deadline and packed with its checkpoint, then a
second call on the same tree that resumes and finishes it."""
import os
import shutil
import subprocess
import tarfile

import pytest

from conftest import REPO, backends_python, write_cifar_fixture

FILES = ["gpu.sh", "train.py", "backends.py", "cifar10.py", "layer.py", "runfiles.py", "bench.py",
         "reproduce.py", "plot.py", "sweep.py"]



@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """A copy of the repository as the GPU machine gets it, with .gpu/ already holding the
    data and a benchmark (so the calls skip both), and `python3` = JAX without TensorFlow."""
    python = backends_python()
    root = tmp_path_factory.mktemp("gpu")
    for name in FILES:
        shutil.copy(REPO / name, root / name)
    for folder in ("models", "logs"):
        (root / folder).mkdir()
    write_cifar_fixture(root / ".gpu" / "data", n_train=500, n_test=100)
    # fit faster than scan at N = 2: the sweep must pick fit
    (root / ".gpu" / "bench.txt").write_text(
        "loop  norm    N  W  precision     img/s  first call s\n"
        "fit   gn      2  8    float32       900           1.0\n"
        "scan  gn      2  8    float32       100           1.0\n")
    bin_dir = root / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(f'#!/bin/sh\nexec "{python}" "$@"\n')
    (bin_dir / "python3").chmod(0o755)
    return root


def call(root, budget, out):
    env = {**os.environ, "PATH": f"{root / 'bin'}:{os.environ['PATH']}", "OUT": str(out),
           "PACK_SECONDS": "10", "START_SECONDS": "5", "TRAIN_GIT_COMMIT": "abc1234",
           # grid entry 0 (bn, seed 1) made small: W = 2 workers of 4, 40 epochs of 200 images
           "TRAIN_ARGS": "--batch-size 4 --workers 2 --epochs 40 --train-images 200 "
                         "--test-images 100"}
    out.mkdir()
    result = subprocess.run(["bash", str(root / "gpu.sh"), str(budget), "0"], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with tarfile.open(out / "runs.tgz.part-00") as tar:
        return result.stdout, set(tar.getnames())


def test_deadline_checkpoints_and_a_second_call_resumes(tree, tmp_path):
    log, packed = call(tree, 35, tmp_path / "first")   # SIGUSR1 at 25 s: mid-run
    assert "sweep loop fit" in log and "deadline: SIGUSR1 to tasks 0" in log
    assert "task 0 exited with status 75" in log
    assert "models/checkpoints/bn_b4_w2_s1.npz" in packed
    assert "models/bn_b4_w2_s1.json" not in packed

    log, packed = call(tree, 400, tmp_path / "second")
    assert "task 0 exited with status 0" in log
    assert {"models/bn_b4_w2_s1.json", "models/bn_b4_w2_s1.keras"} <= packed
    assert "models/checkpoints/bn_b4_w2_s1.npz" not in packed
    console = (tree / ".gpu" / "console" / "task0.txt").read_text()
    assert "resuming at epoch" in console and "epoch 40/40" in console
    record = (tree / "models" / "bn_b4_w2_s1.json").read_text()
    assert '"backend": "jax"' in record and '"git_commit": "abc1234"' in record
    assert '"tensorflow"' not in record   # no TensorFlow on that machine


def test_an_unknown_profile_stops_before_any_gpu_time_is_spent(tree, tmp_path):
    env = {**os.environ, "PATH": f"{tree / 'bin'}:{os.environ['PATH']}", "OUT": str(tmp_path),
           "PROFILE": "norm"}
    result = subprocess.run(["bash", str(tree / "gpu.sh"), "60"], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert "gpu.sh: no profile 'norm': one of ['default', 'quick', 'he', 'he-quick'" in result.stdout
    assert "sweep loop" not in result.stdout
