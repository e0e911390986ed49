"""The corpus: 250 Wikipedia articles that gensim ships as test data, read as plain text (no gensim import).

``gensim/test/test_data/head500.noblanks.cor`` (in the `gensim` wheel on PyPI,
`pip install gensim`, ~28 MB): one article a line, lower-cased, stemmed
(``philosophi``), stop words removed; 331,339 tokens, 29,722 distinct. Any
other whitespace-tokenised text, one document a line, works with ``--corpus``.
"""

from __future__ import annotations

import collections
import importlib.util
import pathlib
from typing import NamedTuple

import numpy as np

CORPUS = "test/test_data/head500.noblanks.cor"
UNK = "<unk>"


def default_corpus() -> pathlib.Path:
  """The path of gensim's copy, found without importing gensim."""
  spec = importlib.util.find_spec("gensim")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
      "the default corpus ships with gensim: `pip install gensim` (or the examples extra), or pass --corpus FILE"
    )
  path = pathlib.Path(list(spec.submodule_search_locations)[0]) / CORPUS
  if not path.is_file():
    raise FileNotFoundError(f"{path} is missing from this gensim install; pass --corpus FILE")
  return path


class Dataset(NamedTuple):
  vocab: list[str]  # id -> word; id 0 is <unk>
  train: np.ndarray  # (n, context + 1) int32: context ids, then the target (< shortlist; 0 is <unk>)
  valid: np.ndarray


def windows(ids: np.ndarray, context: int) -> np.ndarray:
  """Every (context words, next word) window of one document, as rows of `context + 1` ids."""
  if len(ids) <= context:
    return np.zeros((0, context + 1), np.int32)
  view = np.lib.stride_tricks.sliding_window_view(ids, context + 1)
  return np.ascontiguousarray(view, dtype=np.int32)


def load(
  path: str | pathlib.Path,
  *,
  context: int = 4,
  min_count: int = 2,
  shortlist: int = 2000,
  valid_fraction: float = 0.1,
) -> Dataset:
  """Reads the corpus; the last `valid_fraction` of its documents are held out.

  The vocabulary (the embedding table's rows) is every training word seen at
  least `min_count` times, by decreasing frequency (so ids follow Zipf's law);
  the others map to <unk> (id 0). Targets are predicted over a shortlist
  (Schwenk, 2007): the `shortlist - 1` most frequent words and <unk> for the
  rest, so the input table is the model's largest parameter.
  """
  docs = [line.split() for line in pathlib.Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
  if len(docs) < 2:
    raise ValueError(f"{path}: need at least two documents (lines) to hold one out")
  n_valid = max(1, int(round(len(docs) * valid_fraction)))
  train_docs, valid_docs = docs[:-n_valid], docs[-n_valid:]
  counts = collections.Counter(w for d in train_docs for w in d)
  vocab = [UNK] + [w for w, c in counts.most_common() if c >= min_count]
  index = {w: i for i, w in enumerate(vocab)}

  def encode(ds):
    rows = [windows(np.array([index.get(w, 0) for w in d], np.int32), context) for d in ds]
    out = np.concatenate(rows) if rows else np.zeros((0, context + 1), np.int32)
    out[:, -1] = np.where(out[:, -1] < shortlist, out[:, -1], 0)
    return out

  return Dataset(vocab=vocab, train=encode(train_docs), valid=encode(valid_docs))


def batches(data: np.ndarray, batch_size: int, rng: np.random.Generator):
  """One epoch of shuffled full batches (the remainder is dropped, so `jit` compiles once)."""
  order = rng.permutation(len(data))
  for i in range(len(data) // batch_size):
    yield data[order[i * batch_size : (i + 1) * batch_size]]
