"""Compiles jadam's CPU kernels into the package: one library per instruction-set variant, and the CPU probe.

Everything else (metadata, dependencies) is in pyproject.toml. The libraries are plain shared objects loaded
with ctypes and registered as XLA FFI targets (jadam/_kernels/build.py); they do not link against Python, so the
wheel is tagged ``py3-none-<platform>``. The XLA FFI headers come from the jaxlib of the build environment
(``jaxlib/include``, what ``jax.ffi.include_dir()`` returns). ``pip install -e .`` compiles them in place, next
to the sources. ``_build_info.json`` records each library's sha256 (checked before it is loaded) and the digest of
the sources it was compiled from (a development checkout whose sources changed since builds afresh).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.bdist_wheel import bdist_wheel
from setuptools.command.build_ext import build_ext

_HERE = Path(__file__).resolve().parent
_CSRC = Path("jadam") / "_kernels" / "csrc"


def _variants_module():
  spec = importlib.util.spec_from_file_location("_jadam_variants", _HERE / "jadam" / "_kernels" / "variants.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


_V = _variants_module()


def _ffi_include_dir() -> str:
  """jaxlib's XLA FFI headers, found without importing jax (jax.ffi.include_dir() returns the same)."""
  spec = importlib.util.find_spec("jaxlib")
  if spec is None or not spec.submodule_search_locations:
    raise RuntimeError("jaxlib is a build requirement (its XLA FFI headers); install it or build with isolation")
  include = Path(next(iter(spec.submodule_search_locations))) / "include"
  if not (include / "xla" / "ffi" / "api" / "ffi.h").is_file():
    raise RuntimeError(f"no XLA FFI headers in {include}")
  return str(include)


def _compiler() -> list[str]:
  cxx = os.environ.get("CXX") or next((c for c in ("c++", "g++", "clang++") if shutil.which(c)), None)
  if not cxx:
    raise RuntimeError("jadam's kernels need a C++17 compiler (set CXX)")
  return shlex.split(cxx)


class BuildKernels(build_ext):
  """Compiles every (variant, source) pair in parallel, then links each variant's library."""

  def get_ext_filename(self, fullname: str) -> str:
    package, _, name = fullname.rpartition(".")
    return os.path.join(*package.split("."), _V.library_name(name))

  def build_extensions(self) -> None:
    cxx, include = _compiler(), _ffi_include_dir()
    tmp = Path(self.build_temp) / "jadam_kernels"
    tmp.mkdir(parents=True, exist_ok=True)
    jobs, links = [], []
    for ext in self.extensions:
      flags = [*_V.COMMON_FLAGS, *ext.extra_compile_args]
      objects = []
      for source in ext.sources:
        obj = tmp / f"{ext.name.rpartition('.')[2]}-{Path(source).stem}.o"
        jobs.append([*cxx, *flags, "-I", include, "-I", str(_CSRC), "-c", source, "-o", str(obj)])
        objects.append(str(obj))
      out = Path(self.get_ext_fullpath(ext.name))
      out.parent.mkdir(parents=True, exist_ok=True)
      links.append([*cxx, *flags, *_V.LINK_FLAGS, *objects, "-o", str(out)])
    workers = int(os.environ.get("JADAM_BUILD_JOBS", 0)) or os.cpu_count() or 1
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      for cmd, res in zip(jobs, pool.map(_run, jobs), strict=True):
        if res.returncode:
          raise RuntimeError(f"{shlex.join(cmd)} failed:\n{res.stderr[-4000:]}")
    for cmd in links:
      res = _run(cmd)
      if res.returncode:
        raise RuntimeError(f"{shlex.join(cmd)} failed:\n{res.stderr[-4000:]}")
    self._write_build_info(Path(self.get_ext_fullpath(self.extensions[0].name)).parent)

  def _write_build_info(self, out_dir: Path) -> None:
    libraries = {}
    for ext in self.extensions:
      path = Path(self.get_ext_fullpath(ext.name))
      libraries[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
    info = {"sources": _sources_digest(), "libraries": libraries}
    (out_dir / "_build_info.json").write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")

  def copy_extensions_to_source(self) -> None:
    """``pip install -e .``: the libraries and their record, next to the sources."""
    super().copy_extensions_to_source()
    if self.extensions:
      built = Path(self.build_lib) / "jadam" / "_kernels" / "_build_info.json"
      package_dir = self.get_finalized_command("build_py").get_package_dir("jadam._kernels")
      self.copy_file(str(built), os.path.join(package_dir, "_build_info.json"), level=self.verbose)

  def get_outputs(self) -> list[str]:
    outputs = super().get_outputs()
    if self.extensions:
      outputs.append(str(Path(self.get_ext_fullpath(self.extensions[0].name)).parent / "_build_info.json"))
    return outputs


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
  return subprocess.run(cmd, capture_output=True, text=True)


def _sources_digest() -> str:
  """The sha256 of every source and header (with their names), as build.py computes it."""
  h = hashlib.sha256()
  for name in sorted((_V.PROBE_SOURCE, *_V.KERNEL_SOURCES, *_V.HEADERS)):
    h.update(name.encode() + b"\0" + (_HERE / _CSRC / name).read_bytes() + b"\0")
  return h.hexdigest()


class PlatformWheel(bdist_wheel):
  """``py3-none-<platform>``: the libraries depend on the CPU and the OS, not on the Python version."""

  def get_tag(self):
    _, _, platform_tag = super().get_tag()
    return "py3", "none", platform_tag


def _extensions() -> list[Extension]:
  sources = [str(_CSRC / s) for s in _V.KERNEL_SOURCES]
  exts = [Extension("jadam._kernels.cpu", [str(_CSRC / _V.PROBE_SOURCE)])]  # no -march: the baseline
  exts += [
    Extension(f"jadam._kernels.{name}", sources, extra_compile_args=list(flags))
    for name, flags in _V.for_machine().items()
  ]
  return exts


setup(ext_modules=_extensions(), cmdclass={"build_ext": BuildKernels, "bdist_wheel": PlatformWheel})
