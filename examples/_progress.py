"""Progress inside a long loop: a tqdm bar on a terminal, else one line every few seconds (logs, CI, pipes)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TextIO


class Progress:
  """Wraps `iterable` (or counts `update` calls) up to `total` steps.

  Args:
    iterable: what to iterate over, or None to call `update` by hand.
    total: the number of steps expected.
    desc: the label of each line (``"epoch 1/3"``).
    enabled: True for a bar, False for nothing, None (the default) for a bar on a terminal and otherwise a line
      every `interval` seconds.
    interval: seconds between two lines when not on a terminal.
    file: where to write (stderr).
    clock: seconds, for tests.
  """

  def __init__(
    self,
    iterable: Iterable[Any] | None,
    total: int,
    desc: str,
    *,
    enabled: bool | None = None,
    interval: float = 5.0,
    file: TextIO | None = None,
    clock: Callable[[], float] = time.monotonic,
  ):
    self.iterable, self.total, self.desc = iterable, total, desc
    self.file = file if file is not None else sys.stderr
    self.interval, self.clock = interval, clock
    terminal = hasattr(self.file, "isatty") and self.file.isatty()
    self.disable = enabled is False
    self._bar = None
    if enabled or (enabled is None and terminal):
      from tqdm.auto import tqdm

      self._bar = tqdm(total=total, desc=desc, unit="step", file=self.file, leave=False, dynamic_ncols=True)
    self.n, self._postfix = 0, ""
    self._start = self._last = clock()

  def __iter__(self) -> Iterator[Any]:
    for item in self.iterable:
      yield item
      self.update(1)

  def set_postfix(self, **values: Any) -> None:
    if self._bar is not None:
      self._bar.set_postfix(**values)
    self._postfix = " ".join(f"{k}={v}" for k, v in values.items())

  def update(self, n: int = 1) -> None:
    self.n += n
    if self._bar is not None:
      self._bar.update(n)
      return
    if self.disable:
      return
    now = self.clock()
    if now - self._last >= self.interval and self.n < self.total:
      self._last = now
      rate = self.n / max(now - self._start, 1e-9)
      line = f"{self.desc}: {self.n}/{self.total} steps ({100 * self.n / max(self.total, 1):.0f}%), {rate:.1f} steps/s"
      print(line + (f", {self._postfix}" if self._postfix else ""), file=self.file, flush=True)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
