"""Prints how close jadam comes to torch, optax and the NumPy reference, per optimizer.

    python -m tools.report_parity

Float64: max relative difference of the parameters over 500 steps of the noisy
quadratic (gradients fed back from the parameters), against the NumPy reference
(fed jadam's gradients), live torch and optax. Float32: max distance in ulps of
the parameters, per step (each step started from jadam's parameters and
gradient) and free-running, against torch float32 and optax float32. Not a
test; tests/parity/test_torch_parity.py asserts the bounds.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from tests.helpers import parity as _parity  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")


def main():
  try:
    import torch  # noqa: F401

    have_torch = True
  except ImportError:
    have_torch = False
  rows = []
  for name, c in _parity.CONFIGS.items():
    prob = c.problem(500)
    with jax.enable_x64(True):
      got64, grads = _parity.run_jax(c.jadam(), prob, np.float64, with_grads=True)
      ref = _parity.max_rel(got64, _parity.run_reference(c.reference, prob, grads))
      t64 = _parity.max_rel(got64, _parity.run_torch(c.torch, prob, np.float64)) if have_torch else None
      o64 = _parity.max_rel(got64, _parity.run_optax(c.optax(), prob, np.float64)) if c.optax else None
    got32, g32 = _parity.run_jax(c.jadam(), prob, np.float32, with_grads=True)
    teach = (got32, g32)
    t32 = o32 = t32_free = o32_free = None
    if have_torch:
      t32 = _parity.max_ulps(got32, _parity.run_torch(c.torch, prob, np.float32, teacher=teach))
      t32_free = _parity.max_ulps(got32, _parity.run_torch(c.torch, prob, np.float32))
    if c.optax:
      o32 = _parity.max_ulps(got32, _parity.run_optax(c.optax(), prob, np.float32, teacher=teach))
      o32_free = _parity.max_ulps(got32, _parity.run_optax(c.optax(), prob, np.float32))
    rows.append((name, ref, t64, o64, t32, o32, t32_free, o32_free))

  def f(x, fmt):
    return "-" if x is None else format(x, fmt)

  print("float64: max relative difference of the parameters over 500 steps.")
  print("float32: max ulps of the parameters; 'per step' starts every step from jadam's parameters and")
  print("gradient (the optimizer states run on their own), 'free' lets each run follow its own trajectory.")
  print()
  print(
    "| optimizer | f64 vs reference | f64 vs torch | f64 vs optax "
    "| f32 ulps/step vs torch | f32 ulps/step vs optax | f32 ulps free vs torch | f32 ulps free vs optax |"
  )
  print("| --- | --- | --- | --- | --- | --- | --- | --- |")
  for name, ref, t64, o64, t32, o32, t32f, o32f in rows:
    print(
      f"| {name} | {f(ref, '.1e')} | {f(t64, '.1e')} | {f(o64, '.1e')} "
      f"| {f(t32, 'd')} | {f(o32, 'd')} | {f(t32f, 'd')} | {f(o32f, 'd')} |"
    )
  print()
  print(stage_recipes())
  print()
  print(bias_correction_ulps())


def bias_correction_ulps():
  """jadam's float32 1 - b**t against torch's (double on the host, rounded once), t = 1..20000."""
  import jax.numpy as jnp

  from jadam._core import common as _common

  steps = np.arange(1, 20_001)
  lines = ["| b | jadam f32 ulps (t <= 20000) | naive f32 1 - b**t ulps |", "| --- | --- | --- |"]
  for b in (0.9, 0.99, 0.999, 0.9999):
    got = np.asarray(jax.jit(jax.vmap(lambda t, b=b: _common.one_minus_power(b, t)))(jnp.asarray(steps, jnp.int32)))
    want = np.asarray([1 - b ** int(t) for t in steps], np.float64).astype(np.float32)
    naive = (1 - np.float32(b) ** steps.astype(np.float32)).astype(np.float32)
    lines.append(f"| {b} | {_parity.max_ulps(got, want)} | {_parity.max_ulps(naive, want)} |")
  return "\n".join(lines)


def stage_recipes():
  """The recipes of tests/stages/test_stages.py: optax's AMSGrad and the Keras form, 500 steps."""
  import optax

  import jadam
  from tests.helpers import reference

  lr, b1, b2, eps = 1e-2, 0.85, 0.995, 1e-7

  def amsgrad_optax():
    return optax.chain(
      jadam.scale_by_moments(b1, b2), jadam.bias_correct(), jadam.max_nu(), jadam.normalize(eps), jadam.scale_by_lr(lr)
    )

  def keras():
    return optax.chain(
      jadam.scale_by_moments(0.9, 0.999),
      jadam.bias_correct(into_step=True),
      jadam.normalize(1e-7),
      jadam.scale_by_lr(1e-3),
    )

  lines = ["| recipe | f64 vs reference | f64 vs optax | f32 ulps/step vs optax |", "| --- | --- | --- | --- |"]
  prob = _parity.problem(500)
  with jax.enable_x64(True):
    got, grads = _parity.run_jax(amsgrad_optax(), prob, np.float64, with_grads=True)
    ref = _parity.max_rel(got, reference.adam(grads, prob.params, lr=lr, b1=b1, b2=b2, eps=eps, amsgrad="optax"))
    o64 = _parity.max_rel(got, _parity.run_optax(optax.amsgrad(lr, b1, b2, eps), prob, np.float64))
  got32, g32 = _parity.run_jax(amsgrad_optax(), prob, np.float32, with_grads=True)
  o32 = _parity.max_ulps(
    got32, _parity.run_optax(optax.amsgrad(lr, b1, b2, eps), prob, np.float32, teacher=(got32, g32))
  )
  lines.append(f"| max_nu after bias_correct (optax.amsgrad) | {ref:.1e} | {o64:.1e} | {o32} |")
  for scale in (1.0, 1e-7):
    prob = _parity.problem(500, scale=scale)
    with jax.enable_x64(True):
      got, grads = _parity.run_jax(keras(), prob, np.float64, with_grads=True)
    ref = _parity.max_rel(got, reference.adam(grads, prob.params, lr=1e-3, eps=1e-7, keras=True))
    std = _parity.max_rel(got, reference.adam(grads, prob.params, lr=1e-3, eps=1e-7))
    lines.append(
      f"| bias_correct(into_step=True), gradients ~{scale:g} (vs standard form: {std:.1e}) | {ref:.1e} | - | - |"
    )
  return "\n".join(lines)


if __name__ == "__main__":
  main()
