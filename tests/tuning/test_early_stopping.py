"""jadam.early_stopping and the per-configuration plateau of jadam.sweep, against plain-Python loops and torch."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jadam


def _is_better(v, best, mode, threshold, threshold_mode):
  """torch.optim.lr_scheduler.ReduceLROnPlateau.is_better, written out in Python floats."""
  if mode == "min" and threshold_mode == "rel":
    return v < best * (1.0 - threshold)
  if mode == "min":
    return v < best - threshold
  if threshold_mode == "rel":
    return v > best * (threshold + 1.0)
  return v > best + threshold


def _stop_epoch(values, patience, min_delta=0.0, mode="min", threshold_mode="abs"):
  """The usual counter: best so far, epochs without improvement, stop when it reaches `patience`."""
  best, bad = (math.inf if mode == "min" else -math.inf), 0
  for epoch, v in enumerate(values, 1):
    if _is_better(v, best, mode, min_delta, threshold_mode):
      best, bad = v, 0
    else:
      bad += 1
      if bad >= patience:
        return epoch, best
  return 0, best


def _curves(seed, n, epochs=25):
  """Noisy, decaying, sometimes stalling losses (exact in float32), a few NaNs."""
  rng = np.random.default_rng(seed)
  trend = np.exp(-rng.uniform(0.02, 0.3, (n, 1)) * np.arange(epochs))
  values = (trend * (1 + rng.normal(0, rng.uniform(0.0, 0.2, (n, 1)), (n, epochs)))).astype(np.float32)
  values[rng.random((n, epochs)) < 0.03] = np.nan
  return values


@pytest.mark.parametrize(
  "patience,min_delta,mode,threshold_mode",
  [(0, 0.0, "min", "abs"), (1, 0.0, "min", "abs"), (3, 1e-2, "min", "abs"), (2, 0.05, "min", "rel"),
   (2, 1e-2, "max", "abs"), (4, 0.01, "max", "rel")],
)  # fmt: skip
def test_early_stopping_is_the_usual_counter(patience, min_delta, mode, threshold_mode):
  stopper = jadam.early_stopping(patience, min_delta, mode=mode, threshold_mode=threshold_mode)
  update = jax.jit(stopper.update)
  for row in _curves(patience, 20):
    want_epoch, want_best = _stop_epoch(row.tolist(), patience, min_delta, mode, threshold_mode)
    state = stopper.init()
    for v in row:
      state = update(state, v)
    assert int(state.stopped_epoch) == want_epoch
    np.testing.assert_equal(float(state.best), want_best)
    if want_epoch:
      assert int(state.epoch) == want_epoch  # frozen once stopped


def test_early_stopping_under_vmap_is_one_state_per_row():
  stopper = jadam.early_stopping(2, 1e-3)
  values = _curves(7, 16)
  state = jax.vmap(lambda _: stopper.init())(jnp.arange(16))
  step = jax.jit(jax.vmap(stopper.update))
  for column in values.T:
    state = step(state, column)
  want = [_stop_epoch(row.tolist(), 2, 1e-3)[0] for row in values]
  np.testing.assert_array_equal(np.asarray(state.stopped_epoch), want)


def test_early_stopping_errors():
  with pytest.raises(ValueError, match="patience"):
    jadam.early_stopping(-1)
  with pytest.raises(ValueError, match="patience"):
    jadam.early_stopping(1.5)
  with pytest.raises(ValueError, match="min_delta"):
    jadam.early_stopping(1, -0.1)
  with pytest.raises(ValueError, match="mode"):
    jadam.early_stopping(1, mode="avg")
  with pytest.raises(ValueError, match="threshold_mode"):
    jadam.early_stopping(1, threshold_mode="x")
  stopper = jadam.early_stopping(1)
  with pytest.raises(ValueError, match="vmap"):
    stopper.update(stopper.init(), jnp.ones(3))
  with pytest.raises(TypeError, match="EarlyStoppingState"):
    stopper.update((0, 0), 1.0)


def test_reduce_lr_on_plateau_and_early_stopping_share_one_rule():
  """The torch scheduler's comparison is jadam._tuning.plateau.is_better: the same answers on the same inputs."""
  from jadam._tuning import plateau as _plateau

  plateau = jadam.torch.ReduceLROnPlateau(0.1, mode="max", threshold=0.1, threshold_mode="rel")
  for v, best in [(1.0, 0.9), (1.1, 1.0), (0.5, 1.0), (np.nan, 1.0)]:
    want = _is_better(v, best, "max", 0.1, "rel")
    assert bool(plateau._is_better(jnp.float32(v), jnp.float32(best))) == want
    assert (
      bool(_plateau.is_better(jnp.float32(v), jnp.float32(best), mode="max", threshold=0.1, threshold_mode="rel"))
      == want
    )


@pytest.mark.parametrize("cooldown,threshold_mode", [(0, "rel"), (1, "abs")])
def test_sweep_plateau_and_stopping_follow_torch_per_configuration(cooldown, threshold_mode):
  """Each configuration's learning rate is what torch's ReduceLROnPlateau gives for its own losses."""
  torch = pytest.importorskip("torch")
  lrs = [1e-3, 3e-3, 1e-2, 3e-2]
  plateau = jadam.torch.ReduceLROnPlateau(
    1.0, patience=1, factor=0.5, cooldown=cooldown, threshold=1e-2, threshold_mode=threshold_mode
  )
  sweep = jadam.sweep(
    jadam.adam, {"learning_rate": lrs, "b1": [0.8, 0.9]}, plateau=plateau, early_stopping=jadam.early_stopping(4)
  )
  n = len(sweep.configs)
  losses = _curves(3, n, 20)
  state = sweep.tx.init(sweep.broadcast({"w": jnp.zeros(2)}))
  got_lr, got_stop = [], []
  for column in losses.T:
    state = sweep.observe(state, column)
    got_lr.append(np.asarray(state.inner.hyperparams["learning_rate"]))
    got_stop.append(np.asarray(state.stopping.stopped_epoch))
  got_lr, got_stop = np.array(got_lr).T, np.array(got_stop).T
  for i, config in enumerate(sweep.configs):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=config["learning_rate"])
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
      opt, patience=1, factor=0.5, cooldown=cooldown, threshold=1e-2, threshold_mode=threshold_mode
    )
    stop, _ = _stop_epoch(losses[i].tolist(), 4)
    for epoch, loss in enumerate(losses[i], 1):
      sched.step(float(loss))
      if not stop or epoch <= stop:  # after the stop, the configuration is frozen
        # factor 0.5 scales the float32 rate exactly: torch's double rate, rounded to float32, bit for bit
        assert got_lr[i, epoch - 1] == np.float32(opt.param_groups[0]["lr"]), (i, epoch)
      else:
        assert got_lr[i, epoch - 1] == got_lr[i, stop - 1]
    assert got_stop[i, -1] == stop
  assert (got_stop[:, -1] > 0).any() and (got_lr[:, -1] < np.array([c["learning_rate"] for c in sweep.configs])).any()
