"""Muon: jadam.muon and jadam.torch.Muon against a NumPy float64 reference and torch.optim.Muon.

PyTorch runs the Newton–Schulz iteration in bfloat16 whatever the parameters'
dtype, so a float64 comparison to 1e-12 needs both sides in float64: jadam's
``ns_dtype=None``, and PyTorch's own `_zeropower_via_newtonschulz` given a
tensor whose `.bfloat16()` is a float64 copy (`_NoBfloat16`), so that every
other line of PyTorch's code runs as it is. The bfloat16 path itself is
compared call by call.
"""

import contextlib
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized

import jadam
from tests.helpers import reference_adafactor_muon as R

SHAPES = {"square": (4, 4), "tall": (6, 3), "wide": (3, 7)}
STEPS = 100

# (torch keywords, jadam.muon keywords)
CASES = [
  ({}, {}),
  (dict(nesterov=False, weight_decay=0.0, lr=0.02), dict(nesterov=False, weight_decay=0.0, learning_rate=0.02)),
  (dict(adjust_lr_fn="match_rms_adamw", momentum=0.9), dict(adjust_lr_fn="match_rms_adamw", momentum=0.9)),
  (
    dict(lr=0.01, ns_coefficients=(2.0, -1.5, 0.5), ns_steps=3, eps=1e-5, adjust_lr_fn="original"),
    dict(learning_rate=0.01, ns_coefficients=(2.0, -1.5, 0.5), ns_steps=3, eps=1e-5),
  ),
]


def _name(kw):
  return "-".join(f"{k}={v}" for k, v in kw.items()) or "defaults"


def _reference_kwargs(kw):
  out = dict(lr=kw.get("lr", 1e-3), wd=kw.get("weight_decay", 0.1), momentum=kw.get("momentum", 0.95))
  out.update(nesterov=kw.get("nesterov", True), adjust=kw.get("adjust_lr_fn"))
  ns = dict(coefficients=kw.get("ns_coefficients", (3.4445, -4.7750, 2.0315)), steps=kw.get("ns_steps", 5))
  return dict(out, **ns, eps=kw.get("eps", 1e-7))


def _reference_step(theta, grad, state, t, **kw):
  del t
  theta, state["buf"] = R.muon_step(theta, grad, state["buf"], **kw)
  return theta


class MuonReferenceTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*[(_name(t), t, j) for t, j in CASES])
  def test_matches_numpy_float64(self, torch_kw, jadam_kw):
    with jax.enable_x64(True):
      want = R.run_numpy(
        functools.partial(_reference_step, **_reference_kwargs(torch_kw)),
        lambda shape: {"buf": np.zeros(shape)},
        SHAPES,
        STEPS,
      )
      tx = jadam.muon(**jadam_kw, ns_dtype=None)
      tx = optax.GradientTransformation(tx.init, self.variant(tx.update))
      got, _, _ = R.run_jax(tx, SHAPES, STEPS, jit=False)
    assert R.max_rel_diff(got, want) <= 1e-12

  def test_momentum_ema_composes_with_orthogonalize(self):
    """The recipe is its stages: jadam.momentum(ema=True) -> orthogonalize -> scale_by_lr -> decoupled_decay."""
    with jax.enable_x64(True):
      chain = optax.chain(
        jadam.momentum(0.9, nesterov=True, ema=True),
        jadam.orthogonalize(shape_scaling="original", ns_dtype=None),
        jadam.scale_by_lr(0.02),
        jadam.decoupled_decay(0.1, 0.02),
      )
      got, _, _ = R.run_jax(chain, SHAPES, 30)
      want, _, _ = R.run_jax(jadam.muon(0.02, 0.9, ns_dtype=None), SHAPES, 30)
    assert R.max_rel_diff(got, want) == 0.0


torch = pytest.importorskip("torch")


class _NoBfloat16(torch.Tensor):
  """A tensor whose `.bfloat16()` is a plain copy: PyTorch's Newton–Schulz then runs in the tensor's dtype."""

  def bfloat16(self):
    return self.as_subclass(torch.Tensor).clone()


@contextlib.contextmanager
def _torch_newton_schulz_in_float64():
  import torch.optim._muon as muon_module

  original = muon_module._zeropower_via_newtonschulz
  muon_module._zeropower_via_newtonschulz = lambda g, *args: original(g.as_subclass(_NoBfloat16), *args)
  try:
    yield
  finally:
    muon_module._zeropower_via_newtonschulz = original


def _torch_muon(kw):
  return lambda tensors: [torch.optim.Muon(list(tensors.values()), **kw)]


@pytest.mark.parametrize("torch_kw, jadam_kw", CASES, ids=[_name(t) for t, _ in CASES])
def test_front_door_matches_torch_float64(torch_kw, jadam_kw):
  with _torch_newton_schulz_in_float64():
    want, _ = R.run_torch(_torch_muon(torch_kw), SHAPES, STEPS)
  with jax.enable_x64(True):
    got, _, _ = R.run_jax(jadam.torch.Muon(**torch_kw, ns_dtype=None), SHAPES, STEPS)
    recipe, _, _ = R.run_jax(jadam.muon(**jadam_kw, ns_dtype=None), SHAPES, STEPS)
  assert R.max_rel_diff(got, want) <= 1e-12
  assert R.max_rel_diff(recipe, want) <= 1e-12


@pytest.mark.parametrize("shape", [(4, 4), (6, 3), (3, 7), (16, 32)])
@pytest.mark.parametrize("scale", [1.0, 1e-6])
def test_bfloat16_newton_schulz_matches_torch(shape, scale):
  """PyTorch's bfloat16 iteration against jadam's, one call at a time.

  Both accumulate each product in float32 and round each line once to
  bfloat16, but the summation order differs, so a sum that lands on a rounding
  boundary can round the other way: one bfloat16 ulp (2^-8 relative) in one
  element, which the remaining iterations carry with a gain below the
  polynomial's slope (a + b + c < 2 at the singular values it reaches). Two
  ulps normwise bound that.
  """
  import torch.optim._muon as muon_module

  from jadam._stages.orthogonal import newton_schulz

  g = np.random.default_rng(0).normal(size=shape) * scale
  for dtype in (np.float32, np.float64):
    want = muon_module._zeropower_via_newtonschulz(torch.tensor(g.astype(dtype)), (3.4445, -4.7750, 2.0315), 5, 1e-7)
    got = newton_schulz(jnp.asarray(g.astype(np.float32)), (3.4445, -4.7750, 2.0315), 5, 1e-7, jnp.bfloat16)
    assert got.dtype == jnp.bfloat16 and want.dtype == torch.bfloat16
    want, got = want.float().numpy(), np.asarray(got.astype(jnp.float32))
    assert np.linalg.norm(got - want) <= 2 * 2.0**-8 * np.linalg.norm(want)


def test_default_runs_bfloat16_newton_schulz_like_torch():
  """The default ns_dtype is PyTorch's bfloat16: the first step is PyTorch's to bfloat16's rounding."""
  want, _ = R.run_torch(_torch_muon(dict(lr=0.02)), SHAPES, 1, np.float32)
  got, _, _ = R.run_jax(jadam.torch.Muon(lr=0.02), SHAPES, 1, np.float32)
  params0 = R.problem(SHAPES, 1)[0]
  for k in SHAPES:  # the step, lr * s * O, up to two bfloat16 ulps of O
    step_want, step_got = want[k][0] - params0[k] * (1 - 0.02 * 0.1), got[k][0] - params0[k] * (1 - 0.02 * 0.1)
    assert np.linalg.norm(step_got - step_want) <= 2 * 2.0**-8 * np.linalg.norm(step_want) + 1e-6


def test_muon_for_hidden_weights_adamw_for_the_rest_matches_two_torch_optimizers():
  """The usual recipe: PyTorch's two optimizers, jadam's optax.partition of two front doors (and of two recipes)."""
  shapes = {"hidden": (6, 4), "hidden2": (4, 4), "bias": (4,), "head": (4, 2)}

  def make(tensors):
    return [
      torch.optim.Muon([tensors["hidden"], tensors["hidden2"]], lr=0.02, momentum=0.9),
      torch.optim.AdamW([tensors["bias"], tensors["head"]], lr=3e-3, weight_decay=0.01),
    ]

  def labels(params):
    return {k: "muon" if k.startswith("hidden") else "adamw" for k in params}

  with _torch_newton_schulz_in_float64():
    want, _ = R.run_torch(make, shapes, 60)
  with jax.enable_x64(True):
    front = optax.partition(
      {
        "muon": jadam.torch.Muon(lr=0.02, momentum=0.9, ns_dtype=None),
        "adamw": jadam.torch.AdamW(lr=3e-3, weight_decay=0.01),
      },
      labels,
    )
    got, _, _ = R.run_jax(front, shapes, 60)
    recipe = optax.partition(
      {"muon": jadam.muon(0.02, 0.9, ns_dtype=None), "adamw": jadam.adamw(3e-3, weight_decay=0.01)}, labels
    )
    got_recipe, _, _ = R.run_jax(recipe, shapes, 60)
  assert R.max_rel_diff(got, want) <= 1e-12
  # jadam.adamw's decay is additive, PyTorch's multiplies: equal to rounding, not to the bit.
  assert R.max_rel_diff(got_recipe, want) <= 1e-12


def test_param_groups_and_scheduler_match_torch():
  def make(tensors):
    return [
      torch.optim.Muon(
        [
          {"params": [tensors["tall"]], "lr": 0.05, "weight_decay": 0.0},
          {"params": [tensors["square"], tensors["wide"]]},
        ],
        lr=0.02,
      )
    ]

  with _torch_newton_schulz_in_float64():
    want, _ = R.run_torch(make, SHAPES, 40, scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, 5, 0.5))
  with jax.enable_x64(True):
    tx = jadam.torch.Muon(
      [{"params": "tall", "lr": 0.05, "weight_decay": 0.0}], lr=jadam.torch.StepLR(0.02, 5, 0.5), ns_dtype=None
    )
    got, _, _ = R.run_jax(tx, SHAPES, 40)
  assert R.max_rel_diff(got, want) <= 1e-12


def test_reduce_lr_on_plateau_constant_metric_equals_constant_lr():
  """Under ReduceLROnPlateau the rate lives in the plateau's state; with no plateau reached it is the constant rate."""
  with jax.enable_x64(True):
    tx = jadam.torch.Muon(lr=jadam.torch.ReduceLROnPlateau(0.02, patience=1000), ns_dtype=None)
    params = {k: jnp.ones(s) + jnp.eye(*s) for k, s in SHAPES.items()}
    state = tx.init(params)
    updates, _ = tx.update(params, state, params, value=jnp.asarray(1.0))
    plain = jadam.torch.Muon(lr=0.02, ns_dtype=None)
    want, _ = plain.update(params, plain.init(params), params)
  for k in SHAPES:  # the additive form (lr * (s O + wd theta)) rounds differently: normwise, to rounding
    assert np.max(np.abs(updates[k] - want[k])) <= 1e-14 * np.max(np.abs(want[k]))


def test_inject_hyperparams_and_schedules():
  with jax.enable_x64(True):
    plain, _, _ = R.run_jax(jadam.muon(0.02, 0.9, ns_dtype=None), SHAPES, 10)
    injected = optax.inject_hyperparams(jadam.muon, static_args=("ns_steps", "adjust_lr_fn", "ns_dtype", "nesterov"))(
      learning_rate=0.02, momentum=0.9, ns_dtype=None
    )
    got, _, _ = R.run_jax(injected, SHAPES, 10)
    scheduled, _, _ = R.run_jax(jadam.muon(lambda count: 0.02, 0.9, ns_dtype=None), SHAPES, 10)
  assert R.max_rel_diff(got, plain) <= 1e-15
  assert R.max_rel_diff(scheduled, plain) <= 1e-15


def test_refuses_what_is_not_a_matrix():
  tx = jadam.muon()
  with pytest.raises(ValueError, match=r"only takes 2-D parameters.*\['bias'\].*optax.partition"):
    tx.init({"w": jnp.ones((3, 3)), "bias": jnp.ones(3)})
  with pytest.raises(ValueError, match="2-D"):
    jadam.torch.Muon().init({"conv": jnp.ones((3, 3, 2, 2))})
  with pytest.raises(TypeError, match="complex"):
    tx.init({"w": jnp.ones((2, 2), jnp.complex64)})


@pytest.mark.parametrize(
  "kw, error, match",
  [
    (dict(lr=-1.0), ValueError, "learning rate"),
    (dict(momentum=-0.1), ValueError, "momentum"),
    (dict(weight_decay=-0.1), ValueError, "weight decay"),
    (dict(adjust_lr_fn="sqrt"), ValueError, "Adjust learning rate function sqrt is not supported"),
    (dict(ns_steps=100), ValueError, "less than 100"),
    (dict(ns_coefficients=(1.0, 2.0)), ValueError, "exactly 3 values"),
    (dict(nesterov="yes"), TypeError, "nesterov"),
    (dict(ns_dtype="int8"), TypeError, "ns_dtype"),
  ],
)
def test_front_door_refuses_bad_arguments(kw, error, match):
  with pytest.raises(error, match=match):
    jadam.torch.Muon(**kw)


def test_recipe_refuses_bad_arguments():
  with pytest.raises(ValueError, match="shape_scaling"):
    jadam.muon(adjust_lr_fn="sqrt")
  with pytest.raises(ValueError, match="ns_steps"):
    jadam.orthogonalize(ns_steps=-1)
  with pytest.raises(ValueError, match="dampening"):
    jadam.momentum(0.9, dampening=0.5, ema=True)
  with pytest.raises(TypeError, match="ema"):
    jadam.momentum(0.9, ema=1)


def test_bfloat16_params_stay_bfloat16_and_zero_grads_stay_finite():
  params = {"w": jnp.ones((4, 3), jnp.bfloat16)}
  tx = jadam.muon()
  updates, state = tx.update({"w": jnp.zeros((4, 3), jnp.bfloat16)}, tx.init(params), params)
  chex.assert_trees_all_equal_shapes_and_dtypes(updates, params)
  assert bool(jnp.all(jnp.isfinite(updates["w"].astype(jnp.float32))))  # eps keeps 0 / max(0, eps) finite
