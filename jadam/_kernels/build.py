"""jadam's compiled CPU kernels: which library serves this CPU, and how it is loaded and registered.

**Installed** (a wheel, ``pip install .``, or ``pip install -e .``, which compiles in place): the package holds one
library per instruction-set variant (:mod:`jadam._kernels.variants`: ``avx512vbmi``, ``avx512``, ``avx2``,
``portable`` on x86-64; ``portable`` elsewhere), the CPU probe ``libjadam_cpu.so`` and ``_build_info.json``, which
records each library's sha256. :func:`load` asks the probe which variants this CPU and its OS can run, takes the
fastest (or the one ``JADAM_KERNEL_ISA`` names, if the CPU can run it), checks its sha256 and that the file is
whole, and registers its handlers as XLA FFI targets for the CPU. Nothing is compiled or written at run time, and
no compiler is needed.

**Development checkout** (sources next to the package, no libraries built from these sources): the variant this
CPU takes is compiled at first use into a private per-user cache, ``$JADAM_CACHE_DIR``, else
``$XDG_CACHE_HOME/jadam/kernels``, else ``~/.cache/jadam/kernels``. That directory is created 0700 and used only if
it, and every directory above it, is owned by the user (or root) and writable by no one else (a sticky directory
such as ``/tmp`` excepted); otherwise there is no kernel, with a warning. One process builds, under a lock taken
only to build and waited for at most ``JADAM_BUILD_TIMEOUT`` seconds (default 300; the compiler gets as long), after
which the step takes the XLA path with a warning. A library is loaded only from bytes whose sha256 is the one
recorded at its build and whose ELF segments all lie within the file (a file cut short would kill the process
with SIGBUS when mapped); on Linux those very bytes are loaded, from an anonymous in-memory file, so the cache file
cannot change between the check and the load.

Where there is no library, the build fails, or ``JADAM_NO_KERNELS=1`` is set, :func:`load` returns False (warning
once, except when disabled on purpose) and jadam keeps its pure-XLA path.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import hashlib
import json
import os
import shlex
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import jax
import jaxlib
import numpy as np

from jadam._kernels import variants as _variants

_HERE = Path(__file__).resolve().parent
_CSRC = _HERE / "csrc"
TARGETS = {
  "float32": "jadam_adam_f32",
  "float64": "jadam_adam_f64",
  "bfloat16": "jadam_adam_f32_bf16",
  "8bit": "jadam_adam_f32_q8",
}
SPARSE_TARGETS = {"float32": "jadam_sparse_adam_f32", "float64": "jadam_sparse_adam_f64"}
ALL_FINITE_TARGET = "jadam_all_finite"
_SYMBOLS = {
  "jadam_adam_f32": "JadamAdamF32",
  "jadam_adam_f64": "JadamAdamF64",
  "jadam_adam_f32_bf16": "JadamAdamF32Bf16",
  "jadam_adam_f32_q8": "JadamAdamF32Q8",
  "jadam_sparse_adam_f32": "JadamSparseAdamF32",
  "jadam_sparse_adam_f64": "JadamSparseAdamF64",
  "jadam_all_finite": "JadamAllFinite",
}
ISA_ENV = "JADAM_KERNEL_ISA"
_FEATURE_BITS = {"avx2": 1, "avx512": 2, "avx512vbmi": 4}  # JadamCpuFeatures() in csrc/cpu_features.cc

# Where, on each variant, the kernel is slower than the XLA path it replaces (benchmarks.step_time --only configs,
# benchmarks.adam8bit_speed, XLA limited to the same ISA): the step helpers keep the XLA path there unless
# fused=True. Keys: (amsgrad, moments) with moments "float", "bfloat16" or "8bit". Measured on an AMD EPYC (Zen 4,
# 2 cores, loaded), kernel pinned to one core beside XLA: since every path runs the step in explicit vectors
# (csrc/simd.h), no configuration is slower than XLA on any path; AMSGrad, the last one, takes 0.2-0.3x XLA's
# step on the AVX2 and portable paths (2M float32 parameters), where the scalar loop it replaced took 2.7x.
_SLOWER_THAN_XLA: dict[str, frozenset[tuple[bool, str]]] = {
  "avx512vbmi": frozenset(),
  "avx512": frozenset(),
  "avx2": frozenset(),
  "portable": frozenset(),
}

_lock = threading.Lock()
_state: dict[str, Any] = {}  # "ok": bool once tried; "lib", "isa", "origin"; "error": why not


class _Refused(Exception):
  """No kernel here, for a reason worth a warning."""


# --- which variant -------------------------------------------------------------------------------------------------


def packaged() -> dict | None:
  """``_build_info.json`` of libraries compiled from these very sources, or None (not built, or stale sources)."""
  try:
    info = json.loads((_HERE / "_build_info.json").read_text())
  except (OSError, ValueError):
    return None
  if _CSRC.is_dir() and info.get("sources") != sources_digest():
    return None  # a development checkout whose C++ changed since it was built in place
  return info


def development() -> bool:
  """Whether this is a source checkout (it may build its kernels at first use); never an installed wheel."""
  root = _HERE.parent.parent
  return (root / "pyproject.toml").is_file() and (root / "setup.py").is_file() and _CSRC.is_dir()


def sources_digest() -> str:
  """The sha256 of every C++ source and header with its name, as setup.py records it in ``_build_info.json``."""
  h = hashlib.sha256()
  for name in sorted((_variants.PROBE_SOURCE, *_variants.KERNEL_SOURCES, *_variants.HEADERS)):
    h.update(name.encode() + b"\0" + (_CSRC / name).read_bytes() + b"\0")
  return h.hexdigest()


def supported() -> list[str]:
  """The variants this CPU and its OS can run, fastest first (``portable`` always)."""
  if "supported" not in _state:
    features = _probe().JadamCpuFeatures()
    _state["supported"] = [v for v in _variants.for_machine() if features & _FEATURE_BITS.get(v, 0) or v == "portable"]
  return list(_state["supported"])


def isa() -> str:
  """The variant this process uses: ``JADAM_KERNEL_ISA`` where this CPU can run it, else the fastest it can.

  Forcing a variant the CPU cannot run (or one that does not exist) warns and takes the fastest one instead:
  an illegal instruction would kill the process.
  """
  if "isa" not in _state:
    runs = supported()
    want = os.environ.get(ISA_ENV, "").strip().lower()
    if want and want not in runs:
      known = list(_variants.for_machine())
      why = "this CPU cannot run it" if want in known else f"it is not one of {known}"
      warnings.warn(f"jadam: {ISA_ENV}={want!r} ignored ({why}); using {runs[0]!r}", RuntimeWarning, stacklevel=2)
    _state["isa"] = want if want in runs else runs[0]
  return str(_state["isa"])


def kernel_prefers(*, amsgrad: bool, moments: str) -> bool:
  """Whether the kernel is faster than the XLA path for this configuration on this process's variant.

  `moments` is ``"float"``, ``"bfloat16"`` or ``"8bit"``. Read where the step helpers choose the kernel
  (``fused=None``); ``fused=True`` runs the kernel regardless.
  """
  return (bool(amsgrad), moments) not in _SLOWER_THAN_XLA.get(isa(), frozenset())


# --- loading -------------------------------------------------------------------------------------------------------


def _sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def _elf_whole(data: bytes) -> bool:
  """Whether every part of a 64-bit ELF file that the loader maps or reads lies within `data`.

  A file cut short maps without complaint and kills the process with SIGBUS when a missing page is touched;
  a digest only says the bytes are the recorded ones, so check the structure too. Not ELF (macOS): True.
  """
  if data[:4] != b"\x7fELF":
    return sys.platform != "linux"
  if len(data) < 64 or data[4] != 2 or data[5] != 1:  # 64-bit, little-endian: what we build
    return False
  phoff, shoff = struct.unpack_from("<QQ", data, 32)
  phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", data, 54)
  if phoff + phnum * phentsize > len(data) or shoff + shnum * shentsize > len(data):
    return False
  for i in range(phnum):
    p_type, _, p_offset, _, _, p_filesz = struct.unpack_from("<IIQQQQ", data, phoff + i * phentsize)
    if p_type == 1 and p_offset + p_filesz > len(data):  # PT_LOAD
      return False
  return True


def _load_bytes(data: bytes, digest: str, name: str, path: Path | None) -> ctypes.CDLL:
  """dlopen the library `data`, after checking its sha256 and its ELF structure.

  With `path` (the installed package's own file) the file is loaded by name; without, `data` itself is loaded
  from an anonymous in-memory file (Linux), else from a fresh private copy, so that no other file can be
  substituted between the check and the load.
  """
  if _sha256(data) != digest:
    raise _Refused(f"{name} is not the library recorded at its build (sha256 differs)")
  if not _elf_whole(data):
    raise _Refused(f"{name} is damaged (cut short)")
  if path is not None:
    return ctypes.CDLL(str(path))
  if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
    fd = os.memfd_create(name, 0)
    os.write(fd, data)
    _state.setdefault("fds", []).append(fd)  # kept open: the mapping outlives it anyway, the name stays unique
    return ctypes.CDLL(f"/proc/self/fd/{fd}")
  fd, tmp = tempfile.mkstemp(suffix=".so")  # 0600, a fresh name
  with os.fdopen(fd, "wb") as f:
    f.write(data)
  try:
    return ctypes.CDLL(tmp)
  finally:
    os.unlink(tmp)


def _load_packaged(info: dict, variant: str) -> ctypes.CDLL:
  name = _variants.library_name(variant)
  digest = info.get("libraries", {}).get(name)
  if digest is None:
    raise _Refused(f"the installed jadam has no {name}")
  path = _HERE / name
  return _load_bytes(path.read_bytes(), digest, name, path)


def _probe() -> ctypes.CDLL:
  if "probe" not in _state:
    info = packaged()
    if info is not None:
      lib = _load_packaged(info, "cpu")
    elif development():
      lib = _dev_build("cpu")
    else:
      raise _Refused("the installed jadam has no kernel libraries (it was built without them)")
    lib.JadamCpuFeatures.restype = ctypes.c_int
    _state["probe"] = lib
  return _state["probe"]


def _set_quant_tables(lib: ctypes.CDLL) -> None:
  """Hands the 8-bit kernel jadam._storage.quantize's maps and code tables (copied into the library)."""
  from jadam._storage import quantize as _quantize  # pylint: disable=g-import-not-at-top

  tables = _quantize.kernel_tables()
  lib.JadamSetQuantTables.restype = None
  lib.JadamSetQuantTables(*(t.ctypes.data_as(ctypes.c_void_p) for t in tables))


def load() -> bool:
  """Loads (in a development checkout: builds, once) and registers the CPU kernels; False where jadam must use its
  XLA path."""
  with _lock:
    if "ok" in _state:
      return bool(_state["ok"])
    _state["ok"] = False
    if os.environ.get("JADAM_NO_KERNELS", "") not in ("", "0"):
      _state["error"] = "disabled by JADAM_NO_KERNELS"
      return False
    try:
      variant = isa()
      info = packaged()
      if info is not None:
        lib, origin = _load_packaged(info, variant), "package"
      else:
        lib, origin = _dev_build(variant), "development build"
      _set_quant_tables(lib)
      for target, symbol in _SYMBOLS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    except Exception as e:  # noqa: BLE001 - any failure means: use the XLA path
      _state["error"] = f"{type(e).__name__}: {e}"
      warnings.warn(
        f"jadam: the fused CPU Adam kernel is unavailable ({_state['error']}); using the pure-XLA"
        " path, which is correct but makes three passes over memory. Set JADAM_NO_KERNELS=1 to"
        " silence this.",
        RuntimeWarning,
        stacklevel=3,
      )
      return False
    _state.update(lib=lib, origin=origin, ok=True)
    return True


def loaded() -> bool:
  """Whether the kernels are registered (without trying to load them)."""
  return bool(_state.get("ok"))


def error() -> str:
  """Why the kernels are unavailable (after a failed :func:`load`)."""
  return str(_state.get("error", "not loaded"))


def describe() -> str:
  """One line for benchmarks and bug reports: the CPU, the variant, where the library came from."""
  cpu = cpu_model()
  if not load():
    return f"{cpu}; kernel unavailable ({error()})"
  return f"{cpu}; kernel ISA path {isa()} (this CPU runs {', '.join(supported())}); from the {_state['origin']}"


def cpu_model() -> str:
  """The CPU's model name (Linux's /proc/cpuinfo; elsewhere the platform's processor string)."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  import platform  # pylint: disable=g-import-not-at-top

  return platform.processor() or platform.machine()


# --- the development build -----------------------------------------------------------------------------------------


def _compiler() -> list[str] | None:
  for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
    found = shutil.which(shlex.split(name)[0]) if name else None
    if name and found:
      return [found, *shlex.split(name)[1:]]
  return None


def _timeout() -> float:
  return float(os.environ.get("JADAM_BUILD_TIMEOUT", "300"))


def cache_dir() -> Path:
  root = (
    os.environ.get("JADAM_CACHE_DIR")
    or os.environ.get("XDG_CACHE_HOME")
    or os.path.join(os.path.expanduser("~"), ".cache")
  )
  return Path(root) / "jadam" / "kernels"


def _check_private(path: Path) -> None:
  """Raises _Refused unless `path` is a directory of this user's that no one else can write, nor replace: every
  directory above it owned by the user or root and writable by no one else, or sticky (as /tmp)."""
  uid = os.getuid()
  st = os.lstat(path)
  if not stat.S_ISDIR(st.st_mode):
    raise _Refused(f"the kernel cache {path} is not a directory")
  if st.st_uid != uid:
    raise _Refused(f"the kernel cache {path} is owned by uid {st.st_uid}, not by this user ({uid})")
  if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
    raise _Refused(f"the kernel cache {path} is writable by others (mode {stat.S_IMODE(st.st_mode):o})")
  for parent in path.parents:
    st = os.stat(parent)
    if st.st_uid not in (uid, 0):
      raise _Refused(f"{parent}, above the kernel cache, is owned by uid {st.st_uid}")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
      raise _Refused(f"{parent}, above the kernel cache, is writable by others (mode {stat.S_IMODE(st.st_mode):o})")


def _private_dir() -> Path:
  """The kernel cache, created 0700 where missing and checked private (or _Refused)."""
  if not hasattr(os, "getuid"):
    raise _Refused("no per-user cache on this platform (no getuid)")
  d = Path(os.path.abspath(cache_dir()))
  missing = [p for p in (d, *d.parents) if not p.exists()]
  for p in reversed(missing):
    try:
      os.mkdir(p, 0o700)
    except FileExistsError:
      pass
  _check_private(d)  # lstat: a symbolic link there is refused, not followed
  return d


def _key(cxx: list[str], variant: str) -> str:
  version = subprocess.run([*cxx, "--version"], capture_output=True, text=True, check=True, timeout=_timeout()).stdout
  flags = _variants.for_machine().get(variant, ())
  return _sha256(
    "\0".join(
      [sources_digest(), variant, *_variants.COMMON_FLAGS, *flags, *cxx, version, jaxlib.__version__, sys.platform]
    ).encode()
  )[:24]


class _BuildLock:
  """An exclusive `fcntl` lock, waited for at most `timeout` seconds (then _Refused)."""

  def __init__(self, path: Path, timeout: float):
    self.path, self.timeout = path, timeout
    self.fd = -1  # the lock file's descriptor, once open

  def __enter__(self):
    import fcntl  # pylint: disable=g-import-not-at-top

    self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
    deadline = time.monotonic() + self.timeout
    while True:
      try:
        fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return self
      except BlockingIOError:
        if time.monotonic() > deadline:
          os.close(self.fd)
          raise _Refused(
            f"another process has been building the kernel for over {self.timeout:g} s (lock {self.path};"
            " JADAM_BUILD_TIMEOUT sets the wait)"
          ) from None
        time.sleep(0.1)

  def __exit__(self, *exc):
    import fcntl  # pylint: disable=g-import-not-at-top

    fcntl.flock(self.fd, fcntl.LOCK_UN)
    os.close(self.fd)


def _recorded(out: Path, key: str) -> bytes | None:
  """The library's bytes if they are the ones recorded after its build (the sidecar names this key and their
  sha256) and whole; else None."""
  try:
    recorded = out.with_name(out.name + ".sha256").read_text().split()
    data = out.read_bytes()
  except OSError:
    return None
  ok = len(recorded) == 2 and recorded[1] == key and _sha256(data) == recorded[0] and _elf_whole(data)
  return data if ok else None


def _compile(cxx: list[str], variant: str, out: Path, timeout: float) -> bytes:
  """Compiles `variant` (or the probe, "cpu") into `out`, each source in parallel; its bytes."""
  flags = [*_variants.COMMON_FLAGS, *_variants.for_machine().get(variant, ())]
  sources = [_variants.PROBE_SOURCE] if variant == "cpu" else list(_variants.KERNEL_SOURCES)
  include = ["-I", jax.ffi.include_dir(), "-I", str(_CSRC)]
  deadline = time.monotonic() + timeout
  with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
    objects = [os.path.join(tmp, f"{i}.o") for i in range(len(sources))]
    cmds = [[*cxx, *flags, *include, "-c", str(_CSRC / s), "-o", o] for s, o in zip(sources, objects, strict=True)]
    cmds.append([*cxx, *flags, *_variants.LINK_FLAGS, *objects, "-o", os.path.join(tmp, "lib.so")])

    def run(cmd):
      left = max(deadline - time.monotonic(), 1.0)
      try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=left)
      except subprocess.TimeoutExpired:
        raise _Refused(f"the compiler took over {timeout:g} s (JADAM_BUILD_TIMEOUT): {shlex.join(cmd)}") from None

    def check(cmd, res):
      if res.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed:\n{res.stderr[-2000:]}")

    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
      for cmd, res in zip(cmds[:-1], list(pool.map(run, cmds[:-1])), strict=True):
        check(cmd, res)
    check(cmds[-1], run(cmds[-1]))
    data = Path(tmp, "lib.so").read_bytes()
    fd, part = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(part, out)  # atomic: a reader sees the old file or the new one, never half of one
  return data


def _dev_build(variant: str) -> ctypes.CDLL:
  """The library of `variant` (or the probe, "cpu") built from this checkout's sources, from the private cache:
  recorded there already, else compiled (under the build lock, one process at a time) and recorded."""
  if not development():
    raise _Refused("the installed jadam has no kernel libraries and builds none at run time")
  cxx = _compiler()
  if cxx is None:
    raise RuntimeError("no C++ compiler found (tried $CXX, c++, g++, clang++)")
  d = _private_dir()
  key = _key(cxx, variant)
  out = d / f"{_variants.library_name(variant)[:-3]}-{key}.so"
  name = out.name
  data = _recorded(out, key)
  if data is None:
    with _BuildLock(d / f"{name}.lock", _timeout()):
      data = _recorded(out, key)  # built by another process while this one waited
      if data is None:
        _state["built"] = True
        data = _compile(cxx, variant, out, _timeout())
        digest = _sha256(data)  # kept in memory: what is loaded below is checked against it, not the sidecar
        _write_atomically(out.with_name(name + ".sha256"), f"{digest} {key}\n".encode())
        return _load_bytes(data, digest, name, None)
  return _load_bytes(data, _sha256(data), name, None)  # _recorded checked the bytes against the sidecar


def _write_atomically(path: Path, data: bytes) -> None:
  fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)


def quant_codes(y: np.ndarray, signed: bool) -> np.ndarray:
  """The 8-bit kernel's codes for values `y` already scaled into [-1, 1] (no positive-v rule), by its own code
  search; for tests. Requires :func:`load`."""
  if not load():
    raise RuntimeError(f"the fused CPU kernel is unavailable: {error()}")
  y = np.ascontiguousarray(y, np.float32)
  out = np.empty(y.shape, np.uint8)
  fn = _state["lib"].JadamQuantCodes
  fn.restype = None
  fn(
    y.ctypes.data_as(ctypes.c_void_p),
    ctypes.c_int64(y.size),
    ctypes.c_int(int(signed)),
    out.ctypes.data_as(ctypes.c_void_p),
  )
  return out
