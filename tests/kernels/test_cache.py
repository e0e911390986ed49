"""The development build's cache: private to its user, never crashes a process, never blocks one for long.

An installed jadam loads its libraries from the package and builds nothing (.ci/run's wheel smoke test checks
that from outside the checkout); a development checkout builds the variant its CPU takes at first use, into a
private cache. Each end-to-end case runs in fresh subprocesses (a process loads the library once) that take the
development build whatever the checkout holds, each with its own JADAM_CACHE_DIR; the libraries are compiled
once for the module and copied into each case's cache, and the cases damage, remove or race for the CPU probe's
small library (the cache treats every library alike), so that their rebuilds take a second, not a minute. The
ownership and mode checks are unit tests with `os.stat`, `os.lstat` and `os.getuid` replaced: as root, real
files of another owner are no test.
"""

import fcntl
import os
import shutil
import stat
import subprocess
import sys
import textwrap

import pytest

from jadam._kernels import build as _kernels

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_PROBE = """
    import warnings
    warnings.simplefilter("always")
    from jadam._kernels import build
    build.packaged = lambda: None  # the development build, even where the checkout holds an in-place build
    with warnings.catch_warnings(record=True) as caught:
      ok = build.load()
    import jax, jax.numpy as jnp, jadam
    tx = jadam.adam(1e-2)
    p = jnp.linspace(-1.0, 1.0, 100)
    hlo = jadam.make_update_step(tx).lower(p, tx.init(p), p).as_text()
    got, _ = jadam.make_update_step(tx)(jnp.array(p), tx.init(p), jnp.cos(p))
    print(ok, bool(build._state.get("built")), "@jadam_adam_f32" in hlo, len(caught), float(got[0]))
    print(repr(build.error()))
"""


def _start(code, cache, **env):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JADAM_CACHE_DIR": str(cache), **env}
  for name in ("XLA_FLAGS", "JADAM_NO_KERNELS", "JADAM_KERNEL_ISA"):
    env.pop(name, None)
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
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, (proc.returncode, err[-3000:])  # a SIGBUS would read -7 (135 from a shell)
  lines = out.splitlines()
  ok, built, kernel, warned, value = lines[0].split()
  return ok == "True", built == "True", kernel == "True", int(warned), float(value)


def _error(cache, **env):
  proc = _start(_PROBE, cache, **env)
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, (proc.returncode, err[-3000:])
  return out.splitlines()[1]


@pytest.fixture(scope="module")
def seed(tmp_path_factory):
  """A cache holding the probe's and this CPU's variant's libraries and their records, built once."""
  if not _kernels.development():
    pytest.skip("not a development checkout: nothing is built at run time")
  if not _kernels._compiler():
    pytest.skip("no C++ compiler")
  cache = tmp_path_factory.mktemp("seed")
  ok, built, kernel, warned, value = _probe(cache)
  assert (ok, built, kernel, warned) == (True, True, True, 0)
  return cache, value


def _copy(seed_dir, dst):
  """The seed cache copied to `dst`; the probe's library in it and its record."""
  shutil.copytree(seed_dir, dst)
  kernels = dst / "jadam" / "kernels"
  (lib,) = kernels.glob("libjadam_cpu-*.so")
  return lib, lib.with_name(lib.name + ".sha256")


def test_a_recorded_library_is_loaded_without_a_build(seed, tmp_path):
  _copy(seed[0], tmp_path / "c")
  assert _probe(tmp_path / "c") == (True, False, True, 0, seed[1])


def test_a_truncated_library_is_rebuilt_not_mapped(seed, tmp_path):
  lib, record = _copy(seed[0], tmp_path / "c")
  with open(lib, "r+b") as f:  # cut short, as by a full disk: mapping it would raise SIGBUS
    f.truncate(os.path.getsize(lib) // 2)
  assert _probe(tmp_path / "c") == (True, True, True, 0, seed[1])
  assert _kernels._sha256(lib.read_bytes()) == record.read_text().split()[0]


def test_a_truncated_library_with_a_matching_record_is_rebuilt_not_mapped(seed, tmp_path):
  lib, record = _copy(seed[0], tmp_path / "c")
  key = record.read_text().split()[1]
  with open(lib, "r+b") as f:
    f.truncate(os.path.getsize(lib) * 3 // 4)  # the section headers and the end of a segment gone
  record.write_text(f"{_kernels._sha256(lib.read_bytes())} {key}\n")  # a record rewritten to match
  assert not _kernels._elf_whole(lib.read_bytes())
  assert _probe(tmp_path / "c") == (True, True, True, 0, seed[1])


def test_a_library_from_another_build_is_rebuilt(seed, tmp_path):
  lib, record = _copy(seed[0], tmp_path / "c")
  # another source version's library under this name, with its own (consistent) record
  other = shutil.which("true") or sys.executable
  shutil.copyfile(other, lib)
  record.write_text(f"{_kernels._sha256(lib.read_bytes())} 0123456789abcdef01234567\n")
  assert _probe(tmp_path / "c") == (True, True, True, 0, seed[1])


def test_concurrent_first_uses_build_once_and_all_load(seed, tmp_path):
  lib, _ = _copy(seed[0], tmp_path / "c")
  lib.unlink()  # the four race for the probe's build
  procs = [_start(_PROBE, tmp_path / "c") for _ in range(4)]
  results = []
  for proc in procs:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    results.append(out.split())
  assert all(r[0] == "True" and r[2] == "True" and r[3] == "0" for r in results), results
  assert sum(r[1] == "True" for r in results) == 1, results  # one build; the others waited and loaded it
  assert {float(r[4]) for r in results} == {seed[1]}
  assert len(list((tmp_path / "c" / "jadam" / "kernels").glob("libjadam_cpu-*.so"))) == 1


def test_a_held_build_lock_times_out_to_the_xla_path(seed, tmp_path):
  """A build stopped (Ctrl-Z) in another shell holds the lock: the step waits JADAM_BUILD_TIMEOUT, then goes on."""
  lib, _ = _copy(seed[0], tmp_path / "c")
  lib.unlink()
  fd = os.open(f"{lib}.lock", os.O_RDWR | os.O_CREAT, 0o600)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX)
    assert _probe(tmp_path / "c", JADAM_BUILD_TIMEOUT="2")[:4] == (False, False, False, 1)
    assert "another process has been building" in _error(tmp_path / "c", JADAM_BUILD_TIMEOUT="2")
  finally:
    os.close(fd)


def test_a_hung_compiler_times_out_to_the_xla_path(seed, tmp_path):
  lib, _ = _copy(seed[0], tmp_path / "c")
  lib.unlink()
  hang = tmp_path / "hang"
  hang.write_text('#!/bin/sh\n[ "$1" = --version ] && exec echo hang 1.0\nexec sleep 600\n')
  hang.chmod(0o700)
  # a new compiler is a new cache key: the probe's build hangs first, and times out the same way (tried, gave up)
  assert _probe(tmp_path / "c", CXX=str(hang), JADAM_BUILD_TIMEOUT="2")[:4] == (False, True, False, 1)


def test_a_cache_writable_by_others_is_refused(seed, tmp_path):
  _copy(seed[0], tmp_path / "c")
  kernels = tmp_path / "c" / "jadam" / "kernels"
  kernels.chmod(0o777)
  assert _probe(tmp_path / "c")[:4] == (False, False, False, 1)
  assert "writable by others" in _error(tmp_path / "c")


def test_the_cache_is_created_private_whatever_the_umask(tmp_path):
  code = """
    import os
    os.umask(0)
    from jadam._kernels import build
    print(build._private_dir())
  """
  proc = _start(code, tmp_path / "new")
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  assert out.strip() == str(tmp_path / "new" / "jadam" / "kernels")
  for d in (tmp_path / "new", tmp_path / "new" / "jadam", tmp_path / "new" / "jadam" / "kernels"):
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700, d


def test_what_the_build_writes_is_private(seed):
  for f in (seed[0] / "jadam" / "kernels").iterdir():
    assert not os.stat(f).st_mode & (stat.S_IRWXG | stat.S_IRWXO), f


# --- the ownership and mode checks, with faked owners and modes ---------------------------------------------------


class _Stat:
  def __init__(self, uid, mode):
    self.st_uid, self.st_mode = uid, mode


@pytest.fixture
def fake_fs(monkeypatch):
  """os.stat/os.lstat answer from a table {path: (uid, mode)}; os.getuid() is 1000."""
  table = {}

  def fake(path, *args, **kwargs):
    return _Stat(*table[str(path)])

  monkeypatch.setattr(os, "stat", fake)
  monkeypatch.setattr(os, "lstat", fake)
  monkeypatch.setattr(os, "getuid", lambda: 1000)
  return table


def _tree(table, cache_mode=0o40700, cache_uid=1000, home=(1000, 0o40755), top=(0, 0o40755)):
  table.update(
    {"/": (0, 0o40755), "/home": top, "/home/u": home, "/home/u/.cache": (1000, 0o40700)},
  )
  table["/home/u/.cache/jadam"] = (1000, 0o40700)
  table["/home/u/.cache/jadam/kernels"] = (cache_uid, cache_mode)


def test_a_private_cache_passes(fake_fs):
  _tree(fake_fs)
  _kernels._check_private(_kernels.Path("/home/u/.cache/jadam/kernels"))


@pytest.mark.parametrize(
  "tree, why",
  [
    (dict(cache_uid=1001), "owned by uid 1001, not by this user"),
    (dict(cache_uid=0), "owned by uid 0, not by this user"),
    (dict(cache_mode=0o40770), "writable by others"),
    (dict(cache_mode=0o40702), "writable by others"),
    (dict(cache_mode=0o120777), "not a directory"),  # a symbolic link: refused, not followed
    (dict(home=(1001, 0o40755)), "above the kernel cache, is owned by uid 1001"),
    (dict(top=(0, 0o40777)), "above the kernel cache, is writable by others"),
  ],
)
def test_a_cache_others_could_write_or_replace_is_refused(fake_fs, tree, why):
  _tree(fake_fs, **tree)
  with pytest.raises(_kernels._Refused, match=why):
    _kernels._check_private(_kernels.Path("/home/u/.cache/jadam/kernels"))


def test_a_sticky_world_writable_directory_above_is_allowed(fake_fs):
  _tree(fake_fs, top=(0, 0o41777))  # as /tmp: others cannot rename or remove what is ours in it
  _kernels._check_private(_kernels.Path("/home/u/.cache/jadam/kernels"))


def test_an_installed_jadam_never_builds(monkeypatch):
  monkeypatch.setattr(_kernels, "development", lambda: False)
  with pytest.raises(_kernels._Refused, match="builds none at run time"):
    _kernels._dev_build("portable")


def test_the_elf_check_accepts_a_whole_library_and_refuses_a_cut_one():
  data = open(sys.executable, "rb").read()
  if data[:4] != b"\x7fELF":
    pytest.skip("not an ELF platform")
  assert _kernels._elf_whole(data)
  assert not _kernels._elf_whole(data[: len(data) // 2])
  assert not _kernels._elf_whole(data[:40])
