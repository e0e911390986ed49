r"""An 8-bit run handed from bitsandbytes to jadam and back: how far it ends from bitsandbytes' own run.

    python -m benchmarks.handover_8bit

bitsandbytes' AdamW8bit runs 15 steps, jadam.torch.Adam8bit continues 15 from its
state dict, bitsandbytes 15 more from jadam's; each row is the distance from
bitsandbytes' uninterrupted 45 steps, relative to the distance travelled, for:
the hand-over; jadam alone for 45 steps (the two libraries' own rounding
difference); and a hand-over that restarts the moments from zero. The problem
is `tests/torch/test_state_dict.py`'s (`test_bitsandbytes_8bit_both_ways`).
"""

from __future__ import annotations


def main() -> None:
  import bitsandbytes as bnb
  import jax
  import jax.numpy as jnp
  import numpy as np

  import jadam
  import jadam.torch as jt
  from tests.torch.test_state_dict import BNB_SHAPES, TorchName, bnb_run

  n, rng = 15, np.random.default_rng(0)
  params0 = {k: rng.normal(size=s).astype(np.float32) for k, s in BNB_SHAPES.items()}
  grads = [{k: (rng.normal(size=s) + 0.3).astype(np.float32) for k, s in BNB_SHAPES.items()} for _ in range(3 * n)]
  kw = dict(lr=1e-2, betas=(0.8, 0.99), weight_decay=0.05)
  names = {k: TorchName(k) for k in BNB_SHAPES}
  want, _ = bnb_run(bnb, params0, grads, 0, 3 * n, **kw)
  mid, opt = bnb_run(bnb, params0, grads, 0, n, **kw)
  tx = jt.Adam8bit(**kw)
  step = jax.jit(lambda g, s, p: jadam.update_and_apply(tx, g, s, p))
  params = {k: jnp.asarray(v) for k, v in mid.items()}
  state = jt.load_state_dict(tx, params, opt.state_dict(), names=names)
  fresh, fresh_state = params, tx.init(params)
  for t in range(n, 2 * n):
    g = {k: jnp.asarray(v) for k, v in grads[t].items()}
    params, state = step(g, state, params)
    fresh, fresh_state = step(g, fresh_state, fresh)
  handed, _ = bnb_run(bnb, params, grads, 2 * n, 3 * n, jt.state_dict(tx, state, params, names=names), **kw)
  restarted, _ = bnb_run(bnb, fresh, grads, 2 * n, 3 * n, **kw)
  alone = {k: jnp.asarray(v) for k, v in params0.items()}
  alone_state = tx.init(alone)
  for t in range(3 * n):
    alone, alone_state = step({k: jnp.asarray(v) for k, v in grads[t].items()}, alone_state, alone)
  print(f"{'leaf':<6} {'shape':<10} {'hand-over':>10} {'jadam alone':>12} {'restart':>10}")
  for k, shape in BNB_SHAPES.items():
    d = np.linalg.norm(want[k] - params0[k])

    def e(x, k=k, d=d):
      return np.linalg.norm(np.asarray(x[k]) - want[k]) / d

    print(f"{k:<6} {str(shape):<10} {e(handed):>10.2e} {e(alone):>12.2e} {e(restarted):>10.2e}")


if __name__ == "__main__":
  main()
