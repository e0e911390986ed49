"""The kernel cache never crashes a process: checksums before dlopen, one build under concurrent first uses.

Each case runs in fresh subprocesses (a process loads the library once), with
its own JADAM_CACHE_DIR. The library is compiled once for the module and
copied into each case's cache, so that only the rebuilds a case provokes cost.
"""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from jadam._kernels import build as _kernels

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_PROBE = """
    import warnings
    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as caught:
      from jadam._kernels import build
      ok = build.load()
    import jax, jax.numpy as jnp, jadam
    tx = jadam.adam(1e-2)
    p = jnp.linspace(-1.0, 1.0, 100)
    hlo = jadam.make_update_step(tx).lower(p, tx.init(p), p).as_text()
    got, _ = jadam.make_update_step(tx)(jnp.array(p), tx.init(p), jnp.cos(p))
    print(ok, bool(build._state.get("built")), "@jadam_adam_f32" in hlo, len(caught), float(got[0]))
"""


def _start(code, cache, **env):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JADAM_CACHE_DIR": str(cache), **env}
  env.pop("XLA_FLAGS", None)
  env.pop("JADAM_NO_KERNELS", None)
  return subprocess.Popen(
    [sys.executable, "-c", textwrap.dedent(code)],
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    cwd=_ROOT,
  )


def _probe(cache, **env):
  proc = _start(_PROBE, cache, **env)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, (proc.returncode, err[-3000:])  # a SIGBUS would read -7 (135 from a shell)
  ok, built, kernel, warned, value = out.split()
  return ok == "True", built == "True", kernel == "True", int(warned), float(value)


@pytest.fixture(scope="module")
def seed(tmp_path_factory):
  """A cache holding a good library and its record, built once."""
  if not _kernels._compiler():
    pytest.skip("no C++ compiler")
  cache = tmp_path_factory.mktemp("seed")
  ok, built, kernel, warned, value = _probe(cache)
  assert (ok, built, kernel, warned) == (True, True, True, 0)
  return cache, value


def _copy(seed_dir, dst):
  shutil.copytree(seed_dir, dst)
  kernels = dst / "jadam" / "kernels"
  (lib,) = kernels.glob("adam_cpu-*.so")
  return lib, lib.with_name(lib.name + ".sha256")


def test_a_recorded_library_is_loaded_without_a_build(seed, tmp_path):
  _copy(seed[0], tmp_path / "c")
  assert _probe(tmp_path / "c") == (True, False, True, 0, seed[1])


def test_a_truncated_library_is_rebuilt_not_mapped(seed, tmp_path):
  lib, record = _copy(seed[0], tmp_path / "c")
  with open(lib, "r+b") as f:  # cut short, as by a full disk: mapping it would raise SIGBUS
    f.truncate(os.path.getsize(lib) // 2)
  assert _probe(tmp_path / "c") == (True, True, True, 0, seed[1])
  assert _kernels._sha256(lib) == record.read_text().split()[0]


def test_a_library_from_another_build_is_rebuilt(seed, tmp_path):
  lib, record = _copy(seed[0], tmp_path / "c")
  # another source version's library under this name, with its own (consistent) record
  other = shutil.which("true") or sys.executable
  shutil.copyfile(other, lib)
  record.write_text(f"{_kernels._sha256(lib)} 0123456789abcdef01234567\n")
  assert _probe(tmp_path / "c") == (True, True, True, 0, seed[1])


def test_an_unwritable_cache_directory_falls_back_to_the_temporary_directory(seed, tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  tmp = tmp_path / "tmp"
  tmp.mkdir()
  fallback = tmp / f"jadam-kernels-{os.getuid()}"
  shutil.copytree(seed[0] / "jadam" / "kernels", fallback)  # a recorded library there: no build needed
  assert _probe(blocker / "cache", TMPDIR=str(tmp)) == (True, False, True, 0, seed[1])


def test_concurrent_first_uses_build_once_and_all_load(seed, tmp_path):
  procs = [_start(_PROBE, tmp_path / "c") for _ in range(4)]
  results = []
  for proc in procs:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    results.append(out.split())
  assert all(r[0] == "True" and r[2] == "True" and r[3] == "0" for r in results), results
  assert sum(r[1] == "True" for r in results) == 1, results  # one build; the others waited and loaded it
  assert {float(r[4]) for r in results} == {seed[1]}
  assert len(list((tmp_path / "c" / "jadam" / "kernels").glob("*.so"))) == 1
