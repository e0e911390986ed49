"""Tests of the IDX reader, the checksummed download and the data sources."""

import gzip
import hashlib
import pathlib

import numpy as np
import pytest

from examples.mnist import input_pipeline as ip
from examples.mnist.make_sample import idx_bytes

SHARED = pathlib.Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "mnist"


def _write_split(folder: pathlib.Path, split: str, n: int, *, gz: bool = True, seed: int = 0):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
  labels = rng.integers(0, 10, n, dtype=np.uint8)
  for kind, array in (("images", images), ("labels", labels)):
    stem = ip.FILES[(split, kind)]
    raw = idx_bytes(array)
    if gz:
      (folder / f"{stem}.gz").write_bytes(gzip.compress(raw, mtime=0))
    else:
      (folder / stem).write_bytes(raw)
  return images, labels


def _write_all(folder: pathlib.Path, *, gz: bool = True):
  folder.mkdir(parents=True, exist_ok=True)
  return _write_split(folder, "train", 20, gz=gz), _write_split(folder, "test", 7, gz=gz, seed=1)


# ----------------------------------------------------------------------- IDX


def test_parse_idx_round_trip():
  array = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
  np.testing.assert_array_equal(ip.parse_idx(idx_bytes(array)), array)


def test_parse_idx_big_endian_types():
  data = bytes([0, 0, 0x0C, 1]) + (3).to_bytes(4, "big") + np.array([1, -2, 3], ">i4").tobytes()
  out = ip.parse_idx(data)
  assert out.dtype == np.int32 and out.tolist() == [1, -2, 3]


@pytest.mark.parametrize(
  "mutate, match",
  [
    (lambda b: b"\x00\x01" + b[2:], "magic"),  # first two bytes not zero
    (lambda b: b[:2] + b"\x07" + b[3:], "magic"),  # unknown type code
    (lambda b: b[:10], "truncated IDX header"),
    (lambda b: b[:-5], "truncated"),
    (lambda b: b + b"\x00", "trailing bytes"),
    (lambda b: b[:3], "too short"),
  ],
)
def test_parse_idx_rejects_corrupt_and_truncated(mutate, match):
  data = idx_bytes(np.zeros((3, 28, 28), np.uint8))
  with pytest.raises(ip.IDXError, match=match) as info:
    ip.parse_idx(mutate(data), "some-file")
  assert "some-file" in str(info.value)


@pytest.mark.parametrize("gz", [True, False])
def test_read_split_gzipped_or_not(tmp_path, gz):
  (images, labels), _ = _write_all(tmp_path, gz=gz)
  data = ip.read_split(tmp_path, "train")
  np.testing.assert_array_equal(data.images, images)
  np.testing.assert_array_equal(data.labels, labels)


def test_read_split_truncated_gzip_names_the_file(tmp_path):
  _write_all(tmp_path)
  path = tmp_path / "train-images-idx3-ubyte.gz"
  path.write_bytes(path.read_bytes()[:-100])
  with pytest.raises(ip.IDXError, match="truncated") as info:
    ip.read_split(tmp_path, "train")
  assert str(path) in str(info.value)


def test_read_split_corrupt_gzip_names_the_file(tmp_path):
  _write_all(tmp_path)
  path = tmp_path / "train-labels-idx1-ubyte.gz"
  raw = bytearray(path.read_bytes())
  raw[12:20] = b"\xff" * 8
  path.write_bytes(bytes(raw))
  with pytest.raises(ip.IDXError, match="gzip") as info:
    ip.read_split(tmp_path, "train")
  assert str(path) in str(info.value)


def test_read_split_truncated_payload_names_the_file(tmp_path):
  _write_all(tmp_path, gz=False)
  path = tmp_path / "t10k-images-idx3-ubyte"
  path.write_bytes(path.read_bytes()[:-1])
  with pytest.raises(ip.IDXError, match="truncated") as info:
    ip.read_split(tmp_path, "test")
  assert str(path) in str(info.value)


def test_read_split_checks_shapes(tmp_path):
  _write_all(tmp_path)
  # Labels as images, and images of the wrong size.
  (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(19, np.uint8))))
  with pytest.raises(ip.IDXError, match="20 images but"):
    ip.read_split(tmp_path, "train")
  (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros((7, 32, 32), np.uint8))))
  with pytest.raises(ip.IDXError, match=r"\(28, 28\)"):
    ip.read_split(tmp_path, "test")
  (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(7, np.uint8))))
  with pytest.raises(ip.IDXError, match="expected 3-d"):
    ip.read_split(tmp_path, "test")


def test_read_split_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
    ip.read_split(tmp_path, "train")


def test_read_split_checksum(tmp_path):
  _write_all(tmp_path)
  with pytest.raises(ip.ChecksumError, match="MD5"):
    ip.read_split(tmp_path, "train", ip.MNIST_MD5)


# -------------------------------------------------------------- the sources


def _fake_mirror(folder: pathlib.Path, calls: list[str], bad_first: bool = False):
  """A fetch that serves the files of ``folder`` and records the URLs asked."""

  def fetch(url: str) -> bytes:
    calls.append(url)
    if bad_first and url.startswith(ip.MIRRORS[0]):
      return gzip.compress(b"not what you asked for")
    return (folder / url.rsplit("/", 1)[1]).read_bytes()

  return fetch


@pytest.fixture
def fake_mnist(tmp_path, monkeypatch):
  """A tiny dataset on a fake mirror, with its checksums as MNIST's."""
  mirror = tmp_path / "mirror"
  _write_all(mirror)
  md5 = {stem: hashlib.md5(gzip.decompress((mirror / f"{stem}.gz").read_bytes())).hexdigest() for stem in ip.MNIST_MD5}
  monkeypatch.setattr(ip, "MNIST_MD5", md5)
  return mirror


def test_download_verifies_and_writes_atomically(tmp_path, fake_mnist):
  calls = []
  cache = tmp_path / "cache"
  stem = "train-labels-idx1-ubyte"
  path = ip.download(stem, cache, md5=ip.MNIST_MD5[stem], fetch_fn=_fake_mirror(fake_mnist, calls, bad_first=True))
  assert path == cache / f"{stem}.gz"
  assert path.read_bytes() == (fake_mnist / f"{stem}.gz").read_bytes()
  assert len(calls) == 2  # the first mirror's bytes were rejected
  assert sorted(p.name for p in cache.iterdir()) == [f"{stem}.gz"]


def test_download_wrong_checksum_leaves_nothing(tmp_path, fake_mnist):
  cache = tmp_path / "cache"
  cache.mkdir()
  stem = "train-images-idx3-ubyte"
  with pytest.raises(OSError, match="MD5"):
    ip.download(stem, cache, md5="0" * 32, fetch_fn=_fake_mirror(fake_mnist, []))
  assert list(cache.iterdir()) == []


def test_download_interrupted_write_leaves_nothing(tmp_path, fake_mnist, monkeypatch):
  cache = tmp_path / "cache"
  cache.mkdir()
  stem = "t10k-labels-idx1-ubyte"

  def fail(src, dst):
    raise KeyboardInterrupt

  monkeypatch.setattr(ip.os, "replace", fail)
  with pytest.raises(KeyboardInterrupt):
    ip.download(stem, cache, md5=ip.MNIST_MD5[stem], fetch_fn=_fake_mirror(fake_mnist, []))
  assert list(cache.iterdir()) == []


def test_load_downloads_into_the_cache_then_reads_it(tmp_path, fake_mnist, monkeypatch):
  monkeypatch.setenv("JADAM_DATA", str(tmp_path / "cache"))
  calls = []
  source = ip.load(fetch_fn=_fake_mirror(fake_mnist, calls))
  assert source.origin == "download" and len(calls) == 4
  assert (len(source.train), len(source.test)) == (20, 7)
  again = ip.load(fetch_fn=_fake_mirror(fake_mnist, calls))
  assert again.origin == "cache" and len(calls) == 4
  np.testing.assert_array_equal(again.train.images, source.train.images)


def test_load_offline_falls_back_to_the_sample(tmp_path, monkeypatch, capsys):
  monkeypatch.setenv("JADAM_DATA", str(tmp_path / "empty"))

  calls = []

  def offline(url):
    calls.append(url)
    raise OSError("no network")

  source = ip.load(fetch_fn=offline)
  assert source.origin == "sample"
  assert len(calls) == len(ip.MIRRORS)  # an unreachable mirror is not asked again
  assert (len(source.train), len(source.test)) == (10_000, 2_000)
  assert "SAMPLE" in capsys.readouterr().err
  assert not list((tmp_path / "empty").glob("*"))  # nothing half-written


def test_load_data_dir_is_any_idx_folder(tmp_path):
  (images, _), (_, test_labels) = _write_all(tmp_path / "fashion", gz=False)
  source = ip.load(tmp_path / "fashion")
  assert source.origin == "data_dir"
  np.testing.assert_array_equal(source.train.images, images)
  np.testing.assert_array_equal(source.test.labels, test_labels)


def test_shipped_sample():
  files = sorted(ip.SAMPLE_DIR.glob("*.gz"))
  assert len(files) == 4
  assert sum(f.stat().st_size for f in files) <= 2_000_000
  assert "CC BY-SA 3.0" in (ip.SAMPLE_DIR / "README.md").read_text()
  source = ip.load_sample()  # checks the MD5s
  assert source.train.images.shape == (10_000, 28, 28)
  assert np.bincount(source.test.labels, minlength=10).min() > 150


@pytest.mark.skipif(not SHARED.is_dir(), reason="no full MNIST in ../shared/data/mnist")
def test_full_mnist_and_the_sample_is_its_prefix():
  source = ip.load(SHARED)
  for split in ip.SPLITS:
    ip.read_split(SHARED, split, ip.MNIST_MD5)
  assert source.train.images.shape == (60_000, 28, 28)
  assert np.bincount(source.test.labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
  sample = ip.load_sample()
  np.testing.assert_array_equal(sample.train.images, source.train.images[:10_000])
  np.testing.assert_array_equal(sample.test.labels, source.test.labels[:2_000])


# ------------------------------------------------------------------- batches


def test_shuffle_is_a_function_of_seed_and_epoch():
  a = ip.epoch_permutation(100, seed=0, epoch=1)
  np.testing.assert_array_equal(a, ip.epoch_permutation(100, seed=0, epoch=1))
  assert not np.array_equal(a, ip.epoch_permutation(100, seed=0, epoch=2))
  assert not np.array_equal(a, ip.epoch_permutation(100, seed=1, epoch=1))
  assert sorted(a.tolist()) == list(range(100))


def test_eval_batches_cover_every_example_once():
  data = ip.Dataset(np.zeros((10, 28, 28), np.uint8), np.arange(10, dtype=np.uint8))
  batches = list(ip.eval_batches(data, 4))
  assert [b[0].shape[0] for b in batches] == [4, 4, 4]
  labels = np.concatenate([y[m > 0] for _, y, m in batches])
  np.testing.assert_array_equal(labels, np.arange(10))


def test_train_batches_drop_only_the_remainder():
  data = ip.Dataset(np.zeros((10, 28, 28), np.uint8), np.arange(10, dtype=np.uint8))
  batches = list(ip.train_batches(data, 4, seed=0, epoch=1))
  assert len(batches) == 2
  seen = np.concatenate([y for _, y in batches])
  assert len(set(seen.tolist())) == 8
