"""Test configuration: 8 CPU devices for sharding/pmap tests, strict dtype promotion."""

import os

# Before jax is imported anywhere: simulated CPU devices for shard_map, pmap and
# NamedSharding tests (equinox's conftest does the same).
# Added to any XLA_FLAGS already set (e.g. `--xla_cpu_max_isa=AVX2` in `make test-isa`), not replaced by them.
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402

# Implicit promotions hide dtype bugs (a float32 hyperparameter silently
# widening a bfloat16 update); jadam must be correct under the strict rules.
jax.config.update("jax_numpy_dtype_promotion", "strict")
