"""MNIST from its original IDX files, read with NumPy.

Where the four files come from, in order:

1. ``data_dir`` when given (any folder with the four IDX files, gzipped or
   not: MNIST, Fashion-MNIST, ...); nothing else is tried.
2. The cache folder, ``$JADAM_DATA`` or ``~/.cache/jadam/mnist``.
3. A download from the public mirrors, each file checked against the MD5 of its
   uncompressed bytes and written atomically into the cache.
4. Offline with nothing cached: the small real MNIST sample shipped in
   ``examples/mnist/data`` (CC BY-SA 3.0, see the README there), announced on
   stderr.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
import pathlib
import sys
import tempfile
import urllib.request
import zlib
from collections.abc import Callable, Iterator, Sequence

import numpy as np

SPLITS = ("train", "test")
# (split, kind) -> file stem, as on the original distribution.
FILES = {
  ("train", "images"): "train-images-idx3-ubyte",
  ("train", "labels"): "train-labels-idx1-ubyte",
  ("test", "images"): "t10k-images-idx3-ubyte",
  ("test", "labels"): "t10k-labels-idx1-ubyte",
}
# MD5 of the uncompressed bytes of the full MNIST files.
MNIST_MD5 = {
  "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
  "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
  "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
  "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
MIRRORS = (
  "https://ossci-datasets.s3.amazonaws.com/mnist/",
  "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
SAMPLE_DIR = pathlib.Path(__file__).parent / "data"
# MD5 of the uncompressed bytes of the shipped sample (written by make_sample.py).
SAMPLE_MD5 = {
  "train-images-idx3-ubyte": "63a563d3843dba5073e604e3a7990e87",
  "train-labels-idx1-ubyte": "e6ef65212ddc6f9010e22d95b5269050",
  "t10k-images-idx3-ubyte": "014beca301477cb2e974ccd9bba2262c",
  "t10k-labels-idx1-ubyte": "a82723c4f1ffcf0f0a0d4d06f6c879a0",
}

# IDX type codes (http://yann.lecun.com/exdb/mnist/), all big-endian.
_IDX_DTYPES = {
  0x08: np.dtype(np.uint8),
  0x09: np.dtype(np.int8),
  0x0B: np.dtype(">i2"),
  0x0C: np.dtype(">i4"),
  0x0D: np.dtype(">f4"),
  0x0E: np.dtype(">f8"),
}


class IDXError(ValueError):
  """A file that is not a well-formed IDX file of the expected shape."""


class ChecksumError(ValueError):
  """Bytes whose MD5 is not the one expected."""


@dataclasses.dataclass(frozen=True)
class Dataset:
  """One split: ``images`` (N, 28, 28) uint8 and ``labels`` (N,) uint8."""

  images: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)

  def take(self, n: int | None) -> Dataset:
    return self if n is None else Dataset(self.images[:n], self.labels[:n])


@dataclasses.dataclass(frozen=True)
class Source:
  """The two splits and where they were read from."""

  train: Dataset
  test: Dataset
  origin: str  # "data_dir", "cache", "download" or "sample"
  path: pathlib.Path


# --------------------------------------------------------------------------- IDX


def _read_bytes(path: pathlib.Path) -> bytes:
  """The uncompressed bytes of ``path`` (gzip is detected by its magic)."""
  raw = path.read_bytes()
  if raw[:2] != b"\x1f\x8b":
    return raw
  try:
    return gzip.decompress(raw)
  except (OSError, EOFError, zlib.error) as e:
    raise IDXError(f"{path}: corrupt or truncated gzip data ({e})") from e


def parse_idx(data: bytes, name: str = "<bytes>") -> np.ndarray:
  """Parse the bytes of one IDX file into an array, checking its header.

  Args:
    data: The uncompressed bytes.
    name: What to call the file in error messages.

  Returns:
    An array of the shape and (native-endian) dtype that the header gives.

  Raises:
    IDXError: For a bad magic number, an unknown type code, or a payload that
      is shorter (truncated) or longer than the header says.
  """
  if len(data) < 4:
    raise IDXError(f"{name}: {len(data)} bytes, too short for an IDX header")
  zero, code, ndim = int.from_bytes(data[:2], "big"), data[2], data[3]
  if zero != 0 or code not in _IDX_DTYPES or ndim == 0:
    raise IDXError(
      f"{name}: bad IDX magic number 0x{data[:4].hex()} (expected 0x0000TTNN"
      " with a known type TT, e.g. 0x00000803 for images, 0x00000801 for labels)"
    )
  header = 4 + 4 * ndim
  if len(data) < header:
    raise IDXError(f"{name}: truncated IDX header ({len(data)} of {header} bytes)")
  shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
  dtype = _IDX_DTYPES[code]
  expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  if len(data) != expected:
    what = "truncated" if len(data) < expected else "has trailing bytes"
    raise IDXError(f"{name}: {what}: {len(data)} bytes, but its header {shape} needs {expected}")
  array = np.frombuffer(data, dtype, offset=header).reshape(shape)
  return array.astype(dtype.newbyteorder("="), copy=False)


def find_file(folder: pathlib.Path, stem: str) -> pathlib.Path | None:
  """``stem`` in ``folder``: gzipped or not, also with LeCun's ``.idx`` spelling."""
  alt = stem.replace("-idx", ".idx")
  for name in (f"{stem}.gz", stem, f"{alt}.gz", alt):
    if (folder / name).is_file():
      return folder / name
  return None


def read_split(folder: pathlib.Path, split: str, md5: dict[str, str] | None = None) -> Dataset:
  """Read and check one split from ``folder``.

  Args:
    folder: A folder with the IDX files of ``split``.
    split: ``"train"`` or ``"test"``.
    md5: If given, the MD5 of each file's uncompressed bytes, by stem.

  Raises:
    FileNotFoundError: For a missing file.
    IDXError: For a malformed file, or images and labels that disagree.
    ChecksumError: For a file whose MD5 is not the one in ``md5``.
  """
  arrays = {}
  for kind in ("images", "labels"):
    stem = FILES[(split, kind)]
    path = find_file(folder, stem)
    if path is None:
      raise FileNotFoundError(f"{folder}: no {stem}[.gz]")
    data = _read_bytes(path)
    if md5 is not None:
      _check_md5(data, md5[stem], str(path))
    array = parse_idx(data, str(path))
    if array.dtype != np.uint8:
      raise IDXError(f"{path}: type {array.dtype}, expected unsigned bytes")
    want = 3 if kind == "images" else 1
    if array.ndim != want:
      raise IDXError(f"{path}: {array.ndim}-d array {array.shape}, expected {want}-d")
    if kind == "images" and array.shape[1:] != (28, 28):
      raise IDXError(f"{path}: images of {array.shape[1:]}, expected (28, 28)")
    arrays[kind] = (path, array)
  (ipath, images), (lpath, labels) = arrays["images"], arrays["labels"]
  if len(images) != len(labels):
    raise IDXError(f"{ipath} has {len(images)} images but {lpath} {len(labels)} labels")
  if labels.size and labels.max() > 9:
    raise IDXError(f"{lpath}: label {labels.max()} out of range 0..9")
  return Dataset(images, labels)


# ----------------------------------------------------------------- where from


def _check_md5(data: bytes, expected: str, name: str) -> None:
  got = hashlib.md5(data).hexdigest()
  if got != expected:
    raise ChecksumError(f"{name}: MD5 {got} of the uncompressed bytes, expected {expected}")


def cache_dir() -> pathlib.Path:
  """``$JADAM_DATA`` if set, else ``~/.cache/jadam/mnist``."""
  env = os.environ.get("JADAM_DATA")
  return pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "jadam" / "mnist"


def fetch(url: str, timeout: float = 20.0) -> bytes:
  """The bytes at ``url`` (tests replace this function)."""
  with urllib.request.urlopen(url, timeout=timeout) as response:
    return response.read()


def download(
  stem: str,
  folder: pathlib.Path,
  *,
  md5: str,
  mirrors: Sequence[str] = MIRRORS,
  fetch_fn: Callable[[str], bytes] | None = None,
  unreachable: set[str] | None = None,
) -> pathlib.Path:
  """Download ``stem.gz`` into ``folder``, verified, written atomically.

  Each mirror is tried in turn; a download whose uncompressed bytes do not have
  MD5 ``md5`` is rejected. The file is written to a temporary file in
  ``folder`` and renamed into place, so an interrupted or rejected download
  leaves nothing under the final name and no temporary file behind.

  Args:
    unreachable: Mirrors to skip; a mirror that cannot be reached (a network
      error, not a bad file) is added to it, so that offline the next files
      do not wait for it again.

  Raises:
    OSError: When no mirror gave a verified file (the message lists why).
  """
  fetch_fn = fetch_fn or fetch
  unreachable = set() if unreachable is None else unreachable
  errors = []
  for mirror in mirrors:
    url = f"{mirror}{stem}.gz"
    if mirror in unreachable:
      errors.append(f"{url}: skipped, unreachable")
      continue
    try:
      raw = fetch_fn(url)
    except OSError as e:  # URLError, timeouts, refused connections
      unreachable.add(mirror)
      errors.append(f"{url}: {type(e).__name__}: {e}")
      continue
    try:
      data = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
      _check_md5(data, md5, url)
    except Exception as e:  # noqa: BLE001 - try the next mirror, report all
      errors.append(f"{url}: {type(e).__name__}: {e}")
      continue
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{stem}.gz"
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{stem}.", suffix=".part")
    try:
      with os.fdopen(fd, "wb") as f:
        f.write(raw if raw[:2] == b"\x1f\x8b" else gzip.compress(data, mtime=0))
      os.replace(tmp, target)
    except BaseException:
      pathlib.Path(tmp).unlink(missing_ok=True)
      raise
    return target
  raise OSError(f"could not download {stem}:\n  " + "\n  ".join(errors))


def _announce(message: str) -> None:
  print(f"[mnist] {message}", file=sys.stderr, flush=True)


def load(
  data_dir: str | os.PathLike | None = None,
  *,
  cache: str | os.PathLike | None = None,
  allow_download: bool = True,
  fetch_fn: Callable[[str], bytes] | None = None,
) -> Source:
  """Load MNIST (or any dataset in its four IDX files), see the module docstring.

  Args:
    data_dir: A folder with the four files. When given, only it is read, and
      its checksums are not checked (it may hold another dataset).
    cache: The cache folder; defaults to :func:`cache_dir`.
    allow_download: Whether to try the mirrors when the cache is incomplete.
    fetch_fn: Replaces :func:`fetch` (for tests).
  """
  if data_dir is not None:
    folder = pathlib.Path(data_dir).expanduser()
    return Source(read_split(folder, "train"), read_split(folder, "test"), "data_dir", folder)

  folder = pathlib.Path(cache) if cache is not None else cache_dir()
  missing = [stem for stem in MNIST_MD5 if find_file(folder, stem) is None]
  origin = "cache"
  if missing and allow_download:
    _announce(f"downloading MNIST into {folder}")
    unreachable: set[str] = set()
    try:
      for stem in missing:
        download(stem, folder, md5=MNIST_MD5[stem], fetch_fn=fetch_fn, unreachable=unreachable)
      missing, origin = [], "download"
    except OSError as e:
      _announce(f"download failed: {e}")
  if not missing:
    return Source(
      read_split(folder, "train", MNIST_MD5),
      read_split(folder, "test", MNIST_MD5),
      origin,
      folder,
    )

  sample = load_sample()
  _announce(
    f"no MNIST in {folder} and no download: using the SAMPLE shipped with the"
    f" example ({len(sample.train)} train / {len(sample.test)} test images of"
    " real MNIST, CC BY-SA 3.0); pass --data-dir or go online for the full"
    " 60,000 / 10,000"
  )
  return sample


def load_sample() -> Source:
  """The real MNIST sample shipped in ``examples/mnist/data``, checksums verified."""
  return Source(
    read_split(SAMPLE_DIR, "train", SAMPLE_MD5),
    read_split(SAMPLE_DIR, "test", SAMPLE_MD5),
    "sample",
    SAMPLE_DIR,
  )


# ------------------------------------------------------------------- batches


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
  """The order of the ``n`` training examples in ``epoch`` (a pure function)."""
  return np.random.default_rng([seed, epoch]).permutation(n)


def train_batches(data: Dataset, batch_size: int, seed: int, epoch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Shuffled full batches of ``epoch``; the incomplete last one is dropped.

  The order depends only on ``(seed, epoch)``, so a resumed run sees the same
  batches as an uninterrupted one.
  """
  perm = epoch_permutation(len(data), seed, epoch)
  for i in range(len(data) // batch_size):
    idx = np.sort(perm[i * batch_size : (i + 1) * batch_size])
    yield data.images[idx], data.labels[idx]


def eval_batches(data: Dataset, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """Every example once, in order: the last batch is padded, with a 0/1 mask."""
  for start in range(0, len(data), batch_size):
    images, labels = data.images[start : start + batch_size], data.labels[start : start + batch_size]
    n = len(labels)
    mask = np.zeros(batch_size, np.float32)
    mask[:n] = 1.0
    if n < batch_size:
      pad = batch_size - n
      images = np.concatenate([images, np.zeros((pad, 28, 28), images.dtype)])
      labels = np.concatenate([labels, np.zeros(pad, labels.dtype)])
    yield images, labels, mask
