"""``python -m examples.multihost``: the MNIST CNN trained over several JAX processes, as on several hosts.

By default it starts 2 processes on this machine (1 CPU device each) that find each other through
``jax.distributed.initialize`` (a coordinator on a free local port, gloo collectives between them) and
train data parallel: parameters and optimizer state replicated, each process feeding its half of every
global batch. With ``--fsdp`` the parameters and the moments are split by rows over the devices instead.
Progress, metrics (``metrics.json``, ``metrics.png``) and a checkpoint per epoch go to --workdir, as in
``python -m examples.mnist``. On real hosts, run one process per host with ``--process-id`` and
``--coordinator`` (docs/guides/scale_out.md gives the recipe, SLURM included).

Examples:
  python -m examples.multihost                              # 2 local processes, data parallel, 1 epoch
  python -m examples.multihost --processes 4 --fsdp --epochs 2
  python -m examples.multihost --devices-per-process 2      # 2 processes of 2 CPU devices
  python -m examples.multihost --workdir runs/mh --resume
  # one process per host, by hand (host 0 is the coordinator):
  python -m examples.multihost --processes 2 --process-id 0 --coordinator host0:12355
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

from examples import _cli
from examples.mnist.configs import default

PROG = "python -m examples.multihost"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  base = default.get_config()
  p = _cli.parser(PROG, __doc__)
  p.add_argument("--processes", type=int, default=2, help="JAX processes (one per host)")
  p.add_argument("--devices-per-process", type=int, default=1, help="CPU devices each process simulates")
  p.add_argument("--fsdp", action="store_true", help="split parameters and moments over the devices (default: DP)")
  p.add_argument(
    "--process-id",
    type=int,
    default=None,
    help="run as this one process of --processes, on a host (default: start them all here)",
  )
  p.add_argument(
    "--coordinator", default=None, help="HOST:PORT of process 0's coordinator (default: a free local port)"
  )
  p.add_argument("--epochs", type=int, default=1, help="passes over the training set")
  p.add_argument("--batch-size", type=int, default=base.batch_size, help="global training batch size")
  p.add_argument("--eval-batch-size", type=int, default=base.eval_batch_size, help="global evaluation batch size")
  p.add_argument("--lr", type=float, default=base.learning_rate, help="peak learning rate of jadam.adam's cosine")
  p.add_argument("--seed", type=int, default=base.seed, help="initialisation and shuffling seed")
  _cli.add_mnist_data_arguments(p, base.data_dir)
  p.add_argument("--workdir", default="workdir_multihost", help="metrics, plot and checkpoints")
  p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --workdir")
  p.add_argument(
    "--progress",
    action=argparse.BooleanOptionalAction,
    default=base.progress,
    help="process 0's progress (default: a bar on a terminal, else a line every few seconds)",
  )
  p.add_argument("--no-plot", dest="plot", action="store_false", help="write no metrics.png (default: write it)")
  p.add_argument(
    "--timeout", type=float, default=None, help="seconds before the launcher stops every process (default: none)"
  )
  p.add_argument("--train-limit", type=int, default=None, help=argparse.SUPPRESS)
  p.add_argument("--test-limit", type=int, default=None, help=argparse.SUPPRESS)
  a = p.parse_args(argv)
  if a.processes < 1 or a.devices_per_process < 1:
    p.error("--processes and --devices-per-process must be at least 1")
  return a


def config_of(a: argparse.Namespace) -> default.Config:
  return dataclasses.replace(
    default.get_config(),
    learning_rate=a.lr,
    **_cli.mnist_run_fields(a),
  )


def worker(a: argparse.Namespace) -> None:
  """One process: join the others, then train (examples.multihost.train)."""
  import jax

  jax.config.update("jax_num_cpu_devices", a.devices_per_process)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes
  jax.distributed.initialize(a.coordinator, num_processes=a.processes, process_id=a.process_id)
  from examples.multihost import train

  try:
    metrics = train.train_and_evaluate(config_of(a), train.Run(fsdp=a.fsdp), a.workdir)
    if jax.process_index() == 0:
      print(f"test accuracy {100 * metrics['test_accuracy']:.2f}%; metrics, plot and checkpoints in {a.workdir}")
  finally:
    jax.distributed.shutdown()


def free_port() -> int:
  """A port the OS just had free (the coordinator binds it a moment later)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _stop(procs: list[subprocess.Popen]) -> None:
  """Every process and what it started (each leads its own process group), then reaped."""
  for p in procs:
    if p.poll() is None:
      with contextlib.suppress(ProcessLookupError):
        os.killpg(p.pid, signal.SIGKILL)
  for p in procs:
    p.wait()


def launch(a: argparse.Namespace, argv: list[str]) -> None:
  """Start --processes copies of this program on this machine and wait for them; stop all if one fails.

  Process 0 writes to this terminal; the others to ``<workdir>/logs/process_<i>.txt``.
  """
  from examples.mnist import input_pipeline
  from examples.mnist import train as mnist

  workdir = pathlib.Path(a.workdir)
  latest = mnist._latest_checkpoint(workdir)
  if latest is not None and not a.resume:  # before starting anything
    raise FileExistsError(f"{workdir / 'checkpoints'} holds checkpoints (epoch {latest}): pass --resume")
  (workdir / "logs").mkdir(parents=True, exist_ok=True)
  data_dir = a.data_dir or str(input_pipeline.load(None, allow_download=a.download).path)  # fetched once, here
  coordinator = a.coordinator or f"127.0.0.1:{free_port()}"
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
  env.pop("XLA_FLAGS", None)  # the device count is each process's --devices-per-process
  procs: list[subprocess.Popen] = []
  with contextlib.ExitStack() as logs:
    try:
      for i in range(a.processes):
        args = [*argv, "--process-id", str(i), "--coordinator", coordinator, "--data-dir", data_dir]
        out = None if i == 0 else logs.enter_context(open(workdir / "logs" / f"process_{i}.txt", "w"))  # noqa: SIM115
        cmd = [sys.executable, "-m", "examples.multihost", *args]
        procs.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=out, start_new_session=True))
      deadline = None if a.timeout is None else time.monotonic() + a.timeout
      while any(p.poll() is None for p in procs):
        if any(p.poll() not in (None, 0) for p in procs):
          break  # one failed: the others would wait for it in a collective
        if deadline is not None and time.monotonic() > deadline:
          raise TimeoutError(f"the {a.processes} processes ran past --timeout {a.timeout:g} s")
        time.sleep(0.2)
    finally:
      _stop(procs)
  failed = [i for i, p in enumerate(procs) if p.returncode != 0]
  if failed:
    raise ChildProcessError(
      f"process(es) {failed} failed (exit codes {[p.returncode for p in procs]}); see {workdir}/logs"
    )


def main(argv: list[str] | None = None) -> None:
  argv = sys.argv[1:] if argv is None else list(argv)
  a = parse_args(argv)
  if a.process_id is not None:
    if a.coordinator is None:
      raise ValueError("--process-id needs --coordinator HOST:PORT (process 0's address)")
    worker(a)
  else:
    launch(a, argv)


if __name__ == "__main__":
  _cli.run(PROG, main)
