"""jadam's compiled CPU kernels, built at first use with the system C++ compiler.

The sources ship with the package (`SOURCES`: `adam_cpu.cc`, `sparse_adam_cpu.cc`, `finite_cpu.cc`, and
the header `pool.h` they share);
:func:`load` compiles them once into one library in a per-user cache, keyed by
a hash of every source, the compiler, the
flags, the jaxlib version and the CPU, and registers its handlers as XLA FFI
targets for the CPU platform. Nothing is downloaded. Where there is no
compiler, the build fails, or ``JADAM_NO_KERNELS=1`` is set, :func:`load`
returns False (warning once, except when disabled on purpose) and jadam keeps
its pure-XLA path.

The cache cannot crash a process: a library is loaded only if its sha256 is the
one recorded (in ``<library>.sha256``, written atomically after a successful
build) and checked before it is mapped, so a file cut short (a full disk, an
interrupted copy) or left by another build is compiled again instead of
killing the process with SIGBUS. Concurrent first uses take an `fcntl` lock:
one process builds, the others wait and load its library. Where the cache
directory cannot be written, a per-user directory under the temporary
directory serves.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import jax
import jaxlib
import numpy as np

# Compiled together into one library; each source's text is part of the cache key.
SOURCES = [Path(__file__).parent / "csrc" / name for name in ("adam_cpu.cc", "sparse_adam_cpu.cc", "finite_cpu.cc")]
HEADERS = [Path(__file__).parent / "csrc" / "pool.h"]  # included by the sources; part of the cache key too
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
FLAGS = (
  "-std=c++17",
  "-O3",
  "-march=native",
  "-ffp-contract=off",
  "-fno-math-errno",
  "-fPIC",
  "-shared",
  "-Wno-return-type",
)

_lock = threading.Lock()
_state: dict[str, object] = {}  # "ok": bool once tried; "lib": the loaded library; "error": why not


def _compiler() -> str | None:
  for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
    if name and shutil.which(name):
      return shutil.which(name)
  return None


def _cpu_id() -> str:
  """What -march=native depends on: the CPU's model and flags (Linux), else the machine."""
  try:
    with open("/proc/cpuinfo") as f:
      lines = [l for l in f if l.startswith(("model name", "flags"))][:2]
    return "".join(lines)
  except OSError:
    return platform.machine() + platform.processor()


def cache_dir() -> Path:
  root = (
    os.environ.get("JADAM_CACHE_DIR")
    or os.environ.get("XDG_CACHE_HOME")
    or os.path.join(os.path.expanduser("~"), ".cache")
  )
  return Path(root) / "jadam" / "kernels"


def _writable_dir() -> Path:
  """The cache directory, or a per-user one in the temporary directory where it cannot be written."""
  for d in (cache_dir(), Path(tempfile.gettempdir()) / f"jadam-kernels-{os.getuid() if hasattr(os, 'getuid') else 0}"):
    try:
      d.mkdir(parents=True, exist_ok=True)
      probe = tempfile.NamedTemporaryFile(dir=d, prefix=".probe-")
      probe.close()
      return d
    except OSError:
      continue
  raise RuntimeError(f"neither {cache_dir()} nor the temporary directory can be written")


def _sha256(path: Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def _write_atomically(path: Path, data: bytes) -> None:
  fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)


class _FileLock:
  """An exclusive `fcntl` lock on a file next to the library: one process builds, the others wait and load it."""

  def __init__(self, path: Path):
    self.path = path
    self.fd = None

  def __enter__(self):
    try:
      import fcntl  # pylint: disable=g-import-not-at-top
    except ImportError:  # not POSIX: no lock, the atomic renames still keep the files whole
      return self
    self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(self.fd, fcntl.LOCK_EX)
    return self

  def __exit__(self, *exc):
    if self.fd is not None:
      import fcntl  # pylint: disable=g-import-not-at-top

      fcntl.flock(self.fd, fcntl.LOCK_UN)
      os.close(self.fd)


def _recorded(out: Path, key: str) -> bool:
  """Whether `out` is the library recorded after its build: the sidecar names this key and the file's sha256."""
  try:
    recorded = out.with_name(out.name + ".sha256").read_text().split()
  except OSError:
    return False
  return len(recorded) == 2 and recorded[1] == key and out.is_file() and _sha256(out) == recorded[0]


def _key(cxx: str) -> str:
  version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout
  return hashlib.sha256(
    "\0".join(
      [
        *(f"{source.name}\0{source.read_text()}" for source in SOURCES + HEADERS),
        cxx,
        version,
        " ".join(FLAGS),
        jaxlib.__version__,
        jax.ffi.include_dir(),
        _cpu_id(),
        sys.platform,
      ]
    ).encode()
  ).hexdigest()[:24]


def _build_and_load(cxx: str) -> ctypes.CDLL:
  """The library for this source, compiler and CPU: loaded from the cache if its checksum is the recorded one, else
  (missing, cut short, from another build) compiled again; under a file lock, so concurrent first uses build once.

  The checksum is checked before `dlopen`: a truncated file mapped into memory would kill the process with SIGBUS.
  """
  key = _key(cxx)
  d = _writable_dir()
  out = d / f"adam_cpu-{key}.so"
  with _FileLock(d / f"adam_cpu-{key}.lock"):
    if not _recorded(out, key):
      _state["built"] = True
      fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=d)
      os.close(fd)
      try:
        cmd = [cxx, *FLAGS, "-I", jax.ffi.include_dir(), *map(str, SOURCES), "-o", tmp]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
          raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-2000:]}")
        digest = _sha256(Path(tmp))
        os.chmod(tmp, 0o755)
        os.replace(tmp, out)  # atomic: a reader sees the old file or the new one, never half of one
      finally:
        if os.path.exists(tmp):
          os.unlink(tmp)
      _write_atomically(out.with_name(out.name + ".sha256"), f"{digest} {key}\n".encode())
      if not _recorded(out, key):
        raise RuntimeError(f"{out} changed while it was being recorded")
    return ctypes.cdll.LoadLibrary(str(out))


def _set_quant_tables(lib: ctypes.CDLL) -> None:
  """Hands the 8-bit kernel jadam._storage.quantize's maps and code tables (copied into the library)."""
  from jadam._storage import quantize as _quantize  # pylint: disable=g-import-not-at-top

  tables = _quantize.kernel_tables()
  lib.JadamSetQuantTables.restype = None
  lib.JadamSetQuantTables(*(t.ctypes.data_as(ctypes.c_void_p) for t in tables))


def load() -> bool:
  """Builds (once) and registers the CPU kernels; False where jadam must use its XLA path."""
  with _lock:
    if "ok" in _state:
      return bool(_state["ok"])
    _state["ok"] = False
    if os.environ.get("JADAM_NO_KERNELS", "") not in ("", "0"):
      _state["error"] = "disabled by JADAM_NO_KERNELS"
      return False
    try:
      cxx = _compiler()
      if cxx is None:
        raise RuntimeError("no C++ compiler found (tried $CXX, c++, g++, clang++)")
      lib = _build_and_load(cxx)
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
    _state["lib"] = lib
    _state["ok"] = True
    return True


def loaded() -> bool:
  """Whether the kernels are registered (without trying to build them)."""
  return bool(_state.get("ok"))


def error() -> str:
  """Why the kernels are unavailable (after a failed :func:`load`)."""
  return str(_state.get("error", "not loaded"))


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
