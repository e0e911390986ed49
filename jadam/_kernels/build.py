"""jadam's compiled CPU kernels, built at first use with the system C++ compiler.

The source ships with the package (`adam_cpu.cc`); :func:`load` compiles it
once into a per-user cache, keyed by a hash of the source, the compiler, the
flags, the jaxlib version and the CPU, and registers its handlers as XLA FFI
targets for the CPU platform. Nothing is downloaded. Where there is no
compiler, the build fails, or ``JADAM_NO_KERNELS=1`` is set, :func:`load`
returns False (warning once, except when disabled on purpose) and jadam keeps
its pure-XLA path.
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

SOURCE = Path(__file__).with_name("adam_cpu.cc")
TARGETS = {"float32": "jadam_adam_f32", "float64": "jadam_adam_f64"}
_SYMBOLS = {"jadam_adam_f32": "JadamAdamF32", "jadam_adam_f64": "JadamAdamF64"}
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


def _build(cxx: str) -> Path:
  """Compiles the source into the cache (atomically) unless it is already there; returns the library."""
  version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout
  key = hashlib.sha256(
    "\0".join(
      [
        SOURCE.read_text(),
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
  out = cache_dir() / f"adam_cpu-{key}.so"
  if out.exists():
    return out
  out.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
  os.close(fd)
  try:
    cmd = [cxx, *FLAGS, "-I", jax.ffi.include_dir(), str(SOURCE), "-o", tmp]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
      raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-2000:]}")
    os.replace(tmp, out)  # atomic: a concurrent build writes the same bytes
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
  return out


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
      lib = ctypes.cdll.LoadLibrary(str(_build(cxx)))
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
