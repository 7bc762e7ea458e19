"""Shared test set-up: the Keras backend, and a tiny CIFAR-10 fixture in the
official pickle layout that the tests write themselves.

    write_cifar_fixture(root, n_train=500, n_test=100)  ->  root/cifar-10-batches-py/
    assert_same_arrays(a.keras, b.keras)   # every saved array equal, bit for bit

The images are learnable (each class has its own colour and stripe pattern, plus
noise), so a few epochs of a small model beat chance on them.
"""
import io
import os
import pickle
import re
import sys
import tarfile
import zipfile
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a whole sweep, a resume after a kill, real data or "
                                       "another process's training (make test-fast skips it)")


def fixture_arrays(n, seed):
    """n images (n, 3072) uint8 in R, G, B planes, and labels 0-9 balanced."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    colours = np.random.default_rng(1234).integers(40, 216, size=(10, 3))
    rows = np.arange(32)[:, None] * np.ones((1, 32))
    images = np.empty((n, 3, 32, 32), np.float64)
    for i, c in enumerate(labels):
        stripes = 30 * np.sin(rows * (c + 1) * np.pi / 16)
        images[i] = colours[c][:, None, None] + stripes + rng.normal(0, 25, (3, 32, 32))
    data = np.clip(images, 0, 255).astype(np.uint8).reshape(n, 3072)
    return data, labels.astype(int)


def fixture_batches(n_train, n_test, seed=0):
    """(file name, pickled bytes) pairs of the official cifar-10-batches-py."""
    xtr, ytr = fixture_arrays(n_train, seed)
    xte, yte = fixture_arrays(n_test, seed + 1)
    names = ["airplane", "automobile", "bird", "cat", "deer",
             "dog", "frog", "horse", "ship", "truck"]
    yield "batches.meta", {b"num_cases_per_batch": n_train // 5, b"num_vis": 3072,
                           b"label_names": [c.encode() for c in names]}
    for i, part in enumerate(np.array_split(np.arange(n_train), 5)):
        yield f"data_batch_{i + 1}", {b"batch_label": f"training batch {i + 1} of 5".encode(),
                                      b"labels": ytr[part].tolist(), b"data": xtr[part],
                                      b"filenames": [b"x.png"] * len(part)}
    yield "test_batch", {b"batch_label": b"testing batch 1 of 1", b"labels": yte.tolist(),
                         b"data": xte, b"filenames": [b"x.png"] * n_test}


def dumps(obj):
    # Name numpy's module as the official (numpy 1.x) files do.
    return pickle.dumps(obj, protocol=3).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


def write_cifar_fixture(root, n_train=500, n_test=100, seed=0, tar=False):
    """Write root/cifar-10-batches-py/ (or root/cifar-10-python.tar.gz); return root."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    files = [(name, dumps(obj)) for name, obj in fixture_batches(n_train, n_test, seed)]
    if tar:
        with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as t:
            for name, data in files:
                info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    else:
        folder = root / "cifar-10-batches-py"
        folder.mkdir(exist_ok=True)
        for name, data in files:
            (folder / name).write_bytes(data)
    return root


def saved_arrays(path):
    """Every array a .keras file holds (weights, moving statistics, optimizer state), by its
    path in the file: read without building the model (on JAX, building one compiles each
    initializer, seconds per model)."""
    import h5py
    with zipfile.ZipFile(path) as z, h5py.File(io.BytesIO(z.read("model.weights.h5")), "r") as f:
        out = {}
        f.visititems(lambda name, obj: out.update({name: obj[()]}) if isinstance(obj, h5py.Dataset)
                     else None)
    return out


def assert_same_arrays(a, b):
    """The .keras files a and b hold the same arrays, bit for bit."""
    wa, wb = saved_arrays(a), saved_arrays(b)
    assert wa.keys() == wb.keys() and len(wa) > 100
    for name, value in wa.items():
        np.testing.assert_array_equal(wb[name], value, err_msg=f"{a} {name}")


def loop_acting_in_call(at_call, action):
    """backends.ScanLoop that calls action() as its at_call-th compiled call (counted over
    every loop of the class) begins: a stop requested, a signal sent, while the call runs."""
    from gnrepro import backends

    class Loop(backends.ScanLoop):
        calls = 0

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            call = self._call

            def counted(*a):
                Loop.calls += 1
                if Loop.calls == at_call:
                    action()
                return call(*a)
            self._call = counted
    return Loop


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory):
    """A tiny CIFAR-10 (500 train, 100 test images) in the official layout."""
    return write_cifar_fixture(tmp_path_factory.mktemp("cifar"))


# What TensorFlow and XLA print when they start: absl's lines (I0000 00:00:17... file.cc:12]),
# its announcement, and the messages themselves.
CHATTER = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:|absl::InitializeLog|cuInit|oneDNN|cudart_stub|"
                     r"TF_ENABLE_ONEDNN_OPTS|CUDA error", re.M)


def user_env(**extra):
    """A new user's environment: none of the tests' own settings (TF_CPP_MIN_LOG_LEVEL, SLURM's
    variables), plus extra."""
    env = {k: v for k, v in os.environ.items()
           if k != "TF_CPP_MIN_LOG_LEVEL" and not k.startswith("SLURM_")}
    return {**env, **{k: str(v) for k, v in extra.items()}}


BACKENDS_PYTHON = REPO / ".venv-backends" / "bin" / "python"


def backends_python():
    """.venv-backends' interpreter (Keras on JAX and torch, no TensorFlow). Missing: a skip
    here, a failure in CI, where `make test` builds it before the TensorFlow suite."""
    if not BACKENDS_PYTHON.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{BACKENDS_PYTHON} is missing: make test builds it before these tests")
        pytest.skip(f"{BACKENDS_PYTHON} not found (make .venv-backends/.stamp creates it)")
    return BACKENDS_PYTHON


@pytest.fixture(scope="session")
def jpeg_cifar_dir(tmp_path_factory):
    """The JPEG copy of CIFAR-10 from ../shared/data (5,000 train, 1,000 test)."""
    script = SHARED_DATA / "cifar10_jpeg.py"
    if not script.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{script} is missing: CI needs the JPEG copy of CIFAR-10 beside the clone")
        pytest.skip(f"{script} not found (the JPEG copy lives beside the repository)")
    out = tmp_path_factory.mktemp("jpeg_cifar")
    import subprocess
    subprocess.run([sys.executable, str(script), str(out), "--train", "5000", "--test", "1000"],
                   check=True)
    return out
