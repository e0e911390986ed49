"""The multi-host example, run briefly: 2 local processes, data parallel, then resumed as FSDP."""

import json

import pytest

from examples.mnist import input_pipeline
from examples.multihost import __main__ as cli
from tests.helpers import processes

SMALL = [
  "--train-limit", "256", "--test-limit", "200", "--batch-size", "32", "--eval-batch-size", "100",
  "--data-dir", str(input_pipeline.SAMPLE_DIR), "--no-progress", "--no-plot", "--timeout", "240",
]  # fmt: skip


def test_two_processes_train_checkpoint_and_resume_on_another_layout(tmp_path, capfd):
  workdir = tmp_path / "run"
  common = [*SMALL, "--workdir", str(workdir)]
  cli.main([*common, "--epochs", "1", "--coordinator", f"127.0.0.1:{processes.free_port()}"])
  out = capfd.readouterr().out
  assert "data parallel over 2 processes, 2 devices" in out and "epoch  1/1" in out
  metrics = json.loads((workdir / "metrics.json").read_text())
  assert metrics["run"] == {"fsdp": False, "processes": 2, "devices": 2}
  assert [h["epoch"] for h in metrics["history"]] == [1]
  assert metrics["test_accuracy"] > 0.3  # 8 steps of Adam on real digits: well above chance (0.1)
  assert (workdir / "checkpoints" / "1" / "state").is_dir()

  # the data-parallel checkpoint restored into the FSDP layout (resharded), one more epoch
  cli.main([*common, "--epochs", "2", "--resume", "--fsdp", "--coordinator", f"127.0.0.1:{processes.free_port()}"])
  out = capfd.readouterr().out
  assert "FSDP over 2 processes" in out and "epochs 2..2" in out
  metrics = json.loads((workdir / "metrics.json").read_text())
  assert [h["epoch"] for h in metrics["history"]] == [1, 2] and metrics["run"]["fsdp"]
  assert (workdir / "checkpoints" / "2" / "state").is_dir()


def test_a_failing_process_stops_the_run(tmp_path):
  """A process that fails (a batch that does not divide among the devices) ends the launch with its exit code."""
  with pytest.raises(ChildProcessError, match="failed"):
    cli.main([*SMALL, "--batch-size", "33", "--workdir", str(tmp_path), "--processes", "2"])
  assert (tmp_path / "logs" / "process_1.txt").read_text()


def test_refuses_a_previous_runs_workdir_before_starting(tmp_path):
  (tmp_path / "checkpoints" / "1" / "state").mkdir(parents=True)
  with pytest.raises(FileExistsError, match="pass --resume"):
    cli.main([*SMALL, "--workdir", str(tmp_path)])
