"""Every instruction-set variant this CPU can run computes the generic step bit for bit; forcing one is checked.

Each variant runs in its own process (a process loads one library), forced with JADAM_KERNEL_ISA, on a few
configurations whose leaves exercise the vector loops' tails: the float kernel (plain, AMSGrad, decoupled decay
under a clip), bfloat16 moments, 8-bit moments, float64; and the finite check of `optax.apply_if_finite`.
The reference is the generic step op by op (eager), whose float32 rounding every variant reproduces
(`-ffp-contract=off`: no variant may fuse a multiply-add that the XLA path does not).
"""

import os
import subprocess
import sys
import textwrap
import warnings

import pytest

from jadam._kernels import build as _kernels
from jadam._kernels import variants as _variants

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CHECK = """
    import warnings
    warnings.simplefilter("error", RuntimeWarning)  # a forced variant refused, or no kernel: fail loudly
    import jax, jax.numpy as jnp, numpy as np, optax, jadam
    from jadam import _step
    from jadam._kernels import build

    assert build.load(), build.error()
    configs = {
      "adam": jadam.adam(1e-2),
      "amsgrad_l2": jadam.adam(1e-2, amsgrad=True, weight_decay=1e-2),
      "clip_adamw": optax.chain(optax.clip_by_global_norm(1.0), jadam.adamw(1e-2, weight_decay=0.1)),
      "bf16_moments": jadam.adam(1e-2, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16),
      "adam8bit": jadam.adam8bit(1e-2, block_size=256, min_8bit_size=64),
    }
    shapes = {"a": (1000,), "b": (37,), "c": (3, 4097), "d": (70001,)}

    def bits(tree):
      return [np.asarray(x).reshape(-1).view(np.uint8) for x in jax.tree.leaves(tree)]

    def check(tx, dtype):
      keys = jax.random.split(jax.random.key(0), len(shapes))
      params = {n: jax.random.normal(k, s, dtype) for (n, s), k in zip(shapes.items(), keys)}
      state = tx.init(params)
      fused = jax.jit(lambda g, s, p: _step.update_and_apply(tx, g, s, p, fused=True))
      assert "@jadam_" in fused.lower(params, state, params).as_text()
      for t in range(3):
        grads = jax.tree.map(lambda p: jnp.sin(3.0 * p + t) * jnp.exp(-3.0 * jnp.abs(p)) * (1 + t), params)
        got = fused(grads, state, params)
        updates, want_state = tx.update(grads, state, params)
        want = (optax.apply_updates(params, updates), want_state)
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for a, b in zip(bits(got), bits(want)):
          np.testing.assert_array_equal(a, b)
        params, state = got

    for name, tx in configs.items():
      check(tx, jnp.float32)
    with jax.enable_x64(True):
      check(jadam.adam(1e-2, amsgrad=True), jnp.float64)
    from jadam._kernels import fused as _fused
    finite = jax.jit(_fused.all_finite)
    leaves = {"a": jnp.ones(1000), "d": jnp.ones(70001)}
    assert "@jadam_all_finite" in finite.lower(leaves).as_text()
    assert bool(finite(leaves))
    for where in (0, 999, 70000):
      leaf = "a" if where < 1000 else "d"
      for bad in (jnp.nan, jnp.inf):
        assert not bool(finite({**leaves, leaf: leaves[leaf].at[where].set(bad)}))
    print(build.isa())
"""


def _run(code, **env):
  base = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JADAM_NO_KERNELS", "JADAM_KERNEL_ISA")}
  env = {**base, "JAX_PLATFORMS": "cpu", **env}
  return subprocess.run(
    [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, cwd=_ROOT, timeout=900
  )


@pytest.fixture(scope="module")
def runs():
  if not _kernels.load():
    pytest.skip(f"the fused kernel is unavailable here: {_kernels.error()}")
  return _kernels.supported()


@pytest.mark.parametrize("variant", list(_variants.for_machine()))
def test_each_variant_is_the_generic_step_bit_for_bit(runs, variant):
  if variant not in runs:
    pytest.skip(f"this CPU cannot run the {variant} variant")
  res = _run(_CHECK, JADAM_KERNEL_ISA=variant)
  assert res.returncode == 0, res.stderr[-4000:]
  assert res.stdout.split()[-1] == variant


def test_the_fastest_variant_is_the_default(runs):
  assert _kernels.isa() == (os.environ.get(_kernels.ISA_ENV) or runs[0])
  assert runs[-1] == "portable"


@pytest.mark.parametrize("forced", ["avx1024", "avx512vbmi"])
def test_forcing_a_variant_this_cpu_cannot_run_warns_and_takes_the_fastest(runs, monkeypatch, forced):
  monkeypatch.setitem(_kernels._state, "supported", ["avx2", "portable"])  # as an AVX2-only CPU
  monkeypatch.delitem(_kernels._state, "isa", raising=False)
  monkeypatch.setenv(_kernels.ISA_ENV, forced)
  with pytest.warns(RuntimeWarning, match=f"{_kernels.ISA_ENV}='{forced}' ignored"):
    assert _kernels.isa() == "avx2"


def test_the_probe_names_only_variants_that_exist(runs):
  assert set(runs) <= set(_variants.for_machine())
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert _kernels.describe().count("kernel ISA path") == 1


def test_the_helpers_keep_xla_where_the_kernel_is_slower_on_this_path(runs, monkeypatch):
  """Where build._SLOWER_THAN_XLA lists a configuration for this process's path, fused=None takes XLA there and
  fused=True still the kernel; a configuration it does not list takes the kernel."""
  import jax.numpy as jnp

  import jadam

  monkeypatch.setitem(_kernels._state, "isa", "avx2")
  monkeypatch.setitem(_kernels._SLOWER_THAN_XLA, "avx2", frozenset({(True, "float")}))
  p = jnp.linspace(-1.0, 1.0, 1000)
  for tx, default in ((jadam.adam(1e-2, amsgrad=True), False), (jadam.adam(1e-2), True)):
    hlo = {f: jadam.make_update_step(tx, fused=f).lower(p, tx.init(p), p).as_text() for f in (None, True)}
    assert ("@jadam_adam_f32" in hlo[None]) == default
    assert "@jadam_adam_f32" in hlo[True]
