"""The benchmark scripts run (tiny sizes), so they do not rot; their numbers are not checked here."""

import jax
import pytest

from benchmarks import memory, step_time


def test_step_time_quick(capsys):
  with jax.numpy_dtype_promotion("standard"):  # optax.adam needs it; the benchmark runs without conftest
    step_time.main(["--quick", "--no-torch", "--steps", "2"])
  out = capsys.readouterr().out
  for title in (
    "flat vector, 10,000",
    "30-leaf tree",
    "MNIST CNN",
    "12 leaves of 2K-18K",
    "ResNet-50 parameter shapes",
  ):
    assert title in out
  assert "| jadam.adam |" in out and "| optax.adam |" in out
  assert "| yes |" in out.split("12 leaves")[1].split("###")[0]  # the small leaves take the kernel
  assert "configurations, 10,000" in out and "| torch.AdamW two groups |" in out and "| yes |" in out
  assert "| jadam.adam8bit (fused kernel) |" in out and "| adam8bit |" in out


def test_step_time_quick_with_torch(capsys):
  pytest.importorskip("torch")
  with jax.numpy_dtype_promotion("standard"):
    step_time.main(["--quick", "--steps", "1", "--only", "vector", "--sizes", "1e3"])
  assert "| torch Adam fused=True |" in capsys.readouterr().out


def test_memory_one():
  with jax.numpy_dtype_promotion("standard"):
    fp32 = memory.measure_one("jadam.adam", 1 << 16, steps=1)
    bf16 = memory.measure_one("jadam.adam bf16 moments", 1 << 16, steps=1)
  assert fp32["state_bytes_per_param"] == 8 and bf16["state_bytes_per_param"] == 4
  assert bf16["compiled_bytes"] < fp32["compiled_bytes"]


def test_sparse_small(capsys):
  from benchmarks import sparse

  sparse.main(["--rows", "5000", "--ids", "64", "--steps", "1"])
  out = capsys.readouterr().out
  assert "jadam sparse_adam" in out and "jadam adam, dense" in out and "sparse / dense" in out


def test_sharded_small(capsys):
  if jax.device_count() < 8:
    pytest.skip("needs 8 (simulated) devices; see conftest.py")
  from benchmarks import sharded

  rows = sharded.main(["--sizes", "1e5", "--steps", "1"])
  assert [r["layout"] for r in rows] == ["FSDP", "ZeRO-1", "data parallel"] and all(r["served"] for r in rows)
  assert [r["per_device"] / r["whole"] for r in rows[:2]] == pytest.approx([1 / 8, 1 / 8], abs=1e-3)  # the counts
  assert "kernel ISA path" in capsys.readouterr().out
