"""benchmarks/sweep.py runs (tiny sizes), so it does not rot; its numbers are not checked here."""

from benchmarks import sweep


def test_sweep_benchmark_quick(capsys):
  sweep.main(["--models", "mlp", "--configs", "4", "--steps", "1", "--repeats", "1", "--hidden", "8", "--pieces"])
  out = capsys.readouterr().out
  assert "| mlp 784-8-10 |" in out and "| mlp | grad |" in out and "| mlp | update |" in out
