"""Tests of the tuning example: vmapped equals sequential, the outputs, the command line."""

import dataclasses
import json

import jax
import numpy as np
import pytest

import jadam
from examples.mnist import input_pipeline
from examples.tune import __main__ as cli
from examples.tune import train
from examples.tune.configs import default

# A subset of the shipped sample: 2 epochs of 4 configurations, run twice, in a few seconds.
SMALL = default.Config(
  model="mlp",
  grid={"lr": (1e-3, 3e-3), "b2": (0.99, 0.999)},
  epochs=2,
  batch_size=32,
  data_dir=str(input_pipeline.SAMPLE_DIR),
  train_limit=1200,
  test_limit=1000,
  plot=False,
  checkpoint=False,
)


def _configuration(params, i):
  """Configuration `i`'s parameters, out of a tree whose leaves have the leading configuration axis."""
  return jax.tree.map(lambda p: np.asarray(p[i]), params)


def test_vmapped_equals_sequential(tmp_path, capsys):
  together = train.sweep_and_evaluate(SMALL, tmp_path / "vmapped")
  alone = train.sweep_and_evaluate(dataclasses.replace(SMALL, sequential=True), tmp_path / "sequential")
  names = together["hyperparameters"]
  assert names == ["learning_rate", "b2"] and alone["hyperparameters"] == names
  assert [{k: c[k] for k in names} for c in together["configs"]] == [{k: c[k] for k in names} for c in alone["configs"]]
  for i, (a, b) in enumerate(zip(together["configs"], alone["configs"], strict=True)):
    assert abs(a["test_accuracy"] - b["test_accuracy"]) <= 0.003, i
    np.testing.assert_allclose(a["val_loss"], b["val_loss"], rtol=1e-5)
    stacked = _configuration(together["results"]["params"], i)
    single = _configuration(alone["results"]["params"][i], 0)
    for x, y in zip(jax.tree.leaves(stacked), jax.tree.leaves(single), strict=True):
      # float32 rounding: a few ulps of the largest weight of the layer
      np.testing.assert_allclose(x, y, rtol=0, atol=16 * np.finfo(np.float32).eps * np.abs(y).max())
  out = capsys.readouterr().out
  assert "all at once (vmapped)" in out and "one after another" in out and "| rank |" in out


def test_outputs_early_stopping_and_plateau(tmp_path):
  config = dataclasses.replace(
    SMALL, grid={"lr": (1e-3, 1e-1), "b1": (0.9,)}, epochs=4, patience=1, plateau_patience=0, plot=True, checkpoint=True
  )
  out = train.sweep_and_evaluate(config, tmp_path)
  saved = json.loads((tmp_path / "sweep.json").read_text())
  assert (tmp_path / "sweep.png").stat().st_size > 0
  last = max(len(c["val_loss"]) for c in saved["configs"])
  like = {"params": out["results"]["params"], "state": out["results"]["state"]}
  restored = jadam.restore_state(tmp_path / "checkpoints" / f"epoch_{last}", like)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(like), strict=True):
    np.testing.assert_array_equal(a, b)
  assert saved["hyperparameters"] == ["learning_rate", "b1"]
  assert [{k: c[k] for k in saved["hyperparameters"]} for c in saved["configs"]] == [
    {"learning_rate": 1e-3, "b1": 0.9},
    {"learning_rate": 1e-1, "b1": 0.9},
  ]
  for c in saved["configs"]:
    assert set(c) >= {"learning_rate", "b1", "val_loss", "val_accuracy", "stopped_epoch", "test_accuracy"}
    assert 0 <= c["test_accuracy"] <= 1 and len(c["val_loss"]) == len(c["val_accuracy"])
    # recorded up to the epoch it stopped, or every epoch
    assert len(c["val_loss"]) == (c["stopped_epoch"] or config.epochs)
  best = saved["best"]
  assert best == int(np.argmin([c["val_loss"][-1] for c in saved["configs"]])) == out["best"]
  assert saved["data"] == {"origin": "data_dir", "train_examples": 1080, "val_examples": 120, "test_examples": 1000}


def test_optimizer_names_and_torch_front_doors():
  config = dataclasses.replace(SMALL, optimizer="Adam", grid={"lr": (1e-3,), "b1": (0.8, 0.9), "b2": (0.99,)})
  assert train.optimizer_grid(config) == {"lr": [1e-3], "betas": [(0.8, 0.99), (0.9, 0.99)]}
  config = dataclasses.replace(SMALL, optimizer="adamw", grid={"lr": (1e-3,), "weight_decay": (0.0, 0.1)})
  assert train.optimizer_grid(config) == {"learning_rate": [1e-3], "weight_decay": [0.0, 0.1]}
  with pytest.raises(ValueError, match="unknown optimizer 'adamm'"):
    train.optimizer_grid(dataclasses.replace(SMALL, optimizer="adamm"))


def test_command_line():
  config, workdir = cli.parse_args(
    ["--lr", "1e-3,3e-3", "--b1", "0.8,0.9", "--eps", "1e-8", "--patience", "2", "--sequential", "--workdir", "w"]
  )
  assert config.grid == {"lr": (1e-3, 3e-3), "b1": (0.8, 0.9), "eps": (1e-8,)}
  assert config.patience == 2 and config.sequential and workdir == "w"
  config, _ = cli.parse_args([])
  assert config == default.get_config()
  with pytest.raises(SystemExit):
    cli.parse_args(["--lr", "fast"])
