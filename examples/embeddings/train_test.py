"""The embeddings example end to end on a small corpus written here (fast), and its input pipeline."""

import json

import numpy as np
import pytest

pytest.importorskip("tqdm")
pytest.importorskip("matplotlib")

from examples.embeddings import input_pipeline, train  # noqa: E402


def _corpus(tmp_path, docs=12, words=60, vocab=40):
  rng = np.random.default_rng(0)
  lines = [" ".join(f"w{int(i)}" for i in rng.zipf(1.5, size=words) % vocab) for _ in range(docs)]
  path = tmp_path / "corpus.txt"
  path.write_text("\n".join(lines) + "\n")
  return path


def test_windows_and_shortlist(tmp_path):
  data = input_pipeline.load(_corpus(tmp_path), context=3, min_count=1, shortlist=5)
  assert data.train.shape[1] == 4 and data.vocab[0] == input_pipeline.UNK
  assert data.train[:, -1].max() < 5 and data.train[:, :-1].max() < len(data.vocab)
  np.testing.assert_array_equal(input_pipeline.windows(np.arange(5), 2), [[0, 1, 2], [1, 2, 3], [2, 3, 4]])


def test_trains_both_runs_and_writes_metrics(tmp_path):
  config = train.Config(
    corpus=str(_corpus(tmp_path)), dim=8, hidden=16, batch_size=32, epochs=1, max_steps=8, eval_every=4, shortlist=10
  )
  metrics = train.train_and_evaluate(config, tmp_path / "run")
  written = json.loads((tmp_path / "run" / "metrics.json").read_text())
  assert (tmp_path / "run" / "metrics.png").is_file()
  for kind in ("sparse", "dense"):
    run = written["runs"][kind]
    assert run["steps"] == 8 and np.isfinite(run["valid_perplexity"])
    assert run["history"]["valid_ppl"][-1] < run["history"]["valid_ppl"][0] * 1.5
  assert metrics["runs"].keys() == {"sparse", "dense"}


def test_default_corpus_is_found_without_network():
  pytest.importorskip("gensim")
  assert input_pipeline.default_corpus().stat().st_size > 1_000_000
