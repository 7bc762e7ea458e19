"""cifar10.py: finding, fetching (from a local HTTP server), safe extraction, the
restricted unpickler, validation, and the NumPy input pipeline.

    python -m pytest -q tests/test_cifar10.py
"""
import hashlib
import http.server
import io
import os
import pickle
import socket
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from gnrepro import cifar10
from conftest import REPO, dumps, fixture_batches, write_cifar_fixture

pytestmark = pytest.mark.filterwarnings("ignore::gnrepro.cifar10.SubsetWarning")


# ---------------------------------------------------------------- helpers

@pytest.fixture(scope="module")
def tarball(tmp_path_factory):
    """The fixture's cifar-10-python.tar.gz as bytes, with its size and md5."""
    root = write_cifar_fixture(tmp_path_factory.mktemp("tar"), tar=True)
    data = (root / cifar10.TARBALL).read_bytes()
    return SimpleNamespace(data=data, size=len(data), md5=hashlib.md5(data).hexdigest())


@pytest.fixture
def server(tarball):
    """An HTTP server on 127.0.0.1 serving /cifar.tar.gz; counts GETs; optional delay."""
    state = SimpleNamespace(hits=0, delay=0.0, files={"/cifar.tar.gz": tarball.data})

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            state.hits += 1
            time.sleep(state.delay)
            body = state.files.get(self.path)
            if body is None:
                return self.send_error(404)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}/cifar.tar.gz"
    yield state
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def cache(tmp_path, monkeypatch, server, tarball):
    """KERAS_HOME in tmp_path, no CIFAR10_DIR, the module's URL/SIZE/MD5 on the local server."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    monkeypatch.delenv("CIFAR10_DIR", raising=False)
    monkeypatch.setattr(cifar10, "URL", server.url)
    monkeypatch.setattr(cifar10, "SIZE", tarball.size)
    monkeypatch.setattr(cifar10, "MD5", tarball.md5)
    return tmp_path / "keras" / "datasets"


def closed_port_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/cifar.tar.gz"  # nothing listens there now


def files_under(path):
    return sorted(str(p.relative_to(path)) for p in Path(path).rglob("*"))


def with_batch(root, name, obj):
    """A fixture copy in root whose file `name` holds obj (pickled like the official files)."""
    write_cifar_fixture(root)
    (root / cifar10.FOLDER / name).write_bytes(obj if isinstance(obj, bytes) else dumps(obj))
    return root


def fixture_dict(name):
    return dict(fixture_batches(500, 100))[name]


# ---------------------------------------------------------------- download

def test_download_checks_and_extracts(tmp_path, server, tarball, cifar_dir):
    path = cifar10.download(tmp_path, server.url, tarball.size, tarball.md5)
    assert path == tmp_path / cifar10.TARBALL and path.read_bytes() == tarball.data
    assert files_under(tmp_path) == [cifar10.TARBALL]  # no temporary file left
    got, want = cifar10.load(tmp_path, download=False), cifar10.load(cifar_dir)
    assert cifar10.checksum(*got) == cifar10.checksum(*want)
    assert server.hits == 1


@pytest.mark.parametrize("wrong", ["md5", "size+1", "size-1"])
def test_download_refuses_wrong_file_and_keeps_nothing(tmp_path, server, tarball, wrong):
    size = tarball.size + {"md5": 0, "size+1": 1, "size-1": -1}[wrong]
    md5 = "0" * 32 if wrong == "md5" else tarball.md5
    with pytest.raises(RuntimeError, match="wrong md5" if wrong == "md5" else "wrong size"):
        cifar10.download(tmp_path, server.url, size, md5)
    assert files_under(tmp_path) == []


def test_locate_downloads_into_the_cache_once(cache, server):
    assert cifar10.locate() == cache
    assert (cache / cifar10.FOLDER / "test_batch").is_file()
    assert cifar10.locate() == cache and server.hits == 1
    assert not [f for f in files_under(cache) if "part" in f or "extract" in f]


CHILD = """
import sys, time
from gnrepro import cifar10
cifar10.URL, cifar10.SIZE, cifar10.MD5 = sys.argv[1], int(sys.argv[2]), sys.argv[3]
start = time.time()
data = cifar10.load()
print(start, time.time(), cifar10.checksum(*data))
"""


def test_concurrent_locate_downloads_and_extracts_once(cache, server, tarball):
    server.delay = 1.5  # long enough that every child is waiting while the first downloads
    env = dict(os.environ, PYTHONPATH=str(REPO))
    children = [subprocess.Popen([sys.executable, "-W", "ignore", "-c", CHILD, server.url,
                                  str(tarball.size), tarball.md5], env=env, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(4)]
    outs = [c.communicate(timeout=120) for c in children]
    assert [c.returncode for c in children] == [0] * 4, [err for _, err in outs]
    starts, ends, sums = zip(*(out.split() for out, _ in outs))
    assert max(map(float, starts)) < min(map(float, ends)), "the children did not overlap"
    assert server.hits == 1
    assert len(set(sums)) == 1


# ---------------------------------------------------------------- not found

def test_offline_without_a_copy_says_where_it_looked_and_how_to_fix(cache, monkeypatch):
    monkeypatch.setattr(cifar10, "URL", closed_port_url())
    with pytest.raises(FileNotFoundError) as e:
        cifar10.locate()
    msg = str(e.value)
    for text in (str(cache), "$CIFAR10_DIR", "data_dir", "failed", "python -m gnrepro.cifar10 --download",
                 "--data-dir DIR", "CIFAR10_DIR=DIR", cifar10.MD5):
        assert text in msg
    assert not [f for f in files_under(cache) if f != ".cifar10.lock"]


def test_no_download_when_off_or_for_an_explicit_folder(cache, server, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="downloading is off"):
        cifar10.locate(download=False)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "mine")):
        cifar10.locate(tmp_path / "mine")
    monkeypatch.setenv("CIFAR10_DIR", str(tmp_path / "env"))
    with pytest.raises(FileNotFoundError, match=r"\$CIFAR10_DIR"):
        cifar10.locate()
    assert server.hits == 0


def test_cli_check_without_data_exits_with_the_fix(cache, capsys):
    with pytest.raises(SystemExit, match="python -m gnrepro.cifar10 --download"):
        cifar10.main(["--check"])


def test_cli_download_then_check(cache, tmp_path, capsys, cifar_dir):
    cifar10.main(["--download", str(tmp_path / "dl")])
    cifar10.main(["--check", str(tmp_path / "dl")])
    out = capsys.readouterr().out
    assert "train_images: 500" in out and "official_counts: False" in out
    assert out.count(cifar10.checksum(*cifar10.load(cifar_dir))) == 2


# ---------------------------------------------------------------- precedence

def test_data_dir_beats_cifar10_dir_beats_cache(tmp_path, monkeypatch):
    roots = {k: write_cifar_fixture(tmp_path / k, 50, 10, seed=s)
             for s, k in enumerate(["arg", "env", "keras/datasets"])}
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    monkeypatch.delenv("CIFAR10_DIR", raising=False)
    assert cifar10.locate() == roots["keras/datasets"]
    monkeypatch.setenv("CIFAR10_DIR", str(roots["env"]))
    assert cifar10.locate() == roots["env"]
    assert cifar10.locate(roots["arg"]) == roots["arg"]
    sums = {cifar10.checksum(*cifar10.load(r)) for r in roots.values()}
    assert len(sums) == 3 and cifar10.checksum(*cifar10.load(roots["arg"])) in sums


def test_cache_dir_follows_keras_home(monkeypatch, tmp_path):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    assert cifar10.cache_dir() == tmp_path / "datasets"
    monkeypatch.delenv("KERAS_HOME")
    assert cifar10.cache_dir() == Path.home() / ".keras" / "datasets"


# ---------------------------------------------------------------- safe extraction

def evil_member(kind, tmp_path):
    name = {"dotdot": "../evil", "nested_dotdot": "cifar-10-batches-py/../../evil",
            "absolute": str(tmp_path / "abs_evil")}.get(kind, "cifar-10-batches-py/data_batch_1")
    m = tarfile.TarInfo(name)
    if kind == "symlink":
        m.type, m.linkname = tarfile.SYMTYPE, "/etc/passwd"
    elif kind == "hardlink":
        m.type, m.linkname = tarfile.LNKTYPE, "../evil"
    elif kind == "device":
        m.type, m.devmajor, m.devminor = tarfile.CHRTYPE, 1, 3
    else:
        m.size = 4
    return m


@pytest.mark.parametrize("kind", ["dotdot", "nested_dotdot", "absolute", "symlink", "hardlink", "device"])
def test_unsafe_tarball_is_refused_and_writes_nothing(tmp_path, kind):
    root = tmp_path / "data"
    root.mkdir()
    with tarfile.open(root / cifar10.TARBALL, "w:gz") as t:
        good = tarfile.TarInfo("cifar-10-batches-py/readme.html")
        good.size = 2
        t.addfile(good, io.BytesIO(b"hi"))
        member = evil_member(kind, tmp_path)
        t.addfile(member, io.BytesIO(b"evil") if member.isfile() else None)
    before = files_under(tmp_path)
    with pytest.raises(ValueError, match="refusing to extract"):
        cifar10.locate(root)
    assert files_under(tmp_path) == sorted(before + ["data/.cifar10.lock"])


def test_tarball_without_the_folder_is_refused(tmp_path):
    with tarfile.open(tmp_path / cifar10.TARBALL, "w:gz") as t:
        t.addfile(tarfile.TarInfo("something_else"), io.BytesIO(b""))
    with pytest.raises(ValueError, match="no cifar-10-batches-py"):
        cifar10.locate(tmp_path)
    assert files_under(tmp_path) == [".cifar10.lock", cifar10.TARBALL]


def test_truncated_tarball_is_a_clear_error(tmp_path, tarball):
    (tmp_path / cifar10.TARBALL).write_bytes(tarball.data[:5000])
    with pytest.raises(ValueError, match="not a readable tar.gz"):
        cifar10.locate(tmp_path)
    assert not (tmp_path / cifar10.FOLDER).exists()


# ---------------------------------------------------------------- restricted unpickler

@pytest.mark.parametrize("module, name", [("os", "system"), ("builtins", "eval"),
                                          ("numpy", "load"), ("__builtin__", "getattr")])
def test_unpickler_refuses_other_globals(tmp_path, module, name):
    marker = tmp_path / "pwned"
    payload = f"c{module}\n{name}\n(S'open({str(marker)!r}, \"w\")'\ntR.".encode()
    root = with_batch(tmp_path / "d", "data_batch_2", payload)
    with pytest.raises(ValueError, match=rf"data_batch_2.*{module}\.{name}"):
        cifar10.load(root)
    assert not marker.exists()


def py2_style(data):
    """A protocol-3 pickle rewritten as Python 2 wrote the official files: str, not bytes."""
    import pickletools
    out = bytearray(data)
    out[1] = 2
    swap = {"SHORT_BINBYTES": b"U", "BINBYTES": b"T", "BINUNICODE": b"T"}
    for op, _, pos in pickletools.genops(data):
        if op.name in swap:
            out[pos:pos + 1] = swap[op.name]
    return bytes(out)


@pytest.mark.parametrize("style", ["fixture", "numpy2", "python2"])
def test_unpickler_loads_official_style_files(tmp_path, style):
    obj = fixture_dict("data_batch_4")
    raw = {"fixture": dumps(obj), "numpy2": pickle.dumps(obj, protocol=4),
           "python2": py2_style(dumps(obj))}[style]
    path = with_batch(tmp_path, "data_batch_4", raw) / cifar10.FOLDER / "data_batch_4"
    data, labels = cifar10.read_batch(path)
    np.testing.assert_array_equal(data, obj[b"data"])
    np.testing.assert_array_equal(labels, obj[b"labels"])
    assert labels.dtype == np.int64


# ---------------------------------------------------------------- validation

def broken(what):
    obj = fixture_dict("data_batch_3")
    if what == "not a dict":
        return [obj]
    if what == "shape":
        obj[b"data"] = obj[b"data"][:, :3071]
    elif what == "dtype":
        obj[b"data"] = obj[b"data"].astype(np.int64)
    elif what == "label 10":
        obj[b"labels"][5] = 10
    elif what == "label -1":
        obj[b"labels"][0] = -1
    elif what == "float labels":
        obj[b"labels"] = [float(v) for v in obj[b"labels"]]
    elif what == "no labels":
        del obj[b"labels"]
    elif what == "no data":
        del obj[b"data"]
    elif what == "length":
        obj[b"labels"] = obj[b"labels"][:-1]
    return obj


@pytest.mark.parametrize("what, message", [
    ("not a dict", "expected a dict"), ("shape", r"shape \(k, 3072\)"), ("dtype", "uint8"),
    ("label 10", r"0\.\.9"), ("label -1", r"0\.\.9"), ("float labels", "list of ints"),
    ("no labels", "b'labels'"), ("no data", "b'data'"), ("length", "99 labels for 100 images")])
def test_bad_batch_is_a_value_error_naming_the_file(tmp_path, what, message):
    root = with_batch(tmp_path, "data_batch_3", broken(what))
    with pytest.raises(ValueError, match=rf"data_batch_3.*{message}"):
        cifar10.load(root)


def test_truncated_or_missing_file(tmp_path):
    root = with_batch(tmp_path, "test_batch", dumps(fixture_dict("test_batch"))[:1000])
    with pytest.raises(ValueError, match="test_batch"):
        cifar10.load(root)
    (root / cifar10.FOLDER / "data_batch_5").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_5 is missing"):
        cifar10.load(root)


def test_load_shapes_order_and_subset_warning(cifar_dir):
    with pytest.warns(cifar10.SubsetWarning, match="500 training and 100 test"):
        x, y, xt, yt = cifar10.load(cifar_dir)
    assert (x.shape, x.dtype, y.shape, y.dtype) == ((500, 32, 32, 3), np.uint8, (500,), np.int64)
    assert (xt.shape, yt.shape) == ((100, 32, 32, 3), (100,))
    first = fixture_dict("data_batch_1")
    # Pixel (row 3, column 7) of image 0 is at offsets 3*32+7 of the R, G and B planes.
    np.testing.assert_array_equal(x[0, 3, 7], first[b"data"][0, [103, 1127, 2151]])
    assert y[:10].tolist() == first[b"labels"][:10]


def test_checksum():
    a, b = np.arange(12, dtype=np.uint8).reshape(3, 4), np.arange(3)
    assert cifar10.checksum(a, b) == hashlib.sha256(a.tobytes() + b.tobytes()).hexdigest()
    c = a.copy()
    c[2, 3] ^= 1
    assert cifar10.checksum(c, b) != cifar10.checksum(a, b)
    assert cifar10.checksum(a.T) == hashlib.sha256(np.ascontiguousarray(a.T).tobytes()).hexdigest()


# ---------------------------------------------------------------- subset, mean

def test_balanced_subset_takes_the_first_of_each_class_in_file_order():
    y = np.random.default_rng(0).integers(0, 10, 400)
    x = np.arange(400)
    xs, ys = cifar10.balanced_subset(x, y, 60)
    assert np.bincount(ys, minlength=10).tolist() == [6] * 10
    want = np.sort(np.concatenate([np.flatnonzero(y == c)[:6] for c in range(10)]))
    np.testing.assert_array_equal(xs, want)
    np.testing.assert_array_equal(ys, y[want])


@pytest.mark.parametrize("k, message", [(0, "positive multiple"), (-10, "positive multiple"),
                                        (15, "positive multiple"), (10.0, "positive multiple"),
                                        (1000, "only")])
def test_balanced_subset_errors_name_the_option(k, message):
    y = np.arange(500) % 10
    with pytest.raises(ValueError, match=f"--train-images.*{message}"):
        cifar10.balanced_subset(np.zeros(500), y, k)


def test_pixel_mean_against_numpy():
    x = np.random.default_rng(1).integers(0, 256, (37, 32, 32, 3), dtype=np.uint8)
    m = cifar10.pixel_mean(x)
    assert m.dtype == np.float32 and m.shape == (32, 32, 3)
    np.testing.assert_allclose(m, (x.astype(np.float64) / 255).mean(0), rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match=r"\(n, 32, 32, 3\)"):
        cifar10.pixel_mean(x[:, :, :, :1])


# ---------------------------------------------------------------- pipelines

N = 250  # image i is the constant i + 1: its identity survives any crop and flip


def constant_images():
    x = np.broadcast_to((np.arange(N) + 1).astype(np.uint8)[:, None, None, None], (N, 32, 32, 3))
    return np.ascontiguousarray(x), np.arange(N) % 10


def train_batches(x, y, mean, batch_size, seed, epoch, skip_batches=0):
    return cifar10.TrainBatches(cifar10.padded(x, mean), y, batch_size, seed, epoch, skip_batches)


def epoch(batches):
    xs, ys = zip(*[batches[i] for i in range(len(batches))])
    return np.concatenate(xs), np.concatenate(ys)


def identities(images):
    return np.rint(images.max(axis=(1, 2, 3)) * 255).astype(int) - 1


def test_train_epoch_is_the_seeded_permutation_once_each():
    x, y = constant_images()
    imgs, labels = epoch(train_batches(x, y, np.zeros((32, 32, 3), np.float32), 8, 3, 5))
    assert imgs.shape == (248, 32, 32, 3) and imgs.dtype == np.float32 and labels.dtype == np.int32
    ids = identities(imgs)
    np.testing.assert_array_equal(ids, np.random.default_rng([3, 5]).permutation(N)[:248])
    assert len(set(ids)) == 248
    np.testing.assert_array_equal(labels, y[ids])


def test_train_same_seed_and_epoch_same_batches_else_different(cifar_dir):
    x, y, _, _ = cifar10.load(cifar_dir)
    mean = cifar10.pixel_mean(x)
    a, b = (epoch(train_batches(x, y, mean, 16, 0, 1)) for _ in range(2))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    xc, yc = constant_images()
    zero = np.zeros((32, 32, 3), np.float32)
    orders = [identities(epoch(train_batches(xc, yc, zero, 10, s, e))[0]) for s, e in
              [(0, 1), (0, 2), (1, 1)]]
    assert (orders[0] != orders[1]).mean() > 0.9 and (orders[0] != orders[2]).mean() > 0.9


def test_skip_batches_is_the_tail_of_the_epoch(cifar_dir):
    x, y, _, _ = cifar10.load(cifar_dir)
    mean = cifar10.pixel_mean(x)
    full = train_batches(x, y, mean, 32, 7, 2)
    tail = train_batches(x, y, mean, 32, 7, 2, skip_batches=5)
    assert len(full) == cifar10.steps_per_epoch(500, 32) == 15 and len(tail) == 10
    for i in range(10):
        for a, b in zip(full[5 + i], tail[i]):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(IndexError):
        tail[10]
    with pytest.raises(ValueError, match="skip_batches"):
        train_batches(x, y, mean, 32, 7, 2, skip_batches=16)


def test_crops_stay_in_the_padded_image():
    x, y = constant_images()
    imgs, _ = epoch(train_batches(x, y, np.zeros((32, 32, 3), np.float32), 25, 0, 0))
    shifts = set()
    for img, i in zip(imgs, identities(imgs)):
        inside = img[..., 0] != 0
        rows, cols = np.flatnonzero(inside.any(1)), np.flatnonzero(inside.any(0))
        # The image part is one rectangle of the constant, the rest is padding zeros.
        assert inside.sum() == len(rows) * len(cols) and np.all(img[inside] == np.float32((i + 1) / 255))
        assert len(rows) >= 32 - cifar10.PAD and len(cols) >= 32 - cifar10.PAD
        assert rows[0] == 0 or rows[-1] == 31
        assert cols[0] == 0 or cols[-1] == 31
        shifts.add((32 - len(rows), 32 - len(cols)))
    assert {r for r, _ in shifts} == {c for _, c in shifts} == set(range(5))


def test_augmentation_matches_a_numpy_reference(cifar_dir):
    x, y, _, _ = cifar10.load(cifar_dir)
    mean = cifar10.pixel_mean(x)
    imgs, labels = epoch(train_batches(x, y, mean, 50, 4, 9))
    order = np.random.default_rng([4, 9]).permutation(500)
    rows, cols, flips = cifar10.augmentation_draws(500, 4, 9)
    padded = np.pad(x / 255 - mean, [(0, 0), (4, 4), (4, 4), (0, 0)])
    for p in range(0, 500, 7):
        want = padded[order[p], rows[p]:rows[p] + 32, cols[p]:cols[p] + 32]
        np.testing.assert_allclose(imgs[p], want[:, ::-1] if flips[p] else want, atol=1e-6)
    assert labels.tolist() == y[order].tolist()
    assert 0.4 < flips.mean() < 0.6 and set(rows) == set(cols) == set(range(9))


def test_flips_happen_about_half_the_time():
    x = np.broadcast_to(np.arange(1, 33, dtype=np.uint8)[None, None, :, None], (N, 32, 32, 3))
    imgs, _ = epoch(train_batches(x, np.zeros(N, int), np.zeros((32, 32, 3), np.float32), 50, 0, 0))
    row = imgs[:, 16, 8:24, 0]  # always inside the image, whatever the crop
    increasing, decreasing = np.all(np.diff(row) > 0, 1), np.all(np.diff(row) < 0, 1)
    assert np.all(increasing ^ decreasing)
    assert 0.4 < decreasing.mean() < 0.6


def test_test_inputs_are_in_order_and_unaugmented(cifar_dir):
    x, y, xt, yt = cifar10.load(cifar_dir)
    mean = cifar10.pixel_mean(x)
    imgs = cifar10.test_inputs(xt, mean)
    np.testing.assert_allclose(imgs, xt / 255 - mean, atol=1e-6)
    assert imgs.dtype == np.float32 and imgs.shape == xt.shape


# ---------------------------------------------------------------- real images

def test_jpeg_copy_loads_balanced(jpeg_cifar_dir):
    with pytest.warns(cifar10.SubsetWarning):
        x, y, xt, yt = cifar10.load(jpeg_cifar_dir)
    assert x.shape == (5000, 32, 32, 3) and xt.shape == (1000, 32, 32, 3)
    assert np.bincount(y, minlength=10).tolist() == [500] * 10
    assert np.bincount(yt, minlength=10).tolist() == [100] * 10
    # Natural images, not noise: neighbouring pixels are strongly correlated.
    a = x[:, :, :-1].astype(float).ravel()
    assert np.corrcoef(a, x[:, :, 1:].astype(float).ravel())[0, 1] > 0.8


def test_only_the_official_files_are_official(tmp_path, monkeypatch):
    """A run record's data.official: every batch file's md5 that of the official release
    (torchvision's list), not the image counts: a re-encoded copy with the official counts,
    such as the JPEG one, is not official."""
    root = write_cifar_fixture(tmp_path / "copy", n_train=50, n_test=10)
    folder = root / cifar10.FOLDER
    assert not cifar10.is_official(folder) and not cifar10.prepare_data(root).official
    md5s = {name: hashlib.md5((folder / name).read_bytes()).hexdigest()
            for name in cifar10.OFFICIAL_MD5}
    monkeypatch.setattr(cifar10, "OFFICIAL_MD5", md5s)   # as if these were the official files
    assert cifar10.is_official(folder) and cifar10.prepare_data(root).official
    (folder / "test_batch").write_bytes((folder / "test_batch").read_bytes() + b"\0")
    assert not cifar10.is_official(folder)   # one byte more in one file: not official
