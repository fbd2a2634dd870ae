"""Progress of the long commands (`evaluate`, `lens`, `index`, `convert`) on stderr.

A tqdm bar when stderr is a terminal; otherwise nothing (CI logs and pipes stay clean),
unless `CLARA_PROGRESS=1` asks for it anyway. Library functions take a plain
`progress(done, total)` callback; the CLI passes one of these.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

from tqdm import tqdm


class Progress:
  """`progress(done, total)`: moves a bar of `unit`s to `done` of `total` (None: a
  count without an end); the bar closes when `done` reaches `total`."""

  def __init__(self, description: str, unit: str = "it") -> None:
    self.description, self.unit = description, unit
    self._bar: Optional[tqdm] = None

  @staticmethod
  def enabled() -> bool:
    forced = os.environ.get("CLARA_PROGRESS")
    return forced == "1" if forced in ("0", "1") else sys.stderr.isatty()

  def __call__(self, done: int, total: Optional[int]) -> None:
    if not self.enabled():
      return
    if self._bar is None:
      self._bar = tqdm(
        total=total, desc=self.description, unit=self.unit, file=sys.stderr, dynamic_ncols=True
      )
    self._bar.total = total
    self._bar.update(done - self._bar.n)
    if total is not None and done >= total:
      self.close()

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None
