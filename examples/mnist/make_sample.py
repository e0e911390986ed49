"""Write the MNIST sample shipped in ``examples/mnist/data``.

    python -m examples.mnist.make_sample --source ../shared/data/mnist

takes the first ``--train`` training and ``--test`` test images (and labels) of
the full MNIST in ``--source``, checks the source against the published
checksums, and writes them as IDX files gzipped with mtime 0 (so the output is
byte-for-byte reproducible). It prints the MD5 of each file's uncompressed
bytes, which ``input_pipeline.SAMPLE_MD5`` holds.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import pathlib

import numpy as np

from examples.mnist import input_pipeline


def idx_bytes(array: np.ndarray) -> bytes:
  """The IDX encoding of a uint8 array."""
  assert array.dtype == np.uint8
  header = bytes([0, 0, 0x08, array.ndim])
  header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
  return header + array.tobytes()


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--source", required=True, help="folder with the full MNIST")
  parser.add_argument("--out", default=str(input_pipeline.SAMPLE_DIR))
  parser.add_argument("--train", type=int, default=10_000)
  parser.add_argument("--test", type=int, default=2_000)
  args = parser.parse_args(argv)

  source, out = pathlib.Path(args.source), pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  counts = {"train": args.train, "test": args.test}
  for split in input_pipeline.SPLITS:
    data = input_pipeline.read_split(source, split, input_pipeline.MNIST_MD5)
    data = data.take(counts[split])
    for kind, array in (("images", data.images), ("labels", data.labels)):
      stem = input_pipeline.FILES[(split, kind)]
      raw = idx_bytes(np.ascontiguousarray(array))
      (out / f"{stem}.gz").write_bytes(gzip.compress(raw, compresslevel=9, mtime=0))
      print(f"{stem}.gz  {array.shape}  md5 {hashlib.md5(raw).hexdigest()}")
    print(f"{split} class counts: {np.bincount(data.labels, minlength=10).tolist()}")


if __name__ == "__main__":
  main()
