"""The C++ kernels' scalar layouts, mode bits and hash constants equal jadam._kernels.abi's table.

The table is the one statement on the Python side; these tests parse the C++
sources and compare, so a reordered enum or a changed constant fails here
instead of silently scrambling the kernels' scalars.
"""

import re
from pathlib import Path

import pytest

from jadam._kernels import abi

CSRC = Path(abi.__file__).parent / "csrc"


def _enum(source: str, name: str) -> list[tuple[str, int]]:
  """The members of `enum name` (implicit values counted as C++ does), comments stripped."""
  match = re.search(r"enum\s+" + name + r"\b[^{]*\{(.*?)\};", source, re.S)
  assert match, f"enum {name} not found"
  body = re.sub(r"//[^\n]*", "", match.group(1))
  out, value = [], -1
  for item in (x.strip() for x in body.split(",")):
    if not item:
      continue
    key, _, given = item.partition("=")
    value = int(given.strip(), 0) if given.strip() else value + 1
    out.append((key.strip(), value))
  return out


def test_dense_scalar_layout():
  found = _enum((CSRC / "adam_cpu.cc").read_text(), "Scalar")
  assert found == [(cc, i) for i, (cc, _) in enumerate(abi.SCALARS)] + [("kNumScalars", abi.N_SCALARS)]


def test_mode_bits():
  found = _enum((CSRC / "adam_cpu.cc").read_text(), "Mode")
  assert found == [(cc, bit) for cc, _, bit in abi.MODES]


def test_sparse_scalar_layout():
  found = _enum((CSRC / "sparse_adam_cpu.cc").read_text(), "SparseScalar")
  want = [(cc, i) for i, (cc, _) in enumerate(abi.SPARSE_SCALARS)] + [("kNumSparseScalars", abi.N_SPARSE_SCALARS)]
  assert found == want


def test_hash_constants():
  """HashBits and the step term of the bfloat16 kernel are jadam._storage.bf16.hash_bits's."""
  source = (CSRC / "adam_cpu.cc").read_text()
  body = re.search(r"inline (?:uint32_t|U) HashBits\([^)]*\)\s*\{(.*?)\n\}", source, re.S).group(1)
  constants = [int(x, 16) for x in re.findall(r"0x([0-9A-Fa-f]+)u", body)]
  assert constants == [abi.HASH["index"], abi.HASH["fmix1"], abi.HASH["fmix2"]]
  assert re.findall(r"\bh \^= h >> (\d+);", body) == ["16", "13"]  # murmur3's fmix32 shifts, as hash_bits
  step = re.search(r"t_term = iv\[0\] \* 0x([0-9A-Fa-f]+)u", source)
  assert step and int(step.group(1), 16) == abi.HASH["step"]


def test_stream_offsets():
  """The offsets Python passes per stream are the stream multiplier's multiples, mod 2**32."""
  from jadam._storage import bf16

  for stream in (0, 1, 7, 2**20 + 3):
    assert bf16.stream_offset(stream) == (stream * abi.HASH["stream"]) % 2**32


@pytest.mark.parametrize("table", [abi.SCALARS, abi.SPARSE_SCALARS])
def test_python_names_unique(table):
  assert len({py for _, py in table}) == len(table) and len({cc for cc, _ in table}) == len(table)
