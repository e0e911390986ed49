"""The kernels' instruction-set variants: the same C++ sources compiled once per variant, with these flags.

One library per variant, so that one wheel runs on any CPU of its architecture and still uses AVX2 or AVX-512
where the CPU has them: ``build.isa()`` asks ``csrc/cpu_features.cc`` (compiled for the architecture's baseline)
which variants this CPU and its operating system can run and loads the first of them. The sources guard every
intrinsic with ``#if defined(__AVX512F__)`` (``__AVX512VBMI__``, ``__AVX2__``), and ``csrc/simd.h`` sizes its
vectors by the same macros, so the variants differ only by what the compiler may emit, never by formula;
``-ffp-contract=off`` keeps them all bitwise equal to the XLA path.

Read by ``setup.py`` at build time (loaded by path, without importing jadam or jax) and by ``build.py`` at run
time, so it imports the standard library only.
"""

from __future__ import annotations

import platform
import sys

# Every variant; no -march=native anywhere: a library must run on every CPU its variant names.
COMMON_FLAGS = (
  "-std=c++17",
  "-O3",
  "-ffp-contract=off",  # no fused multiply-add the XLA path does not do: the variants agree bitwise
  "-fno-math-errno",
  "-fPIC",
  "-Wno-return-type",
  "-Wno-attributes",  # ffi.h's always_inline on a function GCC cannot inline: harmless, and noisy
)
# On Linux, the C++ runtime linked in: the library needs only the C library, as manylinux asks, whatever
# libstdc++ the user's system (or another extension in the process) has.
LINK_FLAGS = ("-shared", "-static-libstdc++", "-static-libgcc") if sys.platform.startswith("linux") else ("-shared",)

# x86-64, fastest first. The names are what JADAM_KERNEL_ISA accepts; the levels are psABI's microarchitecture
# levels (x86-64-v3: AVX2, FMA, BMI2 ...; x86-64-v4: AVX-512 F/BW/CD/DQ/VL), as cpu_features.cc checks them.
X86_64 = {
  "avx512vbmi": ("-march=x86-64-v4", "-mavx512vbmi"),  # Ice Lake, Zen 4 and later: the 8-bit kernel's byte shuffles
  "avx512": ("-march=x86-64-v4",),  # Skylake-SP, Cascade Lake
  "avx2": ("-march=x86-64-v3",),  # Haswell, Zen 1-3 and later
  "portable": ("-march=x86-64", "-mtune=generic"),  # any x86-64
}
# Elsewhere (aarch64, ...): the architecture's baseline only; the sources have no intrinsics outside x86 guards.
OTHER = {"portable": ()}

PROBE_SOURCE = "cpu_features.cc"
KERNEL_SOURCES = ("adam_cpu.cc", "sparse_adam_cpu.cc", "finite_cpu.cc")
HEADERS = ("pool.h", "simd.h")


def for_machine(machine: str | None = None) -> dict[str, tuple[str, ...]]:
  """The variants built for `machine` (default: this one), fastest first, each with its extra compiler flags."""
  machine = (machine or platform.machine()).lower()
  return dict(X86_64) if machine in ("x86_64", "amd64", "x86-64") else dict(OTHER)


def library_name(variant: str) -> str:
  """The file name of a variant's library (``libjadam_kernels_<variant>.so``); ``cpu`` is the probe's."""
  return f"libjadam_{'cpu' if variant == 'cpu' else 'kernels_' + variant}.so"
