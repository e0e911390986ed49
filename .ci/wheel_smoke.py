"""The installed wheel, from outside the checkout: jadam imports, its kernel loads from the package with no
compiler on PATH and nothing written, and one fused step is the generic step (the stages, op by op) bit for bit.

Run by `make wheel-smoke` with the fresh virtual environment's python, from an empty directory, with HOME and
the cache directories pointing at empty ones and PATH holding the environment's bin alone.
"""

import os
import shutil
import sys
import warnings

warnings.simplefilter("error", RuntimeWarning)  # "the kernel is unavailable" must fail the check

checkout = os.path.realpath(sys.argv[1])
import jadam  # noqa: E402

where = os.path.realpath(jadam.__file__)
assert not where.startswith(os.path.join(checkout, "jadam") + os.sep), f"imported the checkout's jadam ({where})"
for cxx in ("c++", "g++", "clang++", "cc", "gcc"):
  assert shutil.which(cxx) is None, f"a compiler is on PATH: {shutil.which(cxx)}"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from jadam._kernels import build  # noqa: E402

assert build.packaged() is not None, "the wheel carries no _build_info.json"
assert not build.development(), "the installed jadam takes itself for a development checkout"
assert build.load(), build.error()
assert build._state["origin"] == "package", build._state["origin"]
print(f"jadam {jadam.__version__} from {os.path.dirname(where)}")
print(build.describe())

tx = jadam.adam(1e-2, amsgrad=True, weight_decay=1e-3)
params = {"w": jax.random.normal(jax.random.key(0), (3, 4097)), "b": jnp.linspace(-1.0, 1.0, 37)}
grads = jax.tree.map(lambda p: jnp.sin(3.0 * p), params)
state = tx.init(params)
step = jadam.make_update_step(tx, fused=True, donate=False)
assert "@jadam_adam_f32" in step.lower(params, state, grads).as_text()
got = step(params, state, grads)
updates, want_state = tx.update(grads, state, params)
want = (optax.apply_updates(params, updates), want_state)
for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
  np.testing.assert_array_equal(np.asarray(a).reshape(-1).view(np.uint8), np.asarray(b).reshape(-1).view(np.uint8))
home = os.environ["HOME"]
assert not os.listdir(home), f"wrote into HOME: {os.listdir(home)}"
print("wheel smoke test: ok")
