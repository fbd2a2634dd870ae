"""One writer per workdir: a lock file naming its holder (host, pid, start time).

Two `train` runs on one workdir would interleave checkpoints and metrics rows, so the
second is refused with the holder named. A lock whose process is gone (same host, pid
not running) is stale: it is taken over with a warning, so a run killed with SIGKILL
resumes without manual clean-up. A lock held from another host cannot be checked from
here; it is refused, and the message says which file to remove if that run is gone.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Dict, Optional

from absl import logging

from clara_jax import paths

LOCK_FILE = "LOCK.json"


class WorkdirLocked(RuntimeError):
  """Another live run holds the workdir."""


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by another user
    return True
  return True


def _read(path: str) -> Optional[Dict]:
  try:
    return paths.read_json(path)
  except (OSError, ValueError):
    return None


class WorkdirLock:
  """Context manager: holds `workdir/LOCK.json` for the duration of a run."""

  def __init__(self, workdir: str):
    self.path = paths.join(workdir, LOCK_FILE)
    self.me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
    self._held = False

  def acquire(self) -> None:
    for _ in range(3):  # a stale lock removed by another starter: try again
      if not paths.create_exclusive(self.path, json.dumps(self.me)):
        holder = _read(self.path)
        if holder is None:  # written by a starter this instant, or unreadable
          time.sleep(0.2)
          holder = _read(self.path)
        if not self._stale(holder):
          assert holder is not None  # _stale(None) is True
          raise WorkdirLocked(self._message(holder))
        logging.warning("%s: taking over a stale lock of %s", self.path, holder)
        try:
          paths.remove(self.path)
        except FileNotFoundError:
          pass
        continue
      self._held = True
      return
    raise WorkdirLocked(f"{self.path}: could not take the lock (contended)")

  def _stale(self, holder: Optional[Dict]) -> bool:
    if holder is None:
      return True  # no readable holder after a pause: a partial write of a dead run
    return holder.get("host") == self.me["host"] and not _alive(int(holder.get("pid", -1)))

  def _message(self, holder: Dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    where = "this host" if holder.get("host") == self.me["host"] else f"host {holder.get('host')!r}"
    return (
      f"{paths.parent(self.path)} is in use by pid {holder.get('pid')} on {where} "
      f"(since {started}); two runs on one workdir would interleave checkpoints. "
      f"If that run is gone, remove {self.path}"
    )

  def release(self) -> None:
    if self._held and (_read(self.path) or {}).get("pid") == self.me["pid"]:
      paths.remove(self.path)
    self._held = False

  def __enter__(self) -> "WorkdirLock":
    self.acquire()
    return self

  def __exit__(self, *exc: object) -> None:
    self.release()
