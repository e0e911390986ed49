"""Run a function in N JAX processes on localhost, as `jax.distributed` runs one per host.

`run(path, name, processes=2)` starts `processes` Python interpreters, each of
which calls ``jax.distributed.initialize`` against a coordinator on a free
local port (CPU devices, gloo collectives), then ``name(out_dir)`` from the
file `path`. The function returns a dict of NumPy arrays, saved as an ``.npz``
(read back with ``allow_pickle=False``: no pickle crosses the processes).
Every process runs in its own process group, which is killed on timeout or
failure, so nothing outlives the call.

Run as a script, this file is the child: ``python processes.py PATH NAME
PROCESS_ID PROCESSES PORT DEVICES OUT``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np


def free_port() -> int:
  """A port the OS just had free (the coordinator binds it a moment later: a small race, retried by `run`)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _kill(procs: list[subprocess.Popen]) -> None:
  for p in procs:
    if p.poll() is None:
      try:
        os.killpg(p.pid, signal.SIGKILL)  # the child and anything it started
      except ProcessLookupError:
        pass
  for p in procs:
    p.wait()


def run(
  path: str, name: str, *, processes: int = 2, devices: int = 2, timeout: float = 90.0, args: tuple[str, ...] = ()
) -> list[dict[str, np.ndarray]]:
  """What `name(out, *args)` in `path` returned, in each of `processes` processes (`devices` CPU devices each).

  Raises:
    RuntimeError: a process failed or the time ran out; the message holds each process's output.
  """
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the device count is set per process
  env["JAX_PLATFORMS"] = "cpu"
  # The children import what this process imports (this worktree's jadam, not an installed one): python puts
  # the script's directory first on sys.path, not the working directory that `python -m pytest` adds.
  env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
  with tempfile.TemporaryDirectory() as out:
    port = free_port()
    logs_open = contextlib.ExitStack()  # closed after the processes are reaped and their logs read
    logs = [logs_open.enter_context(open(os.path.join(out, f"log{i}.txt"), "w+")) for i in range(processes)]  # noqa: SIM115
    procs = []
    try:
      for i in range(processes):
        argv = [sys.executable, __file__, path, name, str(i), str(processes), str(port), str(devices), out, *args]
        procs.append(subprocess.Popen(argv, env=env, stdout=logs[i], stderr=subprocess.STDOUT, start_new_session=True))
      deadline = time.monotonic() + timeout
      while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        if any(p.poll() not in (None, 0) for p in procs):
          break  # one failed: the others would wait for it in a collective until the timeout
        time.sleep(0.1)
      timed_out = any(p.poll() is None for p in procs)
    finally:
      _kill(procs)
    with logs_open:
      texts = []
      for f in logs:
        f.seek(0)
        texts.append(f.read())
    if timed_out or any(p.returncode != 0 for p in procs):
      what = f"timed out after {timeout:.0f} s" if timed_out else f"exit codes {[p.returncode for p in procs]}"
      shown = "\n".join(f"--- process {i} ---\n{t[-4000:]}" for i, t in enumerate(texts))
      raise RuntimeError(f"{processes} processes running {name}: {what}\n{shown}")
    results = []
    for i in range(processes):
      with np.load(os.path.join(out, f"result{i}.npz"), allow_pickle=False) as data:
        results.append(dict(data))
    return results


def _child(path: str, name: str, process_id: str, processes: str, port: str, devices: str, out: str, *args: str):
  import importlib.util

  import jax

  jax.config.update("jax_num_cpu_devices", int(devices))
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes (jax 0.10)
  jax.config.update("jax_numpy_dtype_promotion", "strict")  # as tests/conftest.py
  jax.distributed.initialize(
    coordinator_address=f"127.0.0.1:{port}",
    num_processes=int(processes),
    process_id=int(process_id),
    initialization_timeout=60,
  )
  sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
  spec = importlib.util.spec_from_file_location("_multiprocess_target", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  result = getattr(module, name)(out, *args)
  np.savez(os.path.join(out, f"result{process_id}.npz"), **{k: np.asarray(v) for k, v in result.items()})
  jax.distributed.shutdown()


if __name__ == "__main__":
  _child(*sys.argv[1:])
