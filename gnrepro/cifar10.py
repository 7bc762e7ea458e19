"""CIFAR-10: find or fetch the official python release, load it safely, and feed it
to Keras with He et al.'s preprocessing and augmentation, on every Keras backend.

    python -m gnrepro.cifar10 --download [DIR]   # on a machine with network: fetch + extract
                                         # (DIR default: $CIFAR10_DIR, else the Keras cache)
    python -m gnrepro.cifar10 --check [DIR]      # load, validate, print counts and sha256

Where the data is looked for, in order: the `data_dir` argument (train.py's --data-dir),
$CIFAR10_DIR, the Keras cache ($KERAS_HOME/datasets or ~/.keras/datasets). Each is a
folder holding cifar-10-batches-py/ or cifar-10-python.tar.gz (extracted in place).
Only the cache is ever downloaded into. Writes nothing but that folder's contents
(the tarball, cifar-10-batches-py/, a .cifar10.lock file).

Everything random about an epoch (order, crops, flips) is drawn on the host in NumPy from
(seed, epoch), so TensorFlow, JAX and PyTorch train on the same batches. This file needs
NumPy only: fetching and checking the data on a login node needs no Keras or TensorFlow.
"""
import argparse
import contextlib
import functools
import fcntl
import hashlib
import os
import pickle
import shutil
import sys
import tarfile
import tempfile
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
SIZE = 170498071  # bytes
MD5 = "c58f30108f718f92721af3b95e74349a"
TARBALL = "cifar-10-python.tar.gz"
FOLDER = "cifar-10-batches-py"
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_FILE = "test_batch"
OFFICIAL_COUNTS = (50000, 10000)  # training, test images
# md5 of each batch file of the official release, as extracted from the tarball (the reference
# torchvision checks too): a copy is the official data only if every file matches, so a
# re-encoded copy (a JPEG round trip, say) with the official counts is not.
OFFICIAL_MD5 = {"data_batch_1": "c99cafc152244af753f735de768cd75f",
                "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
                "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
                "data_batch_4": "634d18415352ddfa80567beed471001a",
                "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
                "test_batch": "40351d587109b95175f43aff81a1287e"}
PAD = 4  # pixels of zero padding before the random 32x32 crop (He et al. 2015, 4.2)
SIDE = 32  # image side
CROPS = 2 * PAD + 1  # crop offsets 0..8 along each axis


class SubsetWarning(UserWarning):
    """load() found fewer images than the official release (a test fixture, a subset)."""


# ---------------------------------------------------------------- where the data is

def cache_dir():
    """Keras' dataset cache: $KERAS_HOME/datasets, else ~/.keras/datasets."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return Path(home) / "datasets"


def locate(data_dir=None, download=True):
    """The folder holding cifar-10-batches-py/, extracting or (cache only) downloading it."""
    if data_dir is not None:
        root, where = Path(data_dir), "the data_dir argument (--data-dir)"
    elif os.environ.get("CIFAR10_DIR"):
        root, where = Path(os.environ["CIFAR10_DIR"]), "$CIFAR10_DIR"
    else:
        root, where = cache_dir(), "the Keras cache ($KERAS_HOME/datasets or ~/.keras/datasets)"
    if (root / FOLDER).is_dir():  # extraction is atomic, so a present folder is complete
        return root
    is_cache = data_dir is None and not os.environ.get("CIFAR10_DIR")
    if not (root / TARBALL).is_file() and not (is_cache and download):
        raise _not_found(root, where, "downloading is off" if is_cache else None)
    # One process per folder fetches and extracts; the others wait, then find it done.
    with _locked(root):
        if not (root / FOLDER).is_dir():
            if not (root / TARBALL).is_file():
                try:
                    _download(root, URL, SIZE, MD5)  # module globals read now: tests repoint them
                except OSError as e:  # offline, DNS, HTTP error: say how to fix it
                    raise _not_found(root, where, f"downloading {URL} failed: {e}") from e
            extract(root / TARBALL, root)
    return root


def require(data_dir=None):
    """locate(data_dir), or exit with its message and status 1, without a traceback: what
    the runners (sweep.py, train.py) ask once, before any run or backend starts."""
    try:
        return locate(data_dir)
    except (OSError, RuntimeError, ValueError) as e:   # not found, download or tarball failed
        raise SystemExit(f"error: {e}") from None


def _not_found(root, where, why):
    lines = [f"CIFAR-10 not found: no {FOLDER}/ or {TARBALL} in {root} ({where}).",
             "Looked, in order, at: --data-dir (the data_dir argument), $CIFAR10_DIR, the Keras "
             f"cache ({cache_dir()}); the first one set is used."]
    if why:
        lines.append(f"The cache is filled automatically, but {why}.")
    lines += ["Fix, one of:",
              "  python -m gnrepro.cifar10 --download          # on a machine with network (a login node):"
              f" fills {cache_dir()}",
              "  python -m gnrepro.cifar10 --download DIR      # then run with --data-dir DIR or CIFAR10_DIR=DIR",
              f"  or copy {TARBALL} ({URL}, md5 {MD5}) into {root}"]
    return FileNotFoundError("\n".join(lines))


@contextlib.contextmanager
def _locked(folder):
    # flock, not a create-exclusive file: the kernel drops it if the holder dies.
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".cifar10.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def download(dest_dir, url=URL, size=SIZE, md5=MD5):
    """Fetch url to dest_dir/cifar-10-python.tar.gz, checked against size and md5."""
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    return _download(dest_dir, url, size, md5)


def _download(dest_dir, url, size, md5):
    print(f"downloading {url} ({size / 1e6:.0f} MB) to {dest_dir}", file=sys.stderr)
    fd, tmp = tempfile.mkstemp(dir=dest_dir, prefix=".cifar-10-python.", suffix=".part")
    try:
        digest, got = hashlib.md5(), 0
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
            while chunk := resp.read(1 << 20):
                got += len(chunk)
                if got > size:
                    break  # a wrong file: stop reading, the check below names it
                digest.update(chunk)
                out.write(chunk)
        if got != size:
            raise RuntimeError(f"download of {url} has the wrong size: {'more than ' if got > size else ''}"
                               f"{got} bytes, expected {size}; nothing was kept in {dest_dir}")
        if digest.hexdigest() != md5:
            raise RuntimeError(f"download of {url} has the wrong md5 {digest.hexdigest()}, expected {md5} "
                               f"(corrupted or tampered with); nothing was kept in {dest_dir}")
        os.replace(tmp, dest_dir / TARBALL)  # atomic: a tarball that exists is a checked one
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return dest_dir / TARBALL


def extract(tarball, root):
    """Unpack tarball's cifar-10-batches-py/ into root, refusing anything unsafe."""
    root = Path(root).resolve()
    with _open_tar(tarball) as tar:
        members = tar.getmembers()
        for m in members:  # check everything before writing anything
            _check_member(m, root, tarball)
        # Unpack beside the target, then rename: an interrupted run leaves no half folder.
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=".cifar-extract-"))
        try:
            tar.extractall(tmp, members=members, filter="data")
            if not (tmp / FOLDER).is_dir():
                raise ValueError(f"{tarball} holds no {FOLDER}/ folder: not the CIFAR-10 python release")
            os.replace(tmp / FOLDER, root / FOLDER)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return root / FOLDER


def _open_tar(tarball):
    tar = None
    try:
        tar = tarfile.open(tarball, "r:*")
        tar.getmembers()  # reads the whole archive: a truncated file fails here
        return tar
    except (tarfile.TarError, EOFError, OSError) as e:
        if tar is not None:
            tar.close()
        raise ValueError(f"{tarball} is not a readable tar.gz ({e}): delete it and fetch it again "
                         "(python -m gnrepro.cifar10 --download)") from e


def _check_member(m, root, tarball):
    if not (m.isfile() or m.isdir()):
        kind = "link" if (m.issym() or m.islnk()) else "device or special file"
        raise ValueError(f"refusing to extract {tarball}: member {m.name!r} is a {kind}")
    target = (root / m.name).resolve()
    if os.path.isabs(m.name) or not target.is_relative_to(root):
        raise ValueError(f"refusing to extract {tarball}: member {m.name!r} would land outside {root}")


# ---------------------------------------------------------------- reading the files

def _allowed_globals():
    # The only globals a CIFAR-10 batch needs: numpy's array reconstruction, under
    # numpy 1.x's name (the official files) and numpy 2.x's.
    reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]
    return {("numpy.core.multiarray", "_reconstruct"): reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): reconstruct,
            ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, bytes, ints and numpy arrays; refuses any other global."""

    def find_class(self, module, name):
        obj = _allowed_globals().get((module, name))
        if obj is None:
            raise pickle.UnpicklingError(f"it names the global {module}.{name}, which is not allowed "
                                         "(a CIFAR-10 batch needs only numpy arrays)")
        return obj


def read_batch(path):
    """(data uint8 (k, 3072), labels int64 (k,)) of one batch file, validated."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the folder is incomplete; delete "
                                f"{path.parent} and fetch again (python -m gnrepro.cifar10 --download)")
    try:
        with open(path, "rb") as f:
            obj = _RestrictedUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise ValueError(f"{path} is not a valid CIFAR-10 batch: {e}") from e
    return _validate(obj, path)


def _validate(obj, path):
    def bad(what):
        return ValueError(f"{path} is not a valid CIFAR-10 batch: {what}")
    if not isinstance(obj, dict):
        raise bad(f"expected a dict, got {type(obj).__name__}")
    for key in (b"data", b"labels"):
        if key not in obj:
            raise bad(f"no {key!r} entry (keys: {sorted(obj)})")
    data = obj[b"data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
        raise bad(f"b'data' should be a uint8 array, got {getattr(data, 'dtype', type(data).__name__)}")
    if data.ndim != 2 or data.shape[1] != 3072:
        raise bad(f"b'data' should have shape (k, 3072), got {data.shape}")
    labels = np.asarray(obj[b"labels"])
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise bad(f"b'labels' should be a list of ints, got {labels.dtype} of shape {labels.shape}")
    if len(labels) != len(data):
        raise bad(f"{len(labels)} labels for {len(data)} images")
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise bad(f"labels should lie in 0..9, found {labels.min()}..{labels.max()}")
    return data, labels.astype(np.int64)


def load(data_dir=None, download=True):
    """x_train uint8 (n,32,32,3), y_train int64 (n,), x_test, y_test."""
    folder = locate(data_dir, download) / FOLDER
    train = [read_batch(folder / name) for name in TRAIN_FILES]
    x_test, y_test = read_batch(folder / TEST_FILE)
    x_train = np.concatenate([d for d, _ in train])
    y_train = np.concatenate([y for _, y in train])
    if (len(x_train), len(x_test)) != OFFICIAL_COUNTS:
        warnings.warn(SubsetWarning(
            f"{folder} holds {len(x_train)} training and {len(x_test)} test images, not the official "
            f"{OFFICIAL_COUNTS[0]} + {OFFICIAL_COUNTS[1]}: a subset or a test fixture"), stacklevel=2)
    return _nhwc(x_train), y_train, _nhwc(x_test), y_test


def _nhwc(data):
    # The files store each image as R, G, B planes of 32x32, row-major.
    return np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


def is_official(folder):
    """Whether folder (a cifar-10-batches-py/) holds the official release: every batch file's
    md5 is OFFICIAL_MD5's."""
    for name, md5 in OFFICIAL_MD5.items():
        digest = hashlib.md5()
        with open(Path(folder) / name, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        if digest.hexdigest() != md5:
            return False
    return True


def checksum(*arrays):
    """sha256 hex over the arrays' bytes, in order (provenance of a run's data)."""
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).data)
    return h.hexdigest()


def describe(x_train, y_train, x_test, y_test):
    """What a run record should say about its data: counts, sha256."""
    return {"train_images": int(len(x_train)), "test_images": int(len(x_test)),
            "train_per_class": np.bincount(y_train, minlength=10).tolist(),
            "official_counts": (len(x_train), len(x_test)) == OFFICIAL_COUNTS,
            "sha256": checksum(x_train, y_train, x_test, y_test)}


# ---------------------------------------------------------------- preprocessing

def balanced_subset(x, y, k):
    """The first k/10 images of each class, kept in file order."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0 or k % 10:
        raise ValueError(f"--train-images must be a positive multiple of 10, got {k!r}")
    per_class = k // 10
    keep = []
    for c in range(10):
        idx = np.flatnonzero(y == c)
        if len(idx) < per_class:
            raise ValueError(f"--train-images {k} needs {per_class} images of class {c}, "
                             f"but there are only {len(idx)}")
        keep.append(idx[:per_class])
    keep = np.sort(np.concatenate(keep))
    return x[keep], y[keep]


def pixel_mean(x_uint8):
    """float32 (32,32,3): the per-pixel mean of x/255 over the given images."""
    if x_uint8.ndim != 4 or x_uint8.shape[1:] != (32, 32, 3) or not len(x_uint8):
        raise ValueError(f"pixel_mean needs images of shape (n, 32, 32, 3), got {x_uint8.shape}")
    # dtype=float64 accumulates without a float copy of the whole set (1.2 GB for 50k).
    return (x_uint8.mean(axis=0, dtype=np.float64) / 255).astype(np.float32)


def steps_per_epoch(n, batch_size):
    return n // batch_size


def epoch_order(n, seed, epoch):
    """The epoch's image order: depends on (seed, epoch) only, so a resumed run sees it again."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def augmentation_draws(n, seed, epoch):
    """(row, column, flip), int32 (n,) each: the crop's offset in the padded image and
    the mirror bit for each position in the epoch."""
    # One draw per position, on the host from (seed, epoch) alone: batch size, skip_batches,
    # the backend and the device cannot change it.
    d = np.random.default_rng([seed, epoch, 1]).integers(0, CROPS * CROPS * 2, n, dtype=np.int32)
    return d // (2 * CROPS), d // 2 % CROPS, d % 2


def epoch_draws(n, seed, epoch):
    """(order, rows, cols, flips): everything random about one epoch."""
    return (epoch_order(n, seed, epoch), *augmentation_draws(n, seed, epoch))


def normalize(x_uint8, mean):
    """float32 x/255 - mean (He et al.'s per-pixel mean subtraction)."""
    return x_uint8.astype(np.float32) / np.float32(255) - mean


def padded(x_uint8, mean):
    """float32 (n, 40, 40, 3): the normalized images with PAD zeros around (zeros after
    centring, as the crop reads them). Made once per run: batches are slices of it."""
    out = np.zeros((len(x_uint8), SIDE + 2 * PAD, SIDE + 2 * PAD, x_uint8.shape[-1]), np.float32)
    for i in range(0, len(x_uint8), 5000):   # in parts: no float64 or float32 full-size temporary
        out[i:i + 5000, PAD:-PAD, PAD:-PAD] = normalize(x_uint8[i:i + 5000], mean)
    return out


def crop_batch(padded_images, index, rows, cols, flips):
    """The (b, 32, 32, c) crops of padded_images[index] at (rows, cols), mirrored where flips."""
    span = np.arange(SIDE)
    r = rows[:, None] + span                                   # (b, 32): rows read
    c = cols[:, None] + span
    c = np.where(flips[:, None] == 1, c[:, ::-1], c)          # mirror = read backwards
    return padded_images[index[:, None, None], r[:, :, None], c[:, None, :]]


class TrainBatches:
    """One augmented epoch as a sequence of (float32 (b,32,32,3), int32 (b,)) NumPy batches,
    the same on every backend, reproducible: batch i depends on (seed, epoch, i) only.

    padded_images: padded(x, mean), made once per run; skip_batches: start mid-epoch
    (a resumed run), the remaining batches being the tail of the full epoch.
    """

    def __init__(self, padded_images, y, batch_size, seed, epoch, skip_batches=0):
        n, steps = len(y), steps_per_epoch(len(y), batch_size)
        if batch_size < 1 or steps < 1:
            raise ValueError(f"batch_size {batch_size} should be in 1..{n} (the number of images)")
        if not 0 <= skip_batches <= steps:
            raise ValueError(f"skip_batches {skip_batches} should be in 0..{steps} (batches per epoch)")
        self.images, self.labels = padded_images, np.asarray(y, np.int32)
        self.batch_size, self.skip, self.steps = batch_size, skip_batches, steps
        self.draws = epoch_draws(n, seed, epoch)

    def __len__(self):
        return self.steps - self.skip

    def __getitem__(self, i):
        if not 0 <= i < len(self):
            raise IndexError(i)
        pos = np.arange((self.skip + i) * self.batch_size, (self.skip + i + 1) * self.batch_size)
        order, rows, cols, flips = (a[pos] for a in self.draws)
        return crop_batch(self.images, order, rows, cols, flips), self.labels[order]


def test_inputs(x, mean):
    """x/255 - mean, in file order, unaugmented: what evaluation predicts on."""
    return normalize(x, mean)


# ---------------------------------------------------------------- the data of a run

@dataclass
class Data:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    mean: np.ndarray        # per-pixel mean of the training images used (He et al.)
    checksum: str           # sha256 of the whole data set as read, before any subset
    source: str
    official: bool          # the official release, file for file (is_official)

    @functools.cached_property
    def padded(self):
        """The training images normalized and zero-padded, float32 (n, 40, 40, 3): the
        batches of every epoch are crops of it (TrainBatches, backends.ScanLoop)."""
        return padded(self.x_train, self.mean)

    @functools.cached_property
    def test_inputs(self):
        return test_inputs(self.x_test, self.mean)


def prepare_data(data_dir=None, train_images=None, test_images=None):
    """The data of a run: CIFAR-10 from data_dir (see locate), class-balanced subsets of
    train_images and test_images (None: all), the per-pixel mean of the training images
    used, and the checksum of the whole set as read (train.py and reproduce.py alike)."""
    root = locate(data_dir)
    with warnings.catch_warnings():   # a subset is fine here: the run record says so
        warnings.simplefilter("ignore", SubsetWarning)
        x_train, y_train, x_test, y_test = load(root)
    official = is_official(root / FOLDER)
    digest = checksum(x_train, y_train, x_test, y_test)
    if train_images:
        x_train, y_train = balanced_subset(x_train, y_train, train_images)
    if test_images:
        x_test, y_test = balanced_subset(x_test, y_test, test_images)
    return Data(x_train, y_train, x_test, y_test, pixel_mean(x_train), digest,
                str(root), official)


# ---------------------------------------------------------------- command line

def fetch(root):
    """Download (if absent) and extract CIFAR-10 into root; what --download does."""
    root = Path(root)
    with _locked(root):
        if not (root / FOLDER).is_dir():
            if not (root / TARBALL).is_file():
                _download(root, URL, SIZE, MD5)
            extract(root / TARBALL, root)
    return root


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--download", nargs="?", const="", metavar="DIR",
                      help="fetch and extract into DIR (default: $CIFAR10_DIR, else the Keras cache)")
    what.add_argument("--check", nargs="?", const="", metavar="DIR",
                      help="load and validate the copy in DIR (default: where train.py looks)")
    args = ap.parse_args(argv)
    try:
        if args.download is not None:
            root = fetch(args.download or os.environ.get("CIFAR10_DIR") or cache_dir())
            print(f"CIFAR-10 is in {root / FOLDER}")
        else:
            root = args.check or None
        data = load(root, download=False)
        for key, value in describe(*data).items():
            print(f"{key}: {value}")
        print(f"official: {is_official(locate(root, download=False) / FOLDER)} (every file's md5 "
              f"that of the official release)")
    except (OSError, RuntimeError, ValueError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
