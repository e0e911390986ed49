"""Tests of the MNIST example: smoke runs, resume, and jadam against optax.adam."""

import dataclasses
import functools
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jadam
from examples.mnist import __main__ as cli
from examples.mnist import input_pipeline, models, train
from examples.mnist.configs import default

# A small subset of the shipped sample keeps each run to a few seconds.
TINY = dict(
  data_dir=str(input_pipeline.SAMPLE_DIR),
  train_limit=64,
  test_limit=50,  # not a multiple of the eval batch: the last batch is padded
  batch_size=16,
  eval_batch_size=32,
  progress=False,
)


def _config(**kwargs):
  return default.Config(**{**TINY, **kwargs})


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.mark.parametrize("api", ["nnx", "linen"])
def test_one_epoch_smoke(tmp_path, api, capsys):
  out = train.train_and_evaluate(_config(api=api, epochs=1), tmp_path)
  metrics = json.loads((tmp_path / "metrics.json").read_text())
  assert metrics["data"] == {
    "origin": "data_dir",
    "path": str(input_pipeline.SAMPLE_DIR),
    "train_examples": 64,
    "test_examples": 50,
  }
  (record,) = metrics["history"]
  assert record["epoch"] == 1 and record["images_per_second"] > 0
  assert 0.0 <= metrics["test_accuracy"] <= 1.0
  assert metrics["test_accuracy"] == out["test_accuracy"] == record["test_accuracy"]
  assert np.isfinite(record["train_loss"]) and record["train_loss"] < np.log(10) + 1
  # 50 test images: the accuracy is a multiple of 1/50, so no example was dropped.
  assert round(50 * record["test_accuracy"], 6) == int(round(50 * record["test_accuracy"]))
  assert (tmp_path / "metrics.png").stat().st_size > 0
  assert (tmp_path / "checkpoints" / "1").is_dir()
  assert "epoch  1/1: train loss" in capsys.readouterr().out


@pytest.mark.parametrize("api", ["nnx", "linen"])
def test_resume_reaches_the_same_parameters(tmp_path, api):
  # A run extended from 1 to 2 epochs: only a constant rate is the same curve
  # whatever --epochs says (the cosine spans the run; see the next test).
  config = functools.partial(_config, api=api, lr_schedule="constant")
  straight = train.train_and_evaluate(config(epochs=2), tmp_path / "straight")
  train.train_and_evaluate(config(epochs=1), tmp_path / "split")
  resumed = train.train_and_evaluate(config(epochs=2, resume=True), tmp_path / "split")
  # Parameters and optimizer state, bit for bit.
  for a, b in zip(_leaves(straight["state"]), _leaves(resumed["state"]), strict=True):
    np.testing.assert_array_equal(a, b)
  history = json.loads((tmp_path / "split" / "metrics.json").read_text())["history"]
  assert [h["epoch"] for h in history] == [1, 2]
  assert history[1]["test_accuracy"] == straight["history"][1]["test_accuracy"]


def test_resume_after_an_interruption_with_a_cosine_schedule(tmp_path):
  """A 2-epoch cosine run that lost its last checkpoint, resumed, ends where it ended."""
  config = _config(epochs=2, lr_schedule="cosine", plot=False)
  straight = train.train_and_evaluate(config, tmp_path)
  shutil.rmtree(tmp_path / "checkpoints" / "2")  # as if killed during epoch 2
  resumed = train.train_and_evaluate(dataclasses.replace(config, resume=True), tmp_path)
  for a, b in zip(_leaves(straight["state"]), _leaves(resumed["state"]), strict=True):
    np.testing.assert_array_equal(a, b)
  assert resumed["history"] == straight["history"][:1] + resumed["history"][1:]
  assert resumed["history"][1]["test_accuracy"] == straight["history"][1]["test_accuracy"]


def test_cosine_schedule():
  schedule = train.cosine_schedule(1e-3, 100)
  np.testing.assert_allclose(float(schedule(0)), 1e-3)
  np.testing.assert_allclose(float(schedule(50)), 5e-4, rtol=1e-6)
  assert float(schedule(100)) == float(schedule(200)) < 1e-12


def test_default_is_a_cosine_from_1e_3_and_other_optimizers_peak_at_their_own_rate(tmp_path):
  config = default.get_config()
  assert (config.optimizer, config.learning_rate, config.lr_schedule) == ("adam", 1e-3, "cosine")
  assert train.default_learning_rate("rmsprop") == 1e-2 and train.default_learning_rate("Adam") == 1e-3
  # no --lr: the cosine starts from the optimizer's own default instead of failing
  out = train.train_and_evaluate(_config(optimizer="rmsprop", learning_rate=None, epochs=1, plot=False), tmp_path)
  assert np.isfinite(out["history"][0]["train_loss"])
  config, _ = cli.parse_args(["--lr-schedule", "constant"])
  assert config.lr_schedule == "constant" and config.learning_rate == 1e-3


def test_existing_checkpoints_need_resume(tmp_path):
  train.train_and_evaluate(_config(epochs=1, plot=False), tmp_path)
  with pytest.raises(FileExistsError, match="--resume"):
    train.train_and_evaluate(_config(epochs=1, plot=False), tmp_path)


def _loss_and_params(api):
  """A jitted ``grad(params, images, labels)`` of the CNN and its initial params."""
  if api == "nnx":
    model = models.CNN(rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(params, images, labels):
      logits = nnx.merge(graphdef, params)(models.prepare(images))
      return train._mean_loss(logits, labels)

  else:
    module = models.LinenCNN()
    params = module.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"]

    def loss(params, images, labels):
      return train._mean_loss(module.apply({"params": params}, models.prepare(images)), labels)

  return jax.jit(jax.grad(loss)), params


@pytest.mark.parametrize("api", ["nnx", "linen"])
def test_jadam_adam_matches_optax_adam_step_for_step(api):
  """The CNN's gradients at every step of a jadam run, through both optimizers.

  Both see the same gradients (those at jadam's parameters): ReLU networks
  trained by Adam turn a one-ulp difference into different gradients a step
  later, so comparing two free runs would test chaos, not the optimizer.
  """
  grad_fn, params = _loss_and_params(api)
  txs = {"jadam": jadam.adam(1e-3), "optax": optax.adam(1e-3)}
  updates_fns = {name: jax.jit(tx.update) for name, tx in txs.items()}
  states = {name: tx.init(params) for name, tx in txs.items()}
  data = input_pipeline.load_sample().train.take(10 * 32)
  # optax.adam computes decay**count as float ** int, refused under strict promotion.
  with jax.numpy_dtype_promotion("standard"):
    for images, labels in input_pipeline.train_batches(data, 32, seed=0, epoch=1):
      grads = grad_fn(params, images, labels)
      updates = {}
      for name, fn in updates_fns.items():
        updates[name], states[name] = fn(grads, states[name], params)
      # Float32: optax's 1 - b2**t starts from float32(0.999), whose 1 - b2
      # is 1.3e-5 off; jadam's correction is computed in double from the
      # Python float. Hence a relative difference of up to ~1.3e-5 / 2.
      for got, want in zip(_leaves(updates["jadam"]), _leaves(updates["optax"]), strict=True):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-10)
      params = optax.apply_updates(params, updates["jadam"])


def test_nnx_optimizer_with_jadam_is_nnx_optimizer_with_optax_on_one_step():
  """The NNX task's jadam.make_train_step with jadam.adam takes the step it takes with optax.adam."""
  data = input_pipeline.load_sample().train.take(32)
  images, labels = next(input_pipeline.train_batches(data, 32, seed=0, epoch=1))
  tasks = {
    n: train.make_task("nnx", tx, seed=0) for n, tx in (("jadam", jadam.adam(1e-3)), ("optax", optax.adam(1e-3)))
  }
  with jax.numpy_dtype_promotion("standard"):
    params = {}
    for name, task in tasks.items():
      state, totals = task.train_step(task.state, jnp.zeros(3), images, labels)
      params[name] = task.params(state)
  for got, want in zip(_leaves(params["jadam"]), _leaves(params["optax"]), strict=True):
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-7)  # an ulp of the weights


def test_make_optimizer_resolves_names_and_hyperparameters():
  assert isinstance(train.make_optimizer("adam", 1e-3), optax.GradientTransformation)
  assert isinstance(
    train.make_optimizer("adamw", 3e-3, {"weight_decay": 1e-2, "b2": 0.99}),
    optax.GradientTransformation,
  )
  assert isinstance(
    train.make_optimizer("sgd", 0.1, {"momentum": 0.9, "nesterov": True}),
    optax.GradientTransformation,
  )
  with pytest.raises(ValueError, match="unknown optimizer 'adamm'.*adam"):
    train.make_optimizer("adamm", 1e-3)
  with pytest.raises(ValueError, match="sgd takes no 'b1'"):
    train.make_optimizer("sgd", 0.1, {"b1": 0.9})
  assert "adam" in train.optimizer_names() and "rmsprop" in train.optimizer_names()
  # An explicit table: stages, schedulers and helpers of jadam's namespace are not optimizers.
  for name in ("decoupled_decay", "StepLR", "path_string", "scale_by_moments", "sweep", "early_stopping"):
    assert name not in train.optimizer_names()


@pytest.mark.parametrize("api", ["nnx", "linen"])
def test_muon_runs_with_adamw_for_what_is_not_a_hidden_matrix(tmp_path, api):
  """`--optimizer muon`: jadam.muon on the hidden dense kernel only, jadam.adamw on the rest; one tiny epoch."""
  config, _ = cli.parse_args(["--optimizer", "muon", "--epochs", "1", "--workdir", str(tmp_path)])
  assert config.optimizer == "muon"
  tx = train.make_optimizer("muon", 0.02)
  labels = train.make_task(api, tx, 0).state[1].inner_states  # optax.partition's state: one per label
  assert set(labels) == {"muon", "adamw"}
  muon_leaves = [x for x in jax.tree.leaves(labels["muon"].inner_state) if getattr(x, "ndim", 0) == 2]
  assert [x.shape for x in muon_leaves] == [(7 * 7 * 64, 256)]  # the momentum buffer of the hidden dense kernel
  out = train.train_and_evaluate(_config(api=api, optimizer="muon", learning_rate=0.02, epochs=1, plot=False), tmp_path)
  assert np.isfinite(out["history"][0]["train_loss"]) and 0.0 <= out["test_accuracy"] <= 1.0


def test_command_line():
  config, workdir = cli.parse_args(
    [
      "--optimizer",
      "adamw",
      "--lr",
      "3e-3",
      "--weight-decay",
      "1e-2",
      "--epochs",
      "2",
      "--api",
      "linen",
      "--opt",
      "amsgrad=True",
      "--workdir",
      "w",
      "--resume",
    ]
  )
  assert (config.optimizer, config.learning_rate, config.api, config.epochs) == ("adamw", 3e-3, "linen", 2)
  assert config.hyperparameters == {"weight_decay": 1e-2, "amsgrad": True}
  assert config.resume and workdir == "w"
  config, _ = cli.parse_args([])
  assert config == default.get_config()


def test_main_end_to_end(tmp_path, capsys):
  cli.main(
    [
      "--data-dir",
      str(input_pipeline.SAMPLE_DIR),
      "--train-limit",
      "32",
      "--test-limit",
      "20",
      "--batch-size",
      "8",
      "--epochs",
      "1",
      "--workdir",
      str(tmp_path),
      "--optimizer",
      "adamw",
      "--lr",
      "3e-3",
      "--weight-decay",
      "1e-2",
      "--no-progress",
    ]
  )
  assert "test accuracy" in capsys.readouterr().out
  assert json.loads((tmp_path / "metrics.json").read_text())["config"]["optimizer"] == "adamw"
