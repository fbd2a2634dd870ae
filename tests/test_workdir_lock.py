"""The workdir lock: one live writer, stale locks taken over, foreign hosts refused."""

import json
import os
import subprocess

import pytest

from clara_jax.train.workdir_lock import LOCK_FILE, WorkdirLock, WorkdirLocked


def _dead_pid() -> int:
  proc = subprocess.Popen(["true"])
  proc.wait()
  return proc.pid


def test_a_live_holder_refuses_a_second_lock(tmp_path):
  with WorkdirLock(str(tmp_path)) as first:
    with pytest.raises(WorkdirLocked, match=f"in use by pid {os.getpid()} on this host"):
      WorkdirLock(str(tmp_path)).acquire()
    assert os.path.exists(first.path)
  assert not os.path.exists(os.path.join(str(tmp_path), LOCK_FILE))
  with WorkdirLock(str(tmp_path)):  # free again once released
    pass


def test_a_stale_lock_is_taken_over(tmp_path):
  path = os.path.join(str(tmp_path), LOCK_FILE)
  me = WorkdirLock(str(tmp_path))
  with open(path, "w") as f:
    json.dump({"host": me.me["host"], "pid": _dead_pid(), "started": 0}, f)
  with me:
    with open(path) as f:
      assert json.load(f)["pid"] == os.getpid()
  for junk in ("", "{not json"):  # a holder that died while writing
    with open(path, "w") as f:
      f.write(junk)
    with WorkdirLock(str(tmp_path)):
      pass


def test_a_lock_from_another_host_is_refused_and_kept(tmp_path):
  path = os.path.join(str(tmp_path), LOCK_FILE)
  holder = {"host": "tpu-vm-7", "pid": 1, "started": 0}
  with open(path, "w") as f:
    json.dump(holder, f)
  with pytest.raises(WorkdirLocked, match=f"host 'tpu-vm-7'.*remove {path}"):
    WorkdirLock(str(tmp_path)).acquire()
  with open(path) as f:
    assert json.load(f) == holder
