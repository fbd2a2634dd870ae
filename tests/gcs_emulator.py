"""A Google Cloud Storage emulator on 127.0.0.1 for tests of `gs://` workdirs.

`gcp-storage-emulator` serves the GCS JSON API in memory. Both clients the project uses
are pointed at it through their documented settings: epath (through gcsfs, chosen over
TensorFlow's GCS client by `EPATH_USE_TF=false`, since TensorFlow's cannot change its
endpoint) reads `STORAGE_EMULATOR_HOST`; TensorStore, which writes orbax checkpoints,
reads `TENSORSTORE_GCS_HTTP_URL` and takes `GOOGLE_AUTH_TOKEN_FOR_TESTING` instead of
credentials. Nothing leaves the machine.

The emulator's media reads lack the `x-goog-generation` header real GCS sends, which
TensorStore needs for the conditional writes of an OCDBT manifest (any checkpoint of more
than a few arrays); `_serve` adds it before starting the server.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Dict, Iterator

BUCKET = "clara-test"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def client_env(url: str) -> Dict[str, str]:
  """The environment that sends epath, gcsfs and TensorStore to the emulator at `url`."""
  return {
    "STORAGE_EMULATOR_HOST": url,
    "EPATH_USE_TF": "false",
    "TENSORSTORE_GCS_HTTP_URL": url,
    "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
    # gcsfs would otherwise look for credentials on a metadata server.
    "GOOGLE_CLOUD_PROJECT": "clara-test",
  }


@contextlib.contextmanager
def emulator(log_path: str) -> Iterator[str]:
  """Runs the emulator with the bucket `BUCKET`; yields its URL."""
  port = _free_port()
  url = f"http://127.0.0.1:{port}"
  with open(log_path, "w") as log:
    proc = subprocess.Popen(
      [sys.executable, __file__, str(port)], stdout=log, stderr=subprocess.STDOUT
    )
  try:
    deadline = time.time() + 60
    while True:
      try:
        urllib.request.urlopen(f"{url}/storage/v1/b/{BUCKET}", timeout=2).read()
        break
      except OSError:
        if proc.poll() is not None or time.time() > deadline:
          raise RuntimeError(f"the GCS emulator did not start; see {log_path}") from None
        time.sleep(0.2)
    yield url
  finally:
    proc.terminate()
    try:
      proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
      proc.kill()


def _serve(port: int) -> None:
  """Runs the emulator in this process, its downloads sending `x-goog-generation`."""
  from gcp_storage_emulator import server
  from gcp_storage_emulator.exceptions import NotFound
  from gcp_storage_emulator.handlers import objects

  def with_generation(handler):
    def handle(request, response, storage, *args, **kwargs):
      try:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        response["x-goog-generation"] = str(obj["generation"])
        response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
      except NotFound:
        pass
      return handler(request, response, storage, *args, **kwargs)

    return handle

  # Media reads: the download endpoint and the JSON API's `?alt=media` (objects.get).
  patched = {
    objects.download: with_generation(objects.download),
    objects.get: with_generation(objects.get),
  }
  for _, methods in server.HANDLERS:
    for method, handler in list(methods.items()):
      if handler in patched:
        methods[method] = patched[handler]
  server.create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET).run()


if __name__ == "__main__":
  _serve(int(sys.argv[1]))
